"""The scheduler: decides what the next step runs. Bookkeeping only, no model code.

Each step, the policy (axfs.policy) ranks every runnable task; the best ``slots`` of
them should hold the model's sequence slots. A waiting task among them is admitted
when a slot and its KV cells are free (cached sequences are evicted for it; see
axfs.kv); if not, running tasks ranked below the slots that have had their turn are
preempted to make room, but only when that makes enough room (check, then commit). A
turn is ``quantum`` tokens generated since admission, or ``min_turn`` tokens run when the
waiting task is a newcomer, so that tasks do not trade places (and swap their KV) at
every step (see ``_had_turn``). Every
admitted task with one token pending decodes it (continuous batching); the step's
remaining token budget goes to prompt prefill in chunks, best ranked first, so a long
prompt never stalls running streams. Under the fair policy, the first token of a user who had
nothing running comes from a step of its own (see Policy.boosts_newcomers).

Memory is shared as the batch is. A task reserves cells as it grows (see axfs.kv). Each
user with tasks has an equal share of the cells. When a task cannot grow, or a waiting
task cannot get in, for want of cells, and its user holds less than a share, the fair
policy takes the cells from users who hold more than theirs (see ``_richer``); so a task
that asks for a million tokens cannot keep another user's task from its first token.
Otherwise a task that cannot grow makes room within its own user: its user's
lowest-ranked task gives way, which may be itself. Under ``fifo`` the lowest-ranked
(latest) task of any user gives way.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from axfs.kv import RESERVE_AHEAD, Admission, KVManager
from axfs.policy import Policy
from axfs.task import Task
from drivers.base import Piece


@dataclass(slots=True)
class StepPlan:
    """What one step does: who leaves, who joins, and the pieces for the driver."""

    preempted: list[tuple[Task, int, bool]] = field(default_factory=list)  # task, seq, keep KV
    admissions: list[Admission] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # cached slots evicted for growth
    pieces: list[Piece] = field(default_factory=list)
    owners: dict[int, Task] = field(default_factory=dict)  # seq -> task

    @property
    def empty(self) -> bool:
        return not (self.pieces or self.preempted)

    @property
    def admitted(self) -> list[Task]:
        return [a.task for a in self.admissions]

    @property
    def evicted(self) -> list[int]:
        return [slot for a in self.admissions for slot in a.evict] + self.dropped

    def set_aside(self, task: Task) -> bool:
        """Whether ``task`` was preempted in this step (it may not come back in it)."""
        return any(t is task for t, _, _ in self.preempted)

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
    def __init__(self, kv: KVManager, n_batch: int, policy: Policy, prefill_chunk: int = 256,
                 min_turn: int = 4, quantum: int = 64) -> None:
        self.kv = kv
        self.n_batch = n_batch
        self.policy = policy
        self.prefill_chunk = min(prefill_chunk, n_batch)
        self.min_turn = min_turn  # tokens a task runs before a newcomer may preempt it
        self.quantum = quantum  # tokens a task generates before anyone else may preempt it
        self.costs = Costs()
        self.waiting: deque[Task] = deque()
        self.running: list[Task] = []
        self.num_preemptions = 0
        self.last_batch = 0
        self.waiting_for_memory = 0  # waiting tasks the last step could not fit

    def add(self, task: Task) -> None:
        self.waiting.append(task)

    def drop(self, task: Task, cache: bool = True) -> list[int]:
        """Forget a task that ended or was killed. Its sequence stays cached for prompts
        that begin like it (``cache``); the slots to clear in the driver are returned."""
        if task in self.waiting:
            self.waiting.remove(task)
        if task in self.running:
            self.running.remove(task)
        self.policy.forget(task)
        return self.kv.release(task, cache)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        ranked = self.policy.order(self.running + list(self.waiting))
        pinned: set[int] = set()  # sources of this step's prefix copies
        if self.waiting:
            self._place(ranked, plan, pinned)
        budget = self.n_batch
        pendings = [(t, t.pending()) for t in ranked if t.seq is not None]
        short = [t for t, p in pendings if t.num_cached + len(p) > t.kv_reserved]
        if short:
            stalled = self._grow(short, ranked, plan, pinned)
            pendings = [(t, p) for t, p in pendings if t.seq is not None and t not in stalled]
        alone = [(t, p) for t, p in pendings if t.exclusive or t.isolate]
        if alone:  # a replay, or a task of a failed step, runs in steps of its own
            pendings = alone[:1]
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
                n = min(self.prefill_chunk, budget, len(pending), self._stepwise(task))
                self._add(plan, task, pending[:n], sample=n == len(pending))
                budget -= n
        self.last_batch = len(plan.pieces)
        return plan

    @staticmethod
    def _stepwise(task: Task) -> int:
        """Most tokens of ``task`` one piece may carry. A task resumed from the journal
        recomputes its prompt without running into its generated tokens, then those one
        a step, as they were first computed, so that it goes on bit for bit."""
        if task.num_cached >= task.stepwise_until:
            return 1 << 30
        prompt = len(task.prompt_tokens)
        return prompt - task.num_cached if task.num_cached < prompt else 1

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

    def _place(self, ranked: list[Task], plan: StepPlan, pinned: set[int]) -> None:
        wanted = ranked[: self.kv.slots]
        self.waiting_for_memory = 0
        for task in ranked:
            if task.seq is not None or plan.set_aside(task):
                continue
            adm = self.kv.plan(task, pinned)
            # Room is made only for a task that lacks room, not for one that waits for a
            # prefix a running task computes: preempting that task would throw away the
            # very prefix it waits for (and the next in line would start it again).
            if (adm is None and task in wanted and not self.kv.prefix_pending(task)
                    and self._make_room(task, ranked, wanted, plan, pinned)):
                adm = self.kv.plan(task, pinned)
            if adm is None:
                self.waiting_for_memory += 1
                continue
            self.kv.commit(adm)
            if adm.source is not None:
                pinned.add(adm.source)
            self.waiting.remove(task)
            self.running.append(task)
            plan.admissions.append(adm)

    def _make_room(self, task: Task, ranked: list[Task], wanted: list[Task],
                   plan: StepPlan, pinned: set[int]) -> bool:
        """Preempt the fewest running tasks that make room for ``task``: low-ranked ones
        outside the slots first, then (fair policy) those of users holding more memory
        than ``task``'s user; never one whose prefix this step copies or one that has not
        had its turn."""
        newcomer = self.is_newcomer(task)
        victims = [t for t in reversed(ranked) if t.seq is not None and t not in wanted
                   and t.seq not in pinned and self._had_turn(t, newcomer)]
        need = self.kv.need(task)
        victims += [t for t in self._richer(task, ranked, plan, pinned, newcomer, need)
                    if t not in victims]
        stats = self.kv.stats()
        slots = stats.slots - stats.slots_running  # cached slots can be evicted
        cells = stats.free_cells + stats.cached_cells
        chosen: list[Task] = []
        for victim in victims:
            if slots >= 1 and cells >= need:
                break
            chosen.append(victim)
            slots += 1
            cells += self.kv.freed_by(victim)
        if not (slots >= 1 and cells >= need):
            return False
        for victim in chosen:
            self._preempt(victim, plan)
        return True

    def _grow(self, short: list[Task], ranked: list[Task], plan: StepPlan,
              pinned: set[int]) -> set[Task]:
        """Reserve more cells for the running tasks in ``short``, best ranked first, making
        room as the class docstring says; returns the tasks that sit this step out (a
        task that would give way to itself while this step copies its prefix)."""
        stalled: set[Task] = set()
        for task in short:
            while task.seq is not None:
                dropped = self.kv.reserve(task, pinned)
                if dropped is not None:
                    plan.dropped += dropped
                    break
                richer = self._richer(task, ranked, plan, pinned, False, RESERVE_AHEAD)
                victim = richer[0] if richer else self._own_last(task, ranked, plan)
                if victim.seq in pinned:
                    stalled.add(task)
                    break
                self._preempt(victim, plan)
        return stalled

    def _had_turn(self, task: Task, newcomer: bool) -> bool:
        """Whether the running ``task`` may give way: for a newcomer once it has run
        ``min_turn`` tokens since it was admitted; for anyone else once it has generated
        ``quantum`` tokens since (a task still reading its prompt does not give way to
        them: else a burst of long prompts would take turns a chunk each, each saving
        and restoring its half-read prompt, and every first token would come last)."""
        if newcomer:
            return task.num_processed - task.processed_at_start >= self.min_turn
        return len(task.output_tokens) - task.generated_at_start >= self.quantum

    def _richer(self, task: Task, ranked: list[Task], plan: StepPlan, pinned: set[int],
                newcomer: bool, need: int) -> list[Task]:
        """Under the fair policy, the running tasks that give way so that ``task`` has
        ``need`` cells more, when its user holds less than a user's share of the cache
        (the cells over the users with tasks) and, to get in, would stay within it or
        waits for its first token: tasks of users who hold more than a share, the
        furthest over first, each user's lowest-ranked first. Only tasks past their first
        token that have had their turn, were not admitted in this step and are no
        copy's source in it: so two users who each want more than a share take turns by
        whole tasks, not by steps."""
        if not self.policy.shares_memory:
            return []
        held: dict[int, int] = {}
        for t in self.running:
            held[t.uid] = held.get(t.uid, 0) + t.kv_reserved
        share = self.kv.capacity_cells / len({t.uid for t in ranked})
        mine = held.get(task.uid, 0)
        if mine >= share or (task.seq is None and task.output_tokens and mine + need > share):
            return []
        admitted = set(plan.admitted)
        return sorted((t for t in reversed(ranked)
                       if t.seq is not None and held[t.uid] > share and t.output_tokens
                       and t.seq not in pinned and t not in admitted
                       and self._had_turn(t, newcomer)),
                      key=lambda t: -held[t.uid])

    def _own_last(self, task: Task, ranked: list[Task], plan: StepPlan) -> Task:
        """The task that gives way when nobody richer can: the lowest-ranked running task
        of ``task``'s user (any user's under ``fifo``), not admitted in this step."""
        admitted = set(plan.admitted)
        anyone = not self.policy.shares_memory
        for t in reversed(ranked):
            if t.seq is not None and (anyone or t.uid == task.uid) and t not in admitted:
                return t
        return task

    def _preempt(self, victim: Task, plan: StepPlan) -> None:
        seq = victim.seq
        if seq is None:
            return
        keep = self._keep_kv(victim)
        self.kv.release(victim, cache=False)
        self.running.remove(victim)
        self.waiting.append(victim)
        victim.preempt(keep)
        plan.preempted.append((victim, seq, keep))
        self.num_preemptions += 1

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
