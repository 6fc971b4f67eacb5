"""KV-cache accounting: sequence slots and cells, reserved when a task is admitted.

The scheduler asks ``can_admit`` before it commits with ``admit``, so nothing is
ever half allocated. A task reserves its prompt plus its ``max_tokens`` (capped at
the per-task context), so a running task never finds the cache full.
"""

from __future__ import annotations

from dataclasses import dataclass

from axfs.task import Task


@dataclass(slots=True)
class KVStats:
    capacity_cells: int
    reserved_cells: int
    used_cells: int
    cell_bytes: int
    slots: int
    slots_used: int


class KVSpace:
    def __init__(self, capacity_cells: int, slots: int, cell_bytes: int, seq_limit: int) -> None:
        self.capacity_cells = capacity_cells
        self.seq_limit = min(seq_limit, capacity_cells)  # most cells one sequence may hold
        self.slots = slots
        self.cell_bytes = cell_bytes
        self._free_slots = list(range(slots - 1, -1, -1))
        self._holders: dict[int, Task] = {}

    @property
    def reserved_cells(self) -> int:
        return sum(t.kv_reserved for t in self._holders.values())

    def need(self, task: Task) -> int:
        """Cells ``task`` reserves: its prompt and room for every token it may generate."""
        return min(len(task.prompt_tokens) + task.config.max_tokens, self.seq_limit)

    def can_admit(self, task: Task) -> bool:
        return bool(self._free_slots) and self.reserved_cells + self.need(task) <= self.capacity_cells

    def admit(self, task: Task) -> int:
        """Give ``task`` a slot and reserve its cells; call only after ``can_admit``."""
        if not self.can_admit(task):
            raise RuntimeError("admit without room: call can_admit first")
        seq = self._free_slots.pop()
        task.start(seq, self.need(task))
        self._holders[seq] = task
        return seq

    def release(self, task: Task) -> int | None:
        """Give back ``task``'s slot and cells; returns the slot freed, if it had one."""
        seq = task.seq
        if seq is None or self._holders.get(seq) is not task:
            return None
        del self._holders[seq]
        self._free_slots.append(seq)
        task.seq = None
        task.kv_reserved = 0
        return seq

    def stats(self) -> KVStats:
        return KVStats(
            capacity_cells=self.capacity_cells,
            reserved_cells=self.reserved_cells,
            used_cells=sum(t.kv_cells for t in self._holders.values()),
            cell_bytes=self.cell_bytes,
            slots=self.slots,
            slots_used=len(self._holders),
        )
