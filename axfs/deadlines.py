"""Deadlines (``config deadline SECONDS``, from submission): a timer a task that has one,
so that tasks without one cost nothing, per token or per step.

At its deadline a task that has started ends done, with ``finish_reason deadline`` and
its text so far; one that has not started fails, saying so. A task whose deadline has
passed, or whose prompt the model cannot read before it, fails when it is handed to
the model instead of waiting. Which task runs first is the policy's (axfs.policy: the
nearest deadline first, within each user's share).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import trio

from axfs.task import State, Task
from axfs.timeline import Finish
from axfs.trace import Event, Trace

End = Callable[[Task, State, Finish, str], None]


class Tally:
    """Deadlines met (done before them) and missed (ended or failed by them), for sched."""

    def __init__(self) -> None:
        self.met = 0
        self.missed = 0

    def count(self, task: Task) -> None:
        """``task`` ended."""
        if task.config.deadline <= 0:
            return
        if task.finish_reason is Finish.DEADLINE:
            self.missed += 1
        elif task.state is State.DONE:
            self.met += 1


def deadline_at(task: Task) -> float:
    """When ``task`` must end (time.time()), or infinity."""
    return task.submitted_at + task.config.deadline if task.config.deadline > 0 else math.inf


def too_late(task: Task, prefill_s_per_token: float) -> str:
    """Why ``task`` cannot start and read its prompt before its deadline, or ""."""
    left = deadline_at(task) - time.time()
    if left <= 0:
        return f"its deadline ({task.config.deadline:g} s from submission) has passed"
    need = len(task.prompt_tokens) * prefill_s_per_token
    if need > left:
        return (f"its prompt ({len(task.prompt_tokens)} tokens) takes about {need:.1f} s to "
                f"read, more than the {left:.1f} s left before its deadline")
    return ""


async def watch(task: Task, end: End, trace: Trace) -> None:
    """Sleep until ``task``'s deadline; end it then if it is still going."""
    await trio.sleep(max(0.0, deadline_at(task) - time.time()))
    if task.finished:
        return
    if task.started_at:
        task.mark(Event.DONE, reason=Finish.DEADLINE, tokens=task.num_generated)
        trace.emit(Event.DONE, task.id, task.uid, reason=Finish.DEADLINE,
                   tokens=task.num_generated)
        end(task, State.DONE, Finish.DEADLINE, "")
        return
    fail(task, end, trace, f"its deadline ({task.config.deadline:g} s from submission) "
                           "passed before it could start")


def fail(task: Task, end: End, trace: Trace, why: str) -> None:
    error = f"deadline: {why}"
    trace.emit(Event.ERROR, task.id, task.uid, reason=error)
    end(task, State.FAILED, Finish.DEADLINE, error)
