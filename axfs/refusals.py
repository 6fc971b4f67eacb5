"""Recording refusals: why a request was refused, where its user and the task's readers
see it (the trace, users/UID, tasks/ID/error)."""

from __future__ import annotations

from axfs.errors import AxfsError
from axfs.quota import Quota
from axfs.task import Task
from axfs.trace import Event, Trace


class Refusals:
    def __init__(self, trace: Trace, quota: Quota) -> None:
        self.trace = trace
        self.quota = quota
        self.last: dict[str, str] = {}  # task id -> why its last write was refused

    def reject(self, uid: int, task: Task | None, error: AxfsError, about: str = "-") -> AxfsError:
        """Record why a request was refused (trace, users/UID, and the task's error file
        until a later write to it succeeds) and return it to raise. ``about``: the id
        the request named, where it was not a write to the task itself (replay/ID)."""
        about = task.id if task else about
        self.trace.emit(Event.REJECT, about, uid, reason=str(error))
        self.quota.refused(uid, about, str(error))
        if task is not None:
            self.last[task.id] = str(error)
            task.notify()
        return error

    def accepted(self, task: Task) -> None:
        """A write to ``task`` succeeded: an older refusal no longer shows in its error."""
        if self.last.pop(task.id, None) is not None:
            task.notify()

    def forget(self, task: Task) -> None:
        self.last.pop(task.id, None)

    def error_text(self, task: Task) -> str:
        """tasks/ID/error: why the task failed, then why the last write to it was refused
        (if the last write was refused)."""
        refusal = self.last.get(task.id, "")
        lines = [s for s in (task.error, refusal if refusal != task.error else "") if s]
        return "".join(f"{line}\n" for line in lines)
