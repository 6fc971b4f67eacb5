"""The queue of a remote model (axfs.remote): which waiting task gets the next free server
slot, and which running task gives its slot up. Bookkeeping only: the runtime sends and
stops the requests.

Tasks are ranked by the mount's policy (axfs.policy), running and waiting together, as a
local model's scheduler ranks them (axfs.scheduler): under ``fair`` the users furthest
behind in tokens first, inside a user the tasks furthest behind (the higher priority
first among equals), a newcomer placed at the current minimum; under ``fifo`` by
submission. A free slot goes to the best-ranked waiting task.

Slots are shared as a local model's memory is (``Policy.shares_memory``, axfs.scheduler's
``_richer``): each user with tasks has an equal share of the slots the endpoints have.
When every slot is held and a waiting task's user holds less than a share, a running task
of the user holding the most over a share gives its slot up and waits again (it goes on
later from its text so far); a task that has already had text gets a slot this way only
if its user stays within the share, so two users do not trade a slot back and forth. A
task gives its slot up only after MIN_TURN tokens since it was sent.
"""

from __future__ import annotations

from collections import Counter

from axfs.policy import Policy
from axfs.task import Task

MIN_TURN = 4  # tokens a task streams after it is sent before it gives way (axfs.scheduler's min_turn)


class RemoteQueue:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.waiting: list[Task] = []
        self.running: list[Task] = []  # sent: each holds a slot
        self.num_preemptions = 0

    def add(self, task: Task) -> None:
        self.waiting.append(task)

    def drop(self, task: Task) -> None:
        """Forget ``task``, which ended."""
        if task in self.waiting:
            self.waiting.remove(task)
        if task in self.running:
            self.running.remove(task)
        self.policy.forget(task)

    def ranked_waiting(self) -> list[Task]:
        """The waiting tasks, best claim first."""
        if not self.waiting:
            return []
        waiting = set(self.waiting)
        return [t for t in self.policy.order(self.running + self.waiting) if t in waiting]

    def start(self, task: Task) -> None:
        """``task`` is sent: it holds a slot."""
        self.waiting.remove(task)
        self.running.append(task)

    def preempt(self, task: Task) -> None:
        """``task`` gave its slot up: it waits again."""
        self.running.remove(task)
        self.waiting.append(task)
        self.num_preemptions += 1

    def rebalance(self, capacity: int) -> tuple[Task, Task] | None:
        """With every one of the ``capacity`` slots held: (the running task that gives its
        slot up, the waiting task that takes it), or None when no user under a share
        waits or nobody over one can give way (always None under ``fifo``)."""
        if not (self.policy.shares_memory and self.waiting and self.running and capacity > 0):
            return None
        ranked = self.policy.order(self.running + self.waiting)
        share = capacity / len({t.uid for t in ranked})
        held = Counter(t.uid for t in self.running)
        waiting = set(self.waiting)
        claimant = next((t for t in ranked if t in waiting and held[t.uid] < share
                         and (not t.output_tokens or held[t.uid] + 1 <= share)), None)
        if claimant is None:
            return None
        victims = [t for t in reversed(ranked) if t not in waiting and held[t.uid] > share
                   and len(t.output_tokens) - t.generated_at_start >= MIN_TURN]
        if not victims:
            return None
        return max(victims, key=lambda t: held[t.uid]), claimant
