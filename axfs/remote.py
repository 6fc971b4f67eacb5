"""The runtime of a model served elsewhere, by OpenAI-compatible engines (vLLM,
llama-server, Ollama): each task is one streamed request (``/v1/completions``, or
``/v1/chat/completions`` for a chat the server templates), sent to one of the model's
endpoints by drivers.pool, which also moves it to another endpoint when its own fails.
``open_remote`` reads the model's key and CA files (named in models.json, never copied
there) off the trio thread.

The queue stays here (axfs.remotequeue): an endpoint gets as many requests at once as it
has slots (drivers.pool), and the other tasks wait in this runtime, in the order of the
mount's policy. A task that gives its slot up to another user's (or is brought back by
the journal after a restart) is sent again later from its prompt plus the text it has:
its stream goes on with nothing lost or repeated.

Tokens are counted as the streamed pieces of text, corrected by the server's own count
at the end (drivers.pool.Outcome); the policy and the quotas are charged those, and the
prompt tokens the server read (less those its cache held) when the task ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from axfs import deadlines, userfiles
from axfs.engine import note_done, note_first_token
from axfs.models import ModelEntry
from axfs.policy import Policy, make_policy
from axfs.remotequeue import RemoteQueue
from axfs.task import State, Task
from axfs.timeline import Finish
from axfs.trace import Event, Trace
from drivers.base import DriverError
from drivers.credentials import Access, read_key, tls_context
from drivers.pool import Endpoint, Pool
from drivers.request import Progress, Request

log = logging.getLogger(__name__)

PROBE_WAIT_S = 1.0  # the longest the first tasks wait for the servers to say their slots


async def open_remote(entry: ModelEntry, trace: Trace, policy: str = "fair") -> RemoteRuntime:
    """The runtime of remote model ``entry``, with its key and TLS context read from the
    files it names (OSError, ValueError or BadInput saying why not)."""
    key = await userfiles.call(read_key, entry.key_file) if entry.key_file else ""
    tls = await userfiles.call(tls_context, entry.ca_file)
    return RemoteRuntime(entry.name, entry.endpoints, trace, make_policy(policy),
                         [entry.slots.get(url, 0) for url in entry.endpoints],
                         access=Access(tls, key))


@dataclass(slots=True, eq=False)
class Sent:
    """A task's request in flight: its scope (cancelled to stop it), the endpoint it is
    on now and what it has received."""

    task: Task
    scope: trio.CancelScope
    endpoint: Endpoint
    progress: Progress


class RemoteRuntime:
    seq_limit: int | None = None
    sha = ""
    deterministic = False  # the remote engine's batching is not ours to pin down

    def __init__(self, name: str, endpoints: list[str], trace: Trace, policy: Policy | None = None,
                 slots: Sequence[int] = (), retry_s: float = 30.0, give_up_s: float = 120.0,
                 access: Access | None = None) -> None:
        self.name = name
        self.trace = trace
        self.pool = Pool(endpoints, retry_s=retry_s, give_up_s=give_up_s, on_event=self._event,
                         access=access, slots=slots)
        self.queue = RemoteQueue(policy or make_policy("fair"))
        self.policy = self.queue.policy
        self.on_end: Callable[[Task], None] | None = None
        self.last_used = time.monotonic()
        self._sent: dict[str, Sent] = {}  # task id -> its request in flight
        self._counts: dict[str, Progress] = {}  # task id -> its last request: moves, server counts
        self._wake = trio.Event()
        self.num_tokens = 0
        self._nursery: trio.Nursery | None = None  # requests' and deadlines' tasks, while it runs
        self.deadlines = deadlines.Tally()

    def _event(self, kind: str, fields: dict[str, str]) -> None:
        self.trace.emit(Event(kind), model=self.name, **fields)
        if kind == Event.ENDPOINT_UP and self._nursery is not None:
            self._nursery.start_soon(self._probe, fields["url"])  # it may have restarted

    async def _probe(self, url: str) -> None:
        await self.pool.probe(url)
        self._wake.set()

    async def _probe_all(self, done: trio.Event) -> None:
        await self.pool.probe()
        done.set()
        self._wake.set()

    async def run(self) -> None:
        async with self.pool, trio.open_nursery() as nursery:
            self._nursery = nursery
            for task in self.queue.waiting:  # added before it ran
                self._watch(task)
            probed = trio.Event()
            nursery.start_soon(self._probe_all, probed)
            with trio.move_on_after(PROBE_WAIT_S):  # a hung server's slots are not waited for
                await probed.wait()
            while True:
                self._dispatch()
                with trio.move_on_at(self.pool.next_retry()):
                    await self._wake.wait()
                self._wake = trio.Event()

    def add(self, task: Task) -> None:
        self.last_used = time.monotonic()
        task.remote = True
        self.queue.add(task)
        self._watch(task)
        self._wake.set()

    def _watch(self, task: Task) -> None:
        """End ``task`` at its deadline, if it has one (axfs.deadlines)."""
        if task.config.deadline > 0 and self._nursery is not None:
            self._nursery.start_soon(deadlines.watch, task, self.end, self.trace)

    # -- the queue

    def _dispatch(self) -> None:
        """Send the best-ranked waiting tasks while a slot is free; then, every slot held,
        stop tasks of users over their share for those of users under it. When no
        endpoint has answered for the pool's give_up_s, the waiting tasks fail."""
        why = self.pool.given_up()
        for task in list(self.queue.waiting) if why else []:
            self.trace.emit(Event.ERROR, task.id, task.uid, reason=why)
            self.end(task, State.FAILED, Finish.ERROR, f"remote error: {why}")
        for task in self.queue.ranked_waiting() if self.pool.room() > 0 else []:
            endpoint = self.pool.claim() if self.pool.room() > 0 else None
            if endpoint is None:
                break
            self._send(task, endpoint)
        while (swap := self.queue.rebalance(self.pool.capacity())) is not None:
            victim, claimant = swap
            self._send(claimant, self.pool.hand_on(self._stop(victim)))

    def _send(self, task: Task, endpoint: Endpoint) -> None:
        assert self._nursery is not None
        self.queue.start(task)
        counts = self._counts.get(task.id)
        progress = Progress(self._request(task), [task.output.decode("utf-8", "replace")]
                            if task.output else [], tokens=task.num_generated)
        if counts is not None:
            progress.moves, progress.prompt_tokens = counts.moves, counts.prompt_tokens
            progress.cached_tokens = counts.cached_tokens
        self._counts[task.id] = progress
        sent = self._sent[task.id] = Sent(task, trio.CancelScope(), endpoint, progress)
        resumed = "yes" if task.output_tokens else "no"
        task.start(-1, 0)
        task.mark(Event.ADMIT, remote="yes", endpoint=endpoint.url, resumed=resumed)
        self.trace.emit(Event.ADMIT, task.id, task.uid, model=self.name, remote="yes",
                        endpoint=endpoint.url, resumed=resumed)
        self._nursery.start_soon(self._serve, sent)

    def _stop(self, task: Task) -> Endpoint:
        """Stop ``task``'s request (its connection closes: the server stops) and queue it
        again; the endpoint whose slot it held."""
        sent = self._sent.pop(task.id)
        sent.scope.cancel()
        self.queue.preempt(task)
        task.preempt(keep_kv=True)
        task.mark(Event.PREEMPT, remote="yes", endpoint=sent.endpoint.url, tokens=task.num_generated)
        self.trace.emit(Event.PREEMPT, task.id, task.uid, model=self.name, remote="yes",
                        endpoint=sent.endpoint.url, tokens=task.num_generated)
        return sent.endpoint

    @staticmethod
    def _request(task: Task) -> Request:
        config = task.config
        return Request(prompt=task.text_for_model, max_tokens=config.max_tokens,
                       temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                       seed=config.seed, stop=tuple(config.stop), grammar=config.output_grammar,
                       messages=tuple(task.turns), min_p=config.min_p,
                       repeat_penalty=config.repeat_penalty, repeat_last_n=config.repeat_last_n,
                       presence_penalty=config.presence_penalty,
                       frequency_penalty=config.frequency_penalty)

    # -- one request

    async def _serve(self, sent: Sent) -> None:
        task, progress = sent.task, sent.progress
        if progress.tokens_left <= 0:  # restored with every token it may have
            note_done(self.trace, task, Finish.LENGTH, endpoint="-")
            self.end(task, State.DONE, Finish.LENGTH)
            return
        progress.last_progress = time.monotonic()  # its wait in the queue is not the server's

        def on_text(text: str) -> None:
            if self._sent.get(task.id) is not sent:
                return  # a stopped request's last buffered chunks: its text is not the task's
            first = not task.output_tokens
            task.add_text(text)
            self._charge(task, 1)
            if first:
                note_first_token(self.trace, task)

        def on_move(fields: dict[str, str]) -> None:
            sent.endpoint = self.pool.endpoint(fields["to"])
            task.mark(Event.MOVE, **fields)
            self.trace.emit(Event.MOVE, task.id, task.uid, model=self.name, **fields)

        with sent.scope:
            try:
                outcome = await self.pool.resume(progress, on_text, sent.endpoint, on_move)
            except DriverError as e:
                self.trace.emit(Event.ERROR, task.id, task.uid, reason=str(e))
                self.end(task, State.FAILED, Finish.ERROR, f"remote error: {e}")
                return
            finally:
                if self._sent.get(task.id) is sent:
                    del self._sent[task.id]
                self._wake.set()
            # Pieces of text are not always one token each; the server's count is right.
            missing = outcome.tokens - len(task.output_tokens)
            if missing > 0:
                task.output_tokens += [-1] * missing
                self._charge(task, missing)
            self._charge(task, outcome.prompt_tokens - outcome.cached_tokens, generated=False)
            reason = Finish.LENGTH if outcome.finish_reason == "length" else Finish.STOP
            note_done(self.trace, task, reason, endpoint=outcome.endpoint, moves=outcome.moves,
                      server_prompt_tokens=outcome.prompt_tokens,
                      server_cached_tokens=outcome.cached_tokens)
            self.end(task, State.DONE, reason)

    def _charge(self, task: Task, tokens: int, generated: bool = True) -> None:
        """Account ``tokens`` the server ran for ``task``: its policy, its quota."""
        if tokens <= 0:
            return
        task.num_processed += tokens
        self.policy.charge(task, tokens)
        if generated:
            self.num_tokens += tokens

    def end(self, task: Task, state: State, reason: Finish, error: str = "") -> None:
        sent = self._sent.pop(task.id, None)
        if sent is not None:
            sent.scope.cancel()  # closes the connection: the server stops generating
        self.queue.drop(task)
        self._counts.pop(task.id, None)
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
        return len(self.queue.running)

    @property
    def num_waiting(self) -> int:
        return len(self.queue.waiting)

    def active(self) -> int:
        return self.num_running + self.num_waiting

    def close(self) -> None:
        for sent in self._sent.values():
            sent.scope.cancel()
