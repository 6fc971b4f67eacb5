"""The scheduler: decides what the next step runs. Bookkeeping only, no model code.

Policy for now: first come, first served admission, bounded by sequence slots and
KV cells; every admitted task that has finished its prompt decodes one token each
step (continuous batching); the step's remaining token budget goes to prompt
prefill in chunks, oldest first, so a long prompt never stalls running streams.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from axfs.kv import KVSpace
from axfs.task import Task
from drivers.base import Piece


@dataclass(slots=True)
class StepPlan:
    """What one step runs: the pieces for the driver and the tasks they belong to."""

    admitted: list[Task] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    owners: dict[int, Task] = field(default_factory=dict)  # seq -> task

    @property
    def empty(self) -> bool:
        return not self.pieces

    @property
    def num_tokens(self) -> int:
        return sum(len(p.tokens) for p in self.pieces)


class Scheduler:
    def __init__(self, kv: KVSpace, n_batch: int, prefill_chunk: int = 256) -> None:
        self.kv = kv
        self.n_batch = n_batch
        self.prefill_chunk = min(prefill_chunk, n_batch)
        self.waiting: deque[Task] = deque()
        self.running: list[Task] = []

    def add(self, task: Task) -> None:
        self.waiting.append(task)

    def drop(self, task: Task) -> None:
        """Forget a task that ended or was killed; its cells are released."""
        if task in self.waiting:
            self.waiting.remove(task)
        if task in self.running:
            self.running.remove(task)
        self.kv.release(task)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        while self.waiting and self.kv.can_admit(self.waiting[0]):
            task = self.waiting.popleft()
            self.kv.admit(task)
            self.running.append(task)
            plan.admitted.append(task)
        budget = self.n_batch
        for task in self.running:
            if task.prefill_done and task.output_tokens:
                self._add(plan, task, [task.output_tokens[-1]], sample=True)
                budget -= 1
        for task in self.running:
            if budget <= 0:
                break
            if not task.prefill_done:
                start = task.num_prefilled
                n = min(self.prefill_chunk, budget, len(task.prompt_tokens) - start)
                chunk = task.prompt_tokens[start : start + n]
                self._add(plan, task, chunk, sample=start + n == len(task.prompt_tokens))
                budget -= n
        return plan

    @staticmethod
    def _add(plan: StepPlan, task: Task, tokens: list[int], sample: bool) -> None:
        if task.seq is None:
            raise RuntimeError(f"task {task.id} is running without a sequence")
        plan.pieces.append(Piece(seq=task.seq, tokens=tokens, pos=task.next_pos, sample=sample))
        plan.owners[task.seq] = task
