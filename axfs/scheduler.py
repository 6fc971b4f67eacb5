"""The scheduler: decides what the next step runs. Bookkeeping only, no model code.

Each step, the policy (axfs.policy) ranks every runnable task; the best ``slots`` of
them should hold the model's sequence slots. A waiting task among them is admitted
when a slot and its KV cells are free; if not, running tasks ranked below the slots
that have had their turn (``min_turn`` tokens since admission) are preempted to make
room, but only when that makes enough room (check, then commit). Every admitted task
with one token pending decodes it (continuous batching); the step's remaining token
budget goes to prompt prefill in chunks, best ranked first, so a long prompt never
stalls running streams. Under the fair policy, the first token of a user who had
nothing running comes from a step of its own (see Policy.boosts_newcomers).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from axfs.kv import KVSpace
from axfs.policy import Policy
from axfs.task import Task
from drivers.base import Piece


@dataclass(slots=True)
class StepPlan:
    """What one step does: who leaves, who joins, and the pieces for the driver."""

    preempted: list[tuple[Task, int, bool]] = field(default_factory=list)  # task, seq, keep KV
    admitted: list[Task] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    owners: dict[int, Task] = field(default_factory=dict)  # seq -> task

    @property
    def empty(self) -> bool:
        return not (self.pieces or self.preempted)

    @property
    def num_tokens(self) -> int:
        return sum(len(p.tokens) for p in self.pieces)


@dataclass(slots=True)
class Costs:
    """What the scheduler believes things cost, refined by the engine as it measures."""

    prefill_s_per_token: float = 1e-3
    save_s_per_byte: float = 5e-10
    restore_s_per_byte: float = 5e-10


class Scheduler:
    def __init__(self, kv: KVSpace, n_batch: int, policy: Policy, prefill_chunk: int = 256,
                 min_turn: int = 4) -> None:
        self.kv = kv
        self.n_batch = n_batch
        self.policy = policy
        self.prefill_chunk = min(prefill_chunk, n_batch)
        self.min_turn = min_turn
        self.costs = Costs()
        self.waiting: deque[Task] = deque()
        self.running: list[Task] = []
        self.num_preemptions = 0
        self.last_batch = 0

    def add(self, task: Task) -> None:
        self.waiting.append(task)

    def drop(self, task: Task) -> None:
        """Forget a task that ended or was killed; its cells are released."""
        if task in self.waiting:
            self.waiting.remove(task)
        if task in self.running:
            self.running.remove(task)
        self.kv.release(task)
        self.policy.forget(task)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        ranked = self.policy.order(self.running + list(self.waiting))
        if self.waiting:
            self._place(ranked, plan)
        budget = self.n_batch
        pendings = [(t, t.pending()) for t in ranked if t.seq is not None]
        boosted = [(t, p) for t, p in pendings if self._boosted(t, p)]
        if boosted:
            for task, pending in boosted:
                self._add(plan, task, pending, sample=True)
            self.last_batch = len(plan.pieces)
            return plan
        for task, pending in pendings:
            if len(pending) == 1:
                self._add(plan, task, pending, sample=True)
                budget -= 1
        for task, pending in pendings:
            if budget <= 0:
                break
            if len(pending) > 1:
                n = min(self.prefill_chunk, budget, len(pending))
                self._add(plan, task, pending[:n], sample=n == len(pending))
                budget -= n
        self.last_batch = len(plan.pieces)
        return plan

    def is_newcomer(self, task: Task) -> bool:
        """A task whose user has nothing running while others do (see Policy)."""
        return (self.policy.boosts_newcomers and bool(self.running)
                and all(t.uid != task.uid for t in self.running if t is not task))

    def _boosted(self, task: Task, pending: list[int]) -> bool:
        """The first-token step of a newcomer: its prompt's last chunk, run alone."""
        return (not task.output_tokens and 1 < len(pending) <= self.prefill_chunk
                and self.is_newcomer(task))

    def charge(self, task: Task, tokens: int) -> None:
        task.num_processed += tokens
        self.policy.charge(task, tokens)

    def _place(self, ranked: list[Task], plan: StepPlan) -> None:
        wanted = ranked[: self.kv.slots]
        for task in ranked:
            if task.seq is not None:
                continue
            fits = self.kv.can_admit(task) or (
                task in wanted and self._make_room(task, ranked, wanted, plan))
            if not fits:
                continue
            self.waiting.remove(task)
            self.kv.admit(task)
            self.running.append(task)
            plan.admitted.append(task)

    def _make_room(self, task: Task, ranked: list[Task], wanted: list[Task],
                   plan: StepPlan) -> bool:
        """Preempt the fewest low-ranked running tasks that make room for ``task``."""
        victims = [t for t in reversed(ranked) if t.seq is not None and t not in wanted
                   and t.num_processed - t.processed_at_start >= self.min_turn]
        stats = self.kv.stats()
        slots = stats.slots - stats.slots_used
        cells = stats.capacity_cells - stats.reserved_cells
        need = self.kv.need(task)
        chosen: list[Task] = []
        for victim in victims:
            if slots >= 1 and cells >= need:
                break
            chosen.append(victim)
            slots += 1
            cells += victim.kv_reserved
        if not (slots >= 1 and cells >= need):
            return False
        for victim in chosen:
            seq = victim.seq
            if seq is None:
                continue
            keep = self._keep_kv(victim)
            self.kv.release(victim)
            self.running.remove(victim)
            self.waiting.append(victim)
            victim.preempt(keep)
            plan.preempted.append((victim, seq, keep))
            self.num_preemptions += 1
        return True

    def _keep_kv(self, task: Task) -> bool:
        """Save the sequence's KV, or drop it and recompute it later: whichever is cheaper."""
        per_byte = self.costs.save_s_per_byte + self.costs.restore_s_per_byte
        save = task.num_cached * self.kv.cell_bytes * per_byte
        recompute = task.num_cached * self.costs.prefill_s_per_token
        return save < recompute

    @staticmethod
    def _add(plan: StepPlan, task: Task, tokens: list[int], sample: bool) -> None:
        if task.seq is None:
            raise RuntimeError(f"task {task.id} is running without a sequence")
        plan.pieces.append(Piece(seq=task.seq, tokens=tokens, pos=task.num_cached, sample=sample))
        plan.owners[task.seq] = task
