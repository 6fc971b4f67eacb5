"""The engine: one loop that schedules a step, has the driver run it, and applies it.

Driver calls run in a worker thread (``trio.to_thread``) so the FUSE handlers keep
being answered while the model computes; everything else happens in the trio
thread, so kernel state needs no locks.
"""

from __future__ import annotations

import logging
import time

import trio

from axfs.scheduler import Scheduler, StepPlan
from axfs.task import State, Task
from axfs.trace import Trace
from drivers.base import Driver, DriverError, Piece, Sampling

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, driver: Driver, scheduler: Scheduler, trace: Trace) -> None:
        self.driver = driver
        self.scheduler = scheduler
        self.trace = trace
        self._wake = trio.Event()
        self._to_close: list[int] = []  # freed sequence slots to clear before the next step
        self.num_steps = 0
        self.num_tokens = 0

    def wake(self) -> None:
        self._wake.set()

    def add(self, task: Task) -> None:
        self.scheduler.add(task)
        self.wake()

    def end(self, task: Task, state: State, reason: str, error: str = "") -> None:
        """Finish ``task`` (if it is not already) and give back its place in the model."""
        task.finish(state, reason, error)
        seq = task.seq
        self.scheduler.drop(task)
        if seq is not None:
            self._to_close.append(seq)
        self.wake()

    async def run(self) -> None:
        while True:
            plan = self.scheduler.schedule()
            if plan.empty and not self._to_close:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            for task in plan.admitted:
                self.trace.emit("admit", task.id, task.uid, seq=task.seq, kv_cells=task.kv_reserved)
            opened = [(t.seq, _sampling(t)) for t in plan.admitted if t.seq is not None]
            closed, self._to_close = self._to_close, []
            try:
                sampled = await trio.to_thread.run_sync(self._run, closed, opened, plan.pieces)
            except DriverError as e:
                log.warning("step failed: %s", e)
                for task in plan.owners.values():
                    self.trace.emit("error", task.id, task.uid, reason=str(e))
                    self.end(task, State.FAILED, "error", f"model error: {e}")
                continue
            self._apply(plan, sampled)

    def _run(self, closed: list[int], opened: list[tuple[int, Sampling]],
             pieces: list[Piece]) -> dict[int, int]:
        """In the worker thread: clear freed slots, set up new ones, run the step."""
        for seq in closed:
            self.driver.close_seq(seq)
        for seq, sampling in opened:
            self.driver.open_seq(seq, sampling)
        return self.driver.step(pieces) if pieces else {}

    def _apply(self, plan: StepPlan, sampled: dict[int, int]) -> None:
        self.num_steps += 1
        self.num_tokens += plan.num_tokens
        for piece in plan.pieces:
            task = plan.owners[piece.seq]
            if task.finished or task.seq != piece.seq:
                continue  # killed while the step ran
            if not task.prefill_done:
                task.num_prefilled += len(piece.tokens)
                self.trace.emit("prefill", task.id, task.uid, tokens=len(piece.tokens),
                                done=task.num_prefilled, of=len(task.prompt_tokens))
            token = sampled.get(piece.seq)
            if token is None:
                continue
            first = not task.output_tokens
            needed = len(task.prompt_tokens) + task.num_generated + 1
            task.add_token(token, self.driver.piece(token), self.driver.is_eog(token),
                           limit_reached=needed > task.kv_reserved)
            if first:
                self.trace.emit("first_token", task.id, task.uid,
                                ms=round((task.first_token_at - task.submitted_at) * 1000, 1))
            if task.finished:
                self.trace.emit("done", task.id, task.uid, reason=task.finish_reason,
                                tokens=task.num_generated,
                                seconds=round(time.time() - task.submitted_at, 3))
                self.end(task, task.state, task.finish_reason)


def _sampling(task: Task) -> Sampling:
    c = task.config
    return Sampling(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, seed=c.seed)
