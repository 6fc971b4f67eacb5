"""The runtime of a model served elsewhere, by OpenAI-compatible engines (vLLM,
llama-server, Ollama): each task is one streamed ``/v1/completions`` request, spread
over the model's endpoints by drivers.pool, which also moves a task to another
endpoint when its own fails. ``open_remote`` reads the model's key and CA files (named
in models.json, never copied there) off the trio thread.

The remote engine batches and caches on its side, so this runtime only limits how
many requests it has in flight; tokens are counted as the streamed pieces of text,
corrected by the server's own count at the end (drivers.pool.Outcome.tokens).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import trio

from axfs import deadlines, userfiles
from axfs.engine import note_done, note_first_token
from axfs.models import ModelEntry
from axfs.task import State, Task
from axfs.timeline import Finish
from axfs.trace import Event, Trace
from drivers.base import DriverError
from drivers.credentials import Access, read_key, tls_context
from drivers.openai import Request
from drivers.pool import Pool

log = logging.getLogger(__name__)

MAX_INFLIGHT = 256  # requests in flight per model (each is one open connection)


async def open_remote(entry: ModelEntry, trace: Trace) -> RemoteRuntime:
    """The runtime of remote model ``entry``, with its key and TLS context read from the
    files it names (OSError, ValueError or BadInput saying why not)."""
    key = await userfiles.call(read_key, entry.key_file) if entry.key_file else ""
    tls = await userfiles.call(tls_context, entry.ca_file)
    return RemoteRuntime(entry.name, entry.endpoints, trace, access=Access(tls, key))


class RemoteRuntime:
    seq_limit: int | None = None
    sha = ""
    deterministic = False  # the remote engine's batching is not ours to pin down

    def __init__(self, name: str, endpoints: list[str], trace: Trace, retry_s: float = 30.0,
                 max_inflight: int = MAX_INFLIGHT, access: Access | None = None) -> None:
        self.name = name
        self.trace = trace
        self.pool = Pool(endpoints, retry_s=retry_s, on_event=self._event, access=access)
        self.max_inflight = max_inflight
        self.on_end: Callable[[Task], None] | None = None
        self.last_used = time.monotonic()
        self._waiting: deque[Task] = deque()
        self._running: dict[str, trio.CancelScope] = {}
        self._wake = trio.Event()
        self.num_tokens = 0
        self._timers: trio.Nursery | None = None  # deadlines' timers, while it runs
        self.deadlines = deadlines.Tally()

    def _event(self, kind: str, fields: dict[str, str]) -> None:
        self.trace.emit(Event(kind), model=self.name, **fields)

    async def run(self) -> None:
        async with self.pool, trio.open_nursery() as nursery:
            self._timers = nursery
            for task in self._waiting:  # added before it ran
                self._watch(task)
            while True:
                while self._waiting and len(self._running) < self.max_inflight:
                    task = self._waiting.popleft()
                    if not task.finished:
                        scope = trio.CancelScope()
                        self._running[task.id] = scope
                        nursery.start_soon(self._serve, task, scope)
                await self._wake.wait()
                self._wake = trio.Event()

    def add(self, task: Task) -> None:
        self.last_used = time.monotonic()
        self._waiting.append(task)
        self._watch(task)
        self._wake.set()

    def _watch(self, task: Task) -> None:
        """End ``task`` at its deadline, if it has one (axfs.deadlines)."""
        if task.config.deadline > 0 and self._timers is not None:
            self._timers.start_soon(deadlines.watch, task, self.end, self.trace)

    async def _serve(self, task: Task, scope: trio.CancelScope) -> None:
        config = task.config
        request = Request(prompt=task.text_for_model, max_tokens=config.max_tokens,
                          temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                          seed=config.seed, stop=tuple(config.stop),
                          grammar=config.output_grammar)
        task.start(-1, 0)
        task.mark(Event.ADMIT, remote="yes")
        self.trace.emit(Event.ADMIT, task.id, task.uid, model=self.name, remote="yes")

        def on_text(text: str) -> None:
            first = not task.output_tokens
            task.add_text(text)
            self.num_tokens += 1
            if first:
                note_first_token(self.trace, task)

        with scope:
            try:
                outcome = await self.pool.complete(request, on_text)
            except DriverError as e:
                self.trace.emit(Event.ERROR, task.id, task.uid, reason=str(e))
                self.end(task, State.FAILED, Finish.ERROR, f"remote error: {e}")
                return
            finally:
                self._running.pop(task.id, None)
                self._wake.set()
            # Pieces of text are not always one token each; the server's count is right.
            missing = outcome.tokens - len(task.output_tokens)
            if missing > 0:
                task.output_tokens += [-1] * missing
                self.num_tokens += missing
            reason = Finish.LENGTH if outcome.finish_reason == "length" else Finish.STOP
            note_done(self.trace, task, reason, endpoint=outcome.endpoint, moves=outcome.moves)
            self.end(task, State.DONE, reason)

    def end(self, task: Task, state: State, reason: Finish, error: str = "") -> None:
        scope = self._running.pop(task.id, None)
        if scope is not None:
            scope.cancel()  # closes the connection: the server stops generating
        if task in self._waiting:
            self._waiting.remove(task)
        task.finish(state, reason, error)
        self.deadlines.count(task)
        self.last_used = time.monotonic()
        self._wake.set()
        if self.on_end is not None:
            self.on_end(task)

    def tokenize(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        return []  # the remote engine tokenizes

    def piece(self, token: int) -> bytes:
        return b""

    def is_eog(self, token: int) -> bool:
        return False

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def active(self) -> int:
        return self.num_running + self.num_waiting

    def close(self) -> None:
        for scope in self._running.values():
            scope.cancel()
