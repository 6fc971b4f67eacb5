"""A pool of OpenAI-compatible servers serving the same model: it knows how many requests
each runs at once (its slots), gives out those slots, and moves a request to another
server when its own fails (drivers.openai runs each attempt).

An endpoint's slots are what ``slots=N`` set, else what the server says (llama-server's
``/props`` or ``/slots``: ``probe``), else DEFAULT_SLOTS. A request holds a slot while
it runs: axfs.remote takes one with ``claim`` before it sends a task, so that no more
requests reach a server than it runs and the rest wait in axfs's queue; ``complete``
takes one itself, waiting while every slot is held.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import trio

from drivers.credentials import Access, tls_context
from drivers.openai import Address, Client, EndpointFailed, EndpointRefused, RemoteError, parse_url
from drivers.request import Progress, Request

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 4  # requests at once to an endpoint whose server does not say (vLLM, Ollama)
Moved = Callable[[dict[str, str]], None]  # hears a move: from, to, tokens


@dataclass(slots=True)
class Outcome:
    """How a request ended: ``finish_reason`` is "stop" (end of text or a stop string) or
    "length" (max_tokens reached); ``tokens`` counts every endpoint's part; ``moves`` is
    how many times the request was resumed after an endpoint failed; ``prompt_tokens``
    and ``cached_tokens`` are the servers' counts (Progress)."""

    finish_reason: str
    tokens: int
    endpoint: str
    moves: int
    prompt_tokens: int = field(default=0, compare=False)
    cached_tokens: int = field(default=0, compare=False)


@dataclass(slots=True)
class EndpointStatus:
    """One endpoint as the pool sees it; ``retry_in_s`` is 0 when it is up or may be
    tried. ``state`` is "up", "down", or why the endpoint is refused: "denied" (it
    answered 401 or 403) or "untrusted" (its certificate failed the check).
    ``slots_from`` says where ``slots`` came from: "set", "server" or "default"."""

    url: str
    up: bool
    inflight: int
    served: int
    failures: int
    last_error: str
    retry_in_s: float
    state: str
    slots: int
    slots_from: str


@dataclass(slots=True)
class Endpoint:
    address: Address
    slots: int = DEFAULT_SLOTS
    slots_from: str = "default"
    up: bool = True
    inflight: int = 0  # slots held
    served: int = 0
    failures: int = 0
    last_error: str = ""
    refused: str = ""  # EndpointRefused.state of its last failure, "" when it was not refused
    down_until: float = 0.0  # time.monotonic() after which a down endpoint may be tried

    @property
    def url(self) -> str:
        return self.address.url

    def ready(self, now: float) -> bool:
        return self.up or now >= self.down_until

    def room(self, now: float) -> int:
        """Slots free now (none while it is down)."""
        return max(0, self.slots - self.inflight) if self.ready(now) else 0


class Pool:
    """Endpoints serving the same model; ``complete`` runs a request on the ready endpoint
    with the most free slots (ties in turn) and moves it on when that fails.

    A failed endpoint is down for ``retry_s``; then the next request that picks it tries
    it again. With no endpoint up a request waits for the earliest retry, and fails with
    RemoteError after ``give_up_s`` without a new token; it fails at once when every
    endpoint refused it (401 or 403, or a certificate that failed the check). A request
    waiting for a slot waits as long as it takes.
    ``timeout_s`` is the longest wait for a connection or for the next byte of an answer.
    ``access`` holds the key and the TLS context (default: no key, the system's CAs).
    ``slots`` are the endpoints' slots as set (0: ask the server).
    ``on_event(kind, fields)`` hears "endpoint_down" (url, reason), "endpoint_up" (url)
    and, for ``complete``, "move" (from, to, tokens).
    """

    def __init__(self, urls: Sequence[str], model: str = "", retry_s: float = 30.0,
                 timeout_s: float = 60.0, give_up_s: float = 120.0,
                 on_event: Callable[[str, dict[str, str]], None] | None = None,
                 access: Access | None = None, slots: Sequence[int] = ()) -> None:
        if isinstance(urls, str):
            raise ValueError("urls must be a list of urls, not one string")
        if not urls:
            raise ValueError("a pool needs at least one endpoint url")
        if retry_s < 0 or timeout_s <= 0 or give_up_s < 0:
            raise ValueError("retry_s and give_up_s must be 0 or more, timeout_s more than 0")
        addresses = [parse_url(url) for url in urls]
        if len(set(addresses)) < len(addresses):
            raise ValueError(f"an endpoint is listed twice: {', '.join(a.url for a in addresses)}")
        self.endpoints = [Endpoint(a) for a in addresses]
        for endpoint, n in zip(self.endpoints, slots, strict=False):
            if n > 0:
                endpoint.slots, endpoint.slots_from = n, "set"
        self.model = model
        self.retry_s = retry_s
        self.give_up_s = give_up_s
        self._client = Client(access or Access(tls_context()), timeout_s)
        self._on_event = on_event
        self._turn = 0  # where the next tie-break starts
        self._freed = trio.Event()  # set when a slot may have come free
        self._picking = 0  # requests waiting in _pick for a slot
        self._all_down_at = math.inf  # when the last endpoint up went down

    async def complete(self, req: Request, on_text: Callable[[str], None]) -> Outcome:
        """Run ``req``, calling ``on_text`` with each piece of text as it arrives, across
        endpoints if one fails. RemoteError when the server refuses the request (4xx),
        every endpoint refuses axfs, or no endpoint answers for ``give_up_s``."""
        return await self.resume(Progress(req), on_text, on_move=lambda f: self._emit("move", f))

    async def resume(self, progress: Progress, on_text: Callable[[str], None],
                     claimed: Endpoint | None = None, on_move: Moved | None = None) -> Outcome:
        """``complete`` for the rest of ``progress``'s request, on the slot ``claimed`` (taken
        by ``claim``; given back however this ends) or one it waits for; ``on_move`` hears
        each move to another endpoint."""
        endpoint = claimed or await self._pick(progress)
        while True:
            finish = await self._run_on(endpoint, progress, on_text)
            if finish is None and progress.tokens_left <= 0:
                finish = "length"  # it broke after the last token
            if finish is not None:
                return Outcome(finish, progress.tokens, endpoint.url, progress.moves,
                               progress.prompt_tokens, progress.cached_tokens)
            if all(e.refused for e in self.endpoints):
                raise RemoteError(self._refused_message())
            progress.failures += 1
            previous = endpoint
            endpoint = await self._pick(progress)
            progress.moves += 1
            if on_move is not None:
                on_move({"from": previous.url, "to": endpoint.url, "tokens": str(progress.tokens)})

    # -- slots

    def room(self) -> int:
        """Requests that may start now: the free slots of the endpoints that may be tried,
        less those that requests waiting in the pool (moving) will take."""
        now = time.monotonic()
        return sum(e.room(now) for e in self.endpoints) - self._picking

    def capacity(self) -> int:
        """The slots of the endpoints that may be tried now."""
        now = time.monotonic()
        return sum(e.slots for e in self.endpoints if e.ready(now))

    def next_retry(self) -> float:
        """When (time.monotonic()) the next down endpoint may be tried, or the pool gives
        up on them (inf: none is down)."""
        now = time.monotonic()
        retries = [e.down_until for e in self.endpoints if not e.ready(now)]
        return min([*retries, self._all_down_at + self.give_up_s])

    def given_up(self) -> str:
        """Why requests that wait for a slot fail now: every endpoint refused axfs, or has
        been down for ``give_up_s`` ("": they wait on)."""
        if all(e.refused for e in self.endpoints):
            return self._refused_message()
        if time.monotonic() < self._all_down_at + self.give_up_s:
            return ""
        return self._no_endpoint_message()

    def claim(self) -> Endpoint | None:
        """Take a slot for a request on the ready endpoint with the most free slots, ties
        in turn (None when none has one); ``resume`` gives it back."""
        endpoint = self._choose(time.monotonic())
        if endpoint is not None:
            endpoint.inflight += 1
        return endpoint

    def hand_on(self, endpoint: Endpoint) -> Endpoint:
        """Take the slot on ``endpoint`` of a request just stopped, which gives it back
        only as it unwinds (its connection closes then)."""
        endpoint.inflight += 1
        return endpoint

    def endpoint(self, url: str) -> Endpoint:
        return next(e for e in self.endpoints if e.url == url)

    def _release(self, endpoint: Endpoint) -> None:
        endpoint.inflight -= 1
        self._freed.set()
        self._freed = trio.Event()

    async def probe(self, url: str = "") -> None:
        """Ask the servers (at ``url``; "": every one) how many requests they run at once,
        for those whose slots were not set (drivers.openai.Client.slots)."""
        async with trio.open_nursery() as nursery:
            for endpoint in self.endpoints:
                if endpoint.slots_from != "set" and url in ("", endpoint.url):
                    nursery.start_soon(self._probe, endpoint)

    async def _probe(self, endpoint: Endpoint) -> None:
        n = await self._client.slots(endpoint.address)
        if n is not None and endpoint.slots_from != "set":
            endpoint.slots, endpoint.slots_from = n, "server"
            self._freed.set()
            self._freed = trio.Event()

    def status(self) -> list[EndpointStatus]:
        now = time.monotonic()
        return [EndpointStatus(e.url, e.up, e.inflight, e.served, e.failures, e.last_error,
                               0.0 if e.up else max(0.0, e.down_until - now),
                               "up" if e.up else e.refused or "down", e.slots, e.slots_from)
                for e in self.endpoints]

    async def aclose(self) -> None:
        """Close the connections kept for the next requests."""
        await self._client.aclose()

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    # -- choosing an endpoint

    def _choose(self, now: float) -> Endpoint | None:
        """The ready endpoint with the most free slots, ties taken in turn; None if none
        has a free slot."""
        rooms = [e.room(now) for e in self.endpoints]
        most = max(rooms)
        if most <= 0:
            return None
        n = len(self.endpoints)
        best = min((i for i in range(n) if rooms[i] == most), key=lambda i: (i - self._turn) % n)
        self._turn = best + 1
        return self.endpoints[best]

    async def _pick(self, progress: Progress) -> Endpoint:
        """A slot for the request's next attempt (claimed), waiting for a retry when no
        endpoint is ready and for a free slot when every ready one is full."""
        self._picking += 1
        try:
            while True:
                now = time.monotonic()
                give_up_at = progress.last_progress + self.give_up_s
                ready = any(e.ready(now) for e in self.endpoints)
                endpoint = self._choose(now)
                # A request that has failed, or has waited, give_up_s since its last token
                # stops; one waiting only for a slot waits on.
                if now >= give_up_at and (not ready or (progress.failures and endpoint is not None)):
                    raise RemoteError(self._no_endpoint_message())
                if endpoint is not None:
                    endpoint.inflight += 1
                    return endpoint
                wake = [e.down_until for e in self.endpoints if not e.ready(now)]
                wake += [give_up_at] if give_up_at > now else []
                with trio.move_on_at(min(wake, default=math.inf)):
                    await self._freed.wait()
        finally:
            self._picking -= 1

    def _refused_message(self) -> str:
        return "; ".join(f"{e.url} {e.refused}: {e.last_error}" for e in self.endpoints)

    def _no_endpoint_message(self) -> str:
        reasons = "; ".join(f"{e.url}: {e.last_error or 'not tried'}" for e in self.endpoints)
        return f"no endpoint answers: {reasons}"

    # -- one attempt on one endpoint

    async def _run_on(self, endpoint: Endpoint, progress: Progress,
                      on_text: Callable[[str], None]) -> str | None:
        """Stream the request's remainder from ``endpoint``, whose slot it holds (given
        back here): its finish reason, or None when the endpoint failed (it is then down)."""
        try:
            finish = await self._client.complete(endpoint.address, progress, self.model,
                                                 lambda: self._mark_up(endpoint), on_text)
        except EndpointFailed as e:
            self._mark_down(endpoint, e)
            return None
        finally:
            self._release(endpoint)
        endpoint.served += 1
        return finish

    # -- bookkeeping

    def _mark_down(self, endpoint: Endpoint, failure: EndpointFailed) -> None:
        reason = failure.reason
        endpoint.failures += 1
        endpoint.last_error = reason
        endpoint.refused = failure.state if isinstance(failure, EndpointRefused) else ""
        endpoint.down_until = time.monotonic() + self.retry_s
        if endpoint.up:
            endpoint.up = False
            log.warning("endpoint %s is down: %s", endpoint.url, reason)
            self._emit("endpoint_down", {"url": endpoint.url, "reason": reason})
            if not any(e.up for e in self.endpoints):
                self._all_down_at = time.monotonic()

    def _mark_up(self, endpoint: Endpoint) -> None:
        endpoint.refused = ""
        self._all_down_at = math.inf
        if not endpoint.up:
            endpoint.up = True
            log.info("endpoint %s is up again", endpoint.url)
            self._emit("endpoint_up", {"url": endpoint.url})

    def _emit(self, kind: str, fields: dict[str, str]) -> None:
        if self._on_event is not None:
            self._on_event(kind, fields)
