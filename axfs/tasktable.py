"""The task table: every task of the tree by id, each user's latest, and new ids."""

from __future__ import annotations

import re

from axfs.config import TaskConfig
from axfs.errors import BadInput, Exists, NotFound
from axfs.quota import Quota
from axfs.task import Task

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = frozenset({"new", "latest"})


class TaskTable:
    """``defaults``: a new task's parameters (copied); ``quota`` counts each task kept."""

    def __init__(self, quota: Quota, defaults: TaskConfig) -> None:
        self.quota = quota
        self.defaults = defaults
        self.tasks: dict[str, Task] = {}
        self._latest: dict[int, str] = {}
        self._next_id = 1

    def get(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        return task

    def latest(self, uid: int) -> Task | None:
        task_id = self._latest.get(uid)
        return self.tasks.get(task_id) if task_id else None

    def set_latest(self, task: Task) -> None:
        self._latest[task.uid] = task.id

    def create(self, uid: int, gid: int, name: str | None = None) -> Task:
        """A draft task named ``name`` (None: the next free number); BadInput for a name
        that cannot be one, Exists for one taken."""
        if name is None:
            while str(self._next_id) in self.tasks:
                self._next_id += 1
            name = str(self._next_id)
            self._next_id += 1
        elif name in RESERVED_NAMES or not NAME.fullmatch(name):
            raise BadInput(f"bad task name {name!r}: 1-64 of A-Z a-z 0-9 . _ - (not new or latest)")
        elif name in self.tasks:
            raise Exists(f"task {name} exists")
        task = Task(name, uid, gid, self.defaults.copy())
        self.quota.track(task)
        self.tasks[name] = task
        return task

    def adopt(self, task: Task) -> None:
        """Put a task read back from the journal into the table."""
        self.tasks[task.id] = task
        if not task.finished:
            self.quota.track(task)  # counts toward its user's limits
        latest = self.latest(task.uid)
        if latest is None or latest.submitted_at <= task.submitted_at:
            self._latest[task.uid] = task.id
        if task.id.isdigit():
            self._next_id = max(self._next_id, int(task.id) + 1)

    def drop(self, task: Task) -> None:
        self.tasks.pop(task.id, None)
        if self._latest.get(task.uid) == task.id:
            del self._latest[task.uid]
