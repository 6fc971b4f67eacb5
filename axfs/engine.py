"""The engine: one loop that schedules a step, has the driver run it, and applies it.

Driver calls run in a worker thread so the FUSE handlers keep being answered while
the model computes; everything else happens in the trio thread, so kernel state needs
no locks.

A step's results are applied in two passes. The first, as soon as the step returns,
does what the next step depends on: every sampled token is counted, the KV and the
fair shares are charged, and a task that ends by its end-of-generation token, its
``max_tokens`` or its context is finished. The next step is then planned and started,
and the second pass (each token's text: UTF-8, stop strings, waking the stream's
readers) runs while the model computes it (``overlap``, in the manner of vLLM's async
scheduling and SGLang's overlap scheduler). Greedy text is the same either way: a step
only ever feeds tokens the first pass has counted. A task whose text reaches a stop
string has one more token computed in the step under way; it is not applied, and the
task's sequence is cleared instead of cached.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import outcome
import trio

from axfs.scheduler import Scheduler, StepPlan
from axfs.swap import SwapSpace
from axfs.task import State, Task
from axfs.timeline import DECODE, PREFILL, Finish
from axfs.trace import Event, Trace
from drivers.base import Driver, DriverError, SeqState, StepAborted

log = logging.getLogger(__name__)

EMA = 0.2  # weight of a new measurement in the scheduler's cost estimates
ABORT_GAP_S = 1.0  # at most one step aborted for a newcomer in this long
HANDOFF_WAIT_S = 0.01  # the trio thread waits at most this long for the step thread to start


@dataclass(slots=True)
class StepResult:
    sampled: dict[int, int] = field(default_factory=dict)  # seq -> token
    records: dict[int, bytes] = field(default_factory=dict)  # seq -> its token's record
    saved: dict[str, SeqState] = field(default_factory=dict)  # task id -> its saved state
    save_s: float = 0.0  # driver time only (writing to swap files is not counted)
    saved_bytes: int = 0
    restore_s: float = 0.0
    restored_bytes: int = 0
    step_s: float = 0.0
    aborted: bool = False
    error: str = ""  # why the step itself failed (the sequences are as before it)


def note_first_token(trace: Trace, task: Task) -> None:
    """The timeline's and the trace's line for a task's first token (every runtime's)."""
    task.mark(Event.FIRST_TOKEN)
    trace.emit(Event.FIRST_TOKEN, task.id, task.uid,
               ms=round((task.first_token_at - task.submitted_at) * 1000, 1))


def note_done(trace: Trace, task: Task, reason: Finish, **extra: object) -> None:
    """The timeline's and the trace's line for a task that generated to its end."""
    task.mark(Event.DONE, reason=reason, tokens=task.num_generated, **extra)
    trace.emit(Event.DONE, task.id, task.uid, reason=reason, tokens=task.num_generated,
               seconds=round(time.time() - task.submitted_at, 3), **extra)


class StepThread:
    """The one thread that runs every step of a model. llama.cpp's CPU backend keeps a
    team of OpenMP threads per calling thread, spinning a while after each step; a step
    called from another thread than the last (trio's thread cache hands out whichever is
    idle, and the last one is not yet back when the next step starts) starts a second
    team while the first still spins: a single stream of the tiny test model stepped
    from two alternating threads ran at 1,123 tok/s, from one at 2,917."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)


class Engine:
    def __init__(self, driver: Driver, scheduler: Scheduler, trace: Trace,
                 swap: SwapSpace | None = None, overlap: bool = True) -> None:
        self.driver = driver
        self.scheduler = scheduler
        self.trace = trace
        self.swap = swap or SwapSpace(512 << 20, None)
        self.overlap = overlap  # publish a step's text while the next step runs
        self._wake = trio.Event()
        self._to_close: list[int] = []  # freed sequence slots to clear before the next step
        self.num_steps = 0
        self.num_tokens = 0
        self.num_aborted = 0
        self._stepping = False
        self._inflight: set[int] = set()  # sequences of the step running now
        self._last_abort = 0.0
        self.on_end: Callable[[Task], None] | None = None  # told of every task that ends
        self._thread: StepThread | None = None  # started with the first step
        self._started = threading.Event()  # set by the step thread as it takes a step

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()

    def wake(self) -> None:
        self._wake.set()

    def add(self, task: Task) -> None:
        self.scheduler.add(task)
        self.wake()
        now = time.monotonic()
        if self._stepping and self.scheduler.is_newcomer(task) and now - self._last_abort > ABORT_GAP_S:
            # A user with nothing running should not wait for a whole batch step.
            self._last_abort = now
            self.driver.abort()

    def end(self, task: Task, state: State, reason: Finish, error: str = "") -> None:
        """Finish ``task`` (if it is not already) and give back its place in the model."""
        if not task.finished:
            self.swap.discard(task.saved)
        task.finish(state, reason, error)
        # Its sequence stays cached for later prompts unless its KV may be wrong: a failed
        # step, or a step still running for it.
        cache = state is not State.FAILED and task.seq not in self._inflight
        self._to_close += self.scheduler.drop(task, cache)
        self.wake()
        if self.on_end is not None:
            self.on_end(task)

    async def run(self) -> None:
        text: list[tuple[Task, int]] = []  # the last step's tokens whose text is not out yet
        while True:
            self.driver.abort(False)
            plan = self.scheduler.schedule()
            if plan.empty and not self._to_close:
                if text:
                    self._publish(text)
                    text = []
                    continue
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            self._announce(plan)
            closed, self._to_close = self._to_close, []
            self._stepping = True
            self._inflight = set(plan.owners)
            try:
                result = await self._step(plan, closed, text)
            except DriverError as e:
                log.warning("step failed: %s", e)
                for task in [*plan.owners.values(), *(t for t, _, _ in plan.preempted)]:
                    self.trace.emit(Event.ERROR, task.id, task.uid, reason=str(e))
                    self.end(task, State.FAILED, Finish.ERROR, f"model error: {e}")
                text = []
                continue
            finally:
                self._stepping = False
                self._inflight = set()
            text = self._apply(plan, result)
            if not self.overlap:
                self._publish(text)
                text = []

    def _announce(self, plan: StepPlan) -> None:
        for task, _, keep in plan.preempted:
            task.mark(Event.PREEMPT, keep_kv=keep)
            self.trace.emit(Event.PREEMPT, task.id, task.uid, cells=task.num_cached if keep else 0,
                            keep_kv="yes" if keep else "no")
        for slot in plan.evicted:
            self.trace.emit(Event.EVICT, seq=slot)
        for adm in plan.admissions:
            task = adm.task
            task.mark(Event.ADMIT, seq=adm.slot, prefix=adm.prefix)
            self.trace.emit(Event.ADMIT, task.id, task.uid, seq=task.seq, kv_cells=task.kv_reserved,
                            prefix=adm.prefix, resumed="yes" if task.saved else "no")

    async def _step(self, plan: StepPlan, closed: list[int], text: list[tuple[Task, int]]
                    ) -> StepResult:
        """Run ``plan`` in the step thread; meanwhile publish the previous step's ``text``.

        The step is handed over before the text is published (trio's ``to_thread``
        would start it only once this task yields), and waited for even when cancelled:
        the driver must not be closed under a running step."""
        await trio.lowlevel.checkpoint_if_cancelled()  # the wait below is shielded
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[StepResult]] = []

        def deliver(result: outcome.Outcome[StepResult]) -> None:
            box.append(result)
            token.run_sync_soon(done.set)

        def job() -> None:
            self._started.set()
            deliver(outcome.capture(self._run, plan, closed))

        if self._thread is None:
            self._thread = StepThread(f"axfs step {self.driver.info.name}")
        self._started.clear()
        self._thread.submit(job)
        # Readers woken by the last step would otherwise take the GIL first, and the step
        # would start only when they are answered: 0.19 ms later a step of the tiny test
        # model, 1.3 ms of Gemma 3 270M at N=8 (docs/benchmarks.md, the hot path).
        self._started.wait(HANDOFF_WAIT_S)
        if text:
            self._publish(text)
        with trio.CancelScope(shield=True):
            await done.wait()
        return box[0].unwrap()

    def _run(self, plan: StepPlan, closed: list[int]) -> StepResult:
        """In the worker thread: set preempted sequences aside, clear freed slots, set up
        new and resumed ones, run the step."""
        result = StepResult()
        start = time.perf_counter()
        for task, seq, keep in plan.preempted:
            state = self.driver.save_seq(seq, keep)
            result.save_s += time.perf_counter() - start
            result.saved_bytes += state.kv_bytes
            result.saved[task.id] = self.swap.put(task.id, state)
            start = time.perf_counter()
        for seq in closed + plan.evicted:
            self.driver.close_seq(seq)
        start = time.perf_counter()
        for adm in plan.admissions:
            task, slot = adm.task, adm.slot
            if adm.adopt:
                self.driver.trim_seq(slot, adm.prefix)
            elif adm.source is not None:
                self.driver.copy_seq(adm.source, slot, adm.prefix)
            if isinstance(task.saved, SeqState):
                back = self.swap.take(task.saved)
                self.driver.restore_seq(slot, back)
                result.restored_bytes += back.kv_bytes
            else:
                self.driver.open_seq(slot, task.sampling())
        result.restore_s = time.perf_counter() - start
        start = time.perf_counter()
        try:
            if plan.pieces:
                result.sampled = self.driver.step(plan.pieces)
                result.records = self.driver.token_records()
        except StepAborted:
            result.aborted = True
        except DriverError as e:
            result.error = str(e) or type(e).__name__
        result.step_s = time.perf_counter() - start
        return result

    def _apply(self, plan: StepPlan, result: StepResult) -> list[tuple[Task, int]]:
        """The first pass over a step's results (see the module's docstring); returns the
        tokens whose text is still to publish."""
        for task, _, _ in plan.preempted:
            task.saved = result.saved.get(task.id)
            if task.finished:  # its text reached a stop string while it was set aside
                self.swap.discard(task.saved)
                task.saved = None
                continue
            where = self.swap.where(task.saved)
            if where:
                self.trace.emit(Event.SWAP_OUT, task.id, task.uid, to=where,
                                bytes=getattr(task.saved, "kv_bytes", 0))
        for task in plan.admitted:
            if self.swap.where(task.saved):
                self.trace.emit(Event.SWAP_IN, task.id, task.uid, cells=task.num_cached)
            task.saved = None
        self._learn(plan, result)
        if result.error:
            self._step_failed(plan, result.error)
            return []
        if len(plan.owners) == 1:
            for task in plan.owners.values():
                task.isolate = False  # it ran alone and the step worked
        if result.aborted:
            self.num_aborted += 1
            self.trace.emit(Event.ABORT_STEP, tokens=plan.num_tokens, ms=round(result.step_s * 1000, 1))
            return []
        self.num_steps += 1
        self.num_tokens += plan.num_tokens
        now = time.time()
        batch = len(plan.pieces)
        grow, charge, is_eog = self.scheduler.kv.blocks.grow, self.scheduler.charge, self.driver.is_eog
        limit = self.scheduler.kv.seq_limit
        sampled, records = result.sampled, result.records
        text: list[tuple[Task, int]] = []
        for piece in plan.pieces:
            seq, n = piece.seq, len(piece.tokens)
            task = plan.owners[seq]
            if task.finished or task.seq != seq:
                continue  # killed while the step ran
            prefill = n > 1 or task.num_cached < len(task.prompt_tokens)
            task.mark_step(PREFILL if prefill else DECODE, batch, n, now)
            task.num_cached += n
            grow(seq, n)
            charge(task, n)
            if prefill:
                self.trace.emit(Event.PREFILL, task.id, task.uid, tokens=n,
                                done=task.num_cached, of=task.num_history)
            token = sampled.get(seq)
            if token is None:
                continue
            first = not task.output_tokens
            task.take(token, now)
            if records and seq in records:
                task.records += records[seq]
            if first:
                note_first_token(self.trace, task)
            ending = task.ends_with(is_eog(token), task.num_history + 1 > limit)
            if not ending:
                text.append((task, token))
                continue
            task.end_with(ending, self.driver.piece(token))
            reason = task.finish_reason or ending
            note_done(self.trace, task, reason)
            self.end(task, task.state, reason)
        return text

    def _publish(self, text: list[tuple[Task, int]]) -> None:
        """The second pass: each token's text, stop strings, one wake-up for each stream."""
        piece = self.driver.piece
        now = time.time()
        for task, token in text:
            if task.finished:
                continue  # killed, or stopped by an earlier token of the same step
            if task.add_piece(piece(token)):
                note_done(self.trace, task, Finish.STOP)
                self.end(task, task.state, Finish.STOP)
            else:
                task.notify(now)

    def _step_failed(self, plan: StepPlan, error: str) -> None:
        """A step failed. Alone in it, the task fails with the reason; with others, each
        of them runs alone next (see Scheduler), so only the one that fails alone fails."""
        owners = [t for t in plan.owners.values() if not t.finished]
        log.warning("step of %d tasks failed: %s", len(owners), error)
        if len(owners) == 1:
            task = owners[0]
            self.trace.emit(Event.ERROR, task.id, task.uid, reason=error)
            self.end(task, State.FAILED, Finish.ERROR, f"model error: {error}")
            return
        self.trace.emit(Event.STEP_ERROR, tasks=len(owners), reason=error)
        for task in owners:
            task.isolate = True

    def _learn(self, plan: StepPlan, result: StepResult) -> None:
        """Refine the scheduler's cost estimates from what this step took."""
        costs = self.scheduler.costs
        if result.saved_bytes:
            costs.save_s_per_byte += EMA * (result.save_s / result.saved_bytes
                                            - costs.save_s_per_byte)
        if result.restored_bytes:
            costs.restore_s_per_byte += EMA * (result.restore_s / result.restored_bytes
                                               - costs.restore_s_per_byte)
        prefill = sum(len(p.tokens) for p in plan.pieces if len(p.tokens) > 1)
        if prefill >= 32 and result.step_s > 0 and not result.aborted:
            costs.prefill_s_per_token += EMA * (result.step_s / plan.num_tokens
                                                - costs.prefill_s_per_token)
