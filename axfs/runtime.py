"""A loaded model and what runs its tasks: the kernel keeps one runtime per loaded model.

``LocalRuntime`` is a driver in this process (llama.cpp) with its own KV manager,
scheduler and engine, so each model batches its own tasks. ``axfs.remote`` has the
runtime for models served by OpenAI-compatible engines elsewhere. Both answer the
same few calls, which is all the kernel uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from axfs import deadlines
from axfs.engine import Engine
from axfs.kv import KVManager
from axfs.policy import Policy, make_policy
from axfs.scheduler import Scheduler
from axfs.swap import SwapSpace
from axfs.task import State, Task
from axfs.timeline import Finish
from axfs.trace import Event, Trace
from drivers.base import Driver


class Runtime(Protocol):
    name: str
    sha: str  # the model file's sha256 ("" for a remote model)
    deterministic: bool  # a task's tokens do not depend on what else runs (drivers.determinism)
    last_used: float  # time.monotonic() of the last task it ran or ended
    on_end: Callable[[Task], None] | None
    seq_limit: int | None  # tokens one task's context holds (None: the server decides)
    policy: Policy  # who runs next, and each user's tokens (the quotas count them)

    async def run(self) -> None: ...

    def add(self, task: Task) -> None: ...

    def end(self, task: Task, state: State, reason: Finish, error: str = "") -> None: ...

    def tokenize(self, text: str, bos: bool = True, special: bool = False) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def active(self) -> int:
        """Tasks it is running or has queued."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True, frozen=True)
class LocalOptions:
    """How each local model's runtime is set up (the mount's options)."""

    policy: str = "fair"
    prefix_cache: bool = True
    cache_limit: int | None = None
    swap_mem: int = 512 << 20
    # A step's text published while the next step runs (axfs.engine); None: when the
    # model runs on a GPU. On a CPU whose every core runs llama.cpp's step, the work
    # overlapped takes a core from the step: measured here (Gemma 3 270M, 2 cores, N=8,
    # 5 rounds each) 0.95x of the driver alone with it, 1.03x without (docs/benchmarks.md, "The hot path").
    overlap: bool | None = None


class LocalRuntime:
    def __init__(self, name: str, driver: Driver, trace: Trace, options: LocalOptions,
                 swap: SwapSpace | None = None, sha: str = "") -> None:
        self.name = name
        self.driver = driver
        self.sha = sha
        self.info = driver.info
        self.deterministic = driver.info.deterministic
        shape = driver.shape
        self.kv = KVManager(shape.n_ctx, shape.n_seq_max, shape.cell_bytes,
                            seq_limit=min(shape.n_ctx, self.info.context_length or shape.n_ctx),
                            prefix_cache=options.prefix_cache, cache_limit=options.cache_limit)
        self.seq_limit: int | None = self.kv.seq_limit
        self.scheduler = Scheduler(self.kv, shape.n_batch, make_policy(options.policy))
        self.policy = self.scheduler.policy
        self.engine = Engine(driver, self.scheduler, trace, swap or SwapSpace(options.swap_mem, None),
                             overlap=self._overlap(driver, options.overlap))
        self.engine.swap.on_error = lambda task_id, why: trace.emit(
            Event.ERROR, task_id, self._owner(task_id), reason=why)
        self.engine.on_end = self._ended
        self.on_end: Callable[[Task], None] | None = None
        self.last_used = time.monotonic()
        self._timers: trio.Nursery | None = None  # deadlines' (axfs.deadlines), while it runs
        self._watching: dict[str, trio.CancelScope] = {}  # task id -> its deadline's timer
        self._unwatched: list[Task] = []  # tasks with deadlines added before ``run``
        self.deadlines = deadlines.Tally()

    @staticmethod
    def _overlap(driver: Driver, asked: bool | None) -> bool:
        if asked is not None:
            return asked
        return int(driver.info.extra.get("gpu_layers", "0") or 0) > 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._timers = nursery
            for task in self._unwatched:  # added before it ran
                nursery.start_soon(self._watch, task)
            self._unwatched.clear()
            await self.engine.run()

    def add(self, task: Task) -> None:
        self.last_used = time.monotonic()
        if task.config.deadline > 0:
            why = deadlines.too_late(task, self.scheduler.costs.prefill_s_per_token)
            if why:
                deadlines.fail(task, self.end, self.engine.trace, why)
                return
            if self._timers is None:
                self._unwatched.append(task)
            else:
                self._timers.start_soon(self._watch, task)
        self.engine.add(task)

    async def _watch(self, task: Task) -> None:
        if task.finished:  # ended before this timer's task began
            return
        with trio.CancelScope() as scope:
            self._watching[task.id] = scope
            try:
                await deadlines.watch(task, self.end, self.engine.trace)
            finally:
                self._watching.pop(task.id, None)

    def end(self, task: Task, state: State, reason: Finish, error: str = "") -> None:
        self.engine.end(task, state, reason, error)

    def _ended(self, task: Task) -> None:
        self.last_used = time.monotonic()
        watching = self._watching.pop(task.id, None)
        if watching is not None:
            watching.cancel()
        self.deadlines.count(task)
        if self.on_end is not None:
            self.on_end(task)

    def tokenize(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        return self.driver.tokenize(text, bos=bos, special=special)

    def piece(self, token: int) -> bytes:
        return self.driver.piece(token)

    def is_eog(self, token: int) -> bool:
        return self.driver.is_eog(token)

    def _owner(self, task_id: str) -> int | str:
        """The uid of a task this runtime holds (a trace line is its owner's: axfs.privacy)."""
        tasks = [*self.scheduler.running, *self.scheduler.waiting]
        return next((t.uid for t in tasks if t.id == task_id), "-")

    def active(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    def close(self) -> None:
        self.engine.close()
        self.driver.close()
