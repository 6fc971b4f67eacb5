"""Scheduling policies: who gets the model's batch slots next.

A policy only orders tasks and keeps the accounts it orders them by; the scheduler
decides what that means for admission and preemption.

- ``fifo``: first submitted, first served, like llama.cpp's server.
- ``fair``: token-fair shares in two levels, like CFS with cgroups. Each user (uid) is
  a group of weight 100; inside a user, each task's weight is its ``priority`` (1 to
  10000, default 100). Every token a task processes (prompt or generated) adds
  ``1 / weight`` to its task's and its user's virtual runtime; the batch goes to the
  users furthest behind, and inside a user to the tasks furthest behind, the higher
  priority first among equals. A user's tasks that have not run yet are ranked together,
  at the place of the first of them, by priority and then by submission (``ctl priority``
  on a waiting task moves it ahead of its user's others that have not run).

Under both, a task with a deadline (``config deadline``) comes before those without, the
nearest deadline first (earliest deadline first; under ``fair``, inside its user).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

from axfs.deadlines import deadline_at
from axfs.task import Task

USER_WEIGHT = 100.0


class Policy(Protocol):
    name: str
    # Whether a user with nothing running gets their first token at once: the step in
    # flight is aborted and their prompt's last chunk runs in a step of its own.
    boosts_newcomers: bool
    # Whether memory is shared out too: when cells run out, the user holding the most
    # gives way (see axfs.scheduler); otherwise the lowest-ranked task does.
    shares_memory: bool

    def order(self, tasks: list[Task]) -> list[Task]:
        """``tasks``, best claim first."""
        ...

    def charge(self, task: Task, tokens: int) -> None:
        """Account ``tokens`` processed for ``task`` in the step just run."""
        ...

    def forget(self, task: Task) -> None:
        """``task`` ended: drop its accounts (its user keeps theirs)."""
        ...

    def users(self) -> dict[int, tuple[float, float]]:
        """Each known user's (weight, tokens processed)."""
        ...


@dataclass(slots=True)
class _User:
    vruntime: float = 0.0
    tokens: int = 0
    active: bool = False


class FifoPolicy:
    name = "fifo"
    boosts_newcomers = False
    shares_memory = False

    def __init__(self) -> None:
        self._tokens: dict[int, int] = defaultdict(int)

    def order(self, tasks: list[Task]) -> list[Task]:
        return sorted(tasks, key=lambda t: (deadline_at(t), t.submitted_at, t.id))

    def charge(self, task: Task, tokens: int) -> None:
        self._tokens[task.uid] += tokens

    def forget(self, task: Task) -> None:
        pass

    def users(self) -> dict[int, tuple[float, float]]:
        return {uid: (USER_WEIGHT, n) for uid, n in self._tokens.items()}


class FairPolicy:
    name = "fair"
    boosts_newcomers = True
    shares_memory = True

    def __init__(self) -> None:
        self._users: dict[int, _User] = {}
        self._task_vr: dict[str, float] = {}
        self._charged: set[str] = set()  # tasks that have run

    def _user(self, uid: int) -> _User:
        return self._users.setdefault(uid, _User())

    def _enter(self, tasks: list[Task]) -> None:
        """Place users and tasks that just became runnable at the current minimum, so a
        newcomer is served at once but cannot claim time it was not waiting for."""
        uids = {t.uid for t in tasks}
        staying = [u.vruntime for uid, u in self._users.items() if u.active and uid in uids]
        floor = min(staying, default=None)
        for uid in uids:
            user = self._user(uid)
            if not user.active and floor is not None:
                user.vruntime = max(user.vruntime, floor)
        for uid, user in self._users.items():
            user.active = uid in uids
        for t in tasks:
            if t.id not in self._task_vr:
                known = [self._task_vr[o.id] for o in tasks if o.uid == t.uid and o.id in self._task_vr]
                self._task_vr[t.id] = min(known, default=0.0)

    def order(self, tasks: list[Task]) -> list[Task]:
        self._enter(tasks)
        queues: dict[int, list[Task]] = defaultdict(list)
        vr = {t.id: self._task_vr[t.id] for t in tasks}
        unrun: dict[int, float] = {}  # each user's tasks that have not run: the first one's place
        for t in tasks:
            if t.id not in self._charged:
                unrun[t.uid] = min(unrun.get(t.uid, vr[t.id]), vr[t.id])
        for t in tasks:
            if t.id not in self._charged:
                vr[t.id] = unrun[t.uid]
        for t in sorted(tasks, key=lambda t: (deadline_at(t), vr[t.id], -t.config.priority,
                                             t.submitted_at, t.id)):
            queues[t.uid].append(t)
        # Hand out places one at a time to the user whose virtual runtime, counting
        # the places already given (a token each per step), is lowest.
        projected = {uid: self._users[uid].vruntime for uid in queues}
        out: list[Task] = []
        while queues:
            uid = min(queues, key=lambda u: (projected[u], u))
            out.append(queues[uid].pop(0))
            projected[uid] += 1.0 / USER_WEIGHT
            if not queues[uid]:
                del queues[uid]
        return out

    def charge(self, task: Task, tokens: int) -> None:
        user = self._user(task.uid)
        user.vruntime += tokens / USER_WEIGHT
        user.tokens += tokens
        self._task_vr[task.id] = self._task_vr.get(task.id, 0.0) + tokens / task.config.priority
        self._charged.add(task.id)

    def forget(self, task: Task) -> None:
        self._task_vr.pop(task.id, None)
        self._charged.discard(task.id)

    def users(self) -> dict[int, tuple[float, float]]:
        return {uid: (USER_WEIGHT, u.tokens) for uid, u in self._users.items()}


def make_policy(name: str) -> Policy:
    if name == "fair":
        return FairPolicy()
    if name == "fifo":
        return FifoPolicy()
    raise ValueError(f"no scheduling policy {name!r} (fair, fifo)")
