"""A pool of OpenAI-compatible servers serving the same model: it spreads requests by
load and moves a request to another server when its own fails (drivers.openai runs
each attempt).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import trio

from drivers.credentials import Access, tls_context
from drivers.openai import (
    Address,
    Client,
    EndpointFailed,
    EndpointRefused,
    Progress,
    RemoteError,
    Request,
    parse_url,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    """How a request ended: ``finish_reason`` is "stop" (end of text or a stop string) or
    "length" (max_tokens reached); ``tokens`` counts every endpoint's part; ``moves`` is
    how many times the request was resumed after an endpoint failed."""

    finish_reason: str
    tokens: int
    endpoint: str
    moves: int


@dataclass(slots=True)
class EndpointStatus:
    """One endpoint as the pool sees it; ``retry_in_s`` is 0 when it is up or may be
    tried. ``state`` is "up", "down", or why the endpoint is refused: "denied" (it
    answered 401 or 403) or "untrusted" (its certificate failed the check)."""

    url: str
    up: bool
    inflight: int
    served: int
    failures: int
    last_error: str
    retry_in_s: float
    state: str


@dataclass(slots=True)
class Endpoint:
    address: Address
    up: bool = True
    inflight: int = 0
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


class Pool:
    """Endpoints serving the same model; ``complete`` runs a request on the up endpoint
    with the fewest requests in flight (ties in turn) and moves it on when that fails.

    A failed endpoint is down for ``retry_s``; then the next request that picks it tries
    it again. With no endpoint up a request waits for the earliest retry, and fails with
    RemoteError after ``give_up_s`` without a new token; it fails at once when every
    endpoint refused it (401 or 403, or a certificate that failed the check).
    ``timeout_s`` is the longest wait for a connection or for the next byte of an answer.
    ``access`` holds the key and the TLS context (default: no key, the system's CAs).
    ``on_event(kind, fields)`` hears "endpoint_down" (url, reason), "endpoint_up" (url)
    and "move" (from, to, tokens).
    """

    def __init__(self, urls: Sequence[str], model: str = "", retry_s: float = 30.0,
                 timeout_s: float = 60.0, give_up_s: float = 120.0,
                 on_event: Callable[[str, dict[str, str]], None] | None = None,
                 access: Access | None = None) -> None:
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
        self.model = model
        self.retry_s = retry_s
        self.give_up_s = give_up_s
        self._client = Client(access or Access(tls_context()), timeout_s)
        self._on_event = on_event
        self._turn = 0  # where the next tie-break starts

    async def complete(self, req: Request, on_text: Callable[[str], None]) -> Outcome:
        """Run ``req``, calling ``on_text`` with each piece of text as it arrives, across
        endpoints if one fails. RemoteError when the server refuses the request (4xx),
        every endpoint refuses axfs, or no endpoint answers for ``give_up_s``."""
        progress = Progress(req)
        previous: Endpoint | None = None
        while True:
            endpoint = await self._pick(progress)
            if previous is not None:
                progress.moves += 1
                self._emit("move", {"from": previous.url, "to": endpoint.url,
                                    "tokens": str(progress.tokens)})
            finish = await self._run_on(endpoint, progress, on_text)
            if finish is None and progress.tokens_left <= 0:
                finish = "length"  # it broke after the last token
            if finish is not None:
                return Outcome(finish, progress.tokens, endpoint.url, progress.moves)
            if all(e.refused for e in self.endpoints):
                raise RemoteError("; ".join(f"{e.url} {e.refused}: {e.last_error}"
                                            for e in self.endpoints))
            progress.failures += 1
            previous = endpoint

    def status(self) -> list[EndpointStatus]:
        now = time.monotonic()
        return [EndpointStatus(e.url, e.up, e.inflight, e.served, e.failures, e.last_error,
                               0.0 if e.up else max(0.0, e.down_until - now),
                               "up" if e.up else e.refused or "down")
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
        """The ready endpoint with the fewest requests in flight, ties taken in turn."""
        ready = [i for i, e in enumerate(self.endpoints) if e.ready(now)]
        if not ready:
            return None
        least = min(self.endpoints[i].inflight for i in ready)
        n = len(self.endpoints)
        best = min((i for i in ready if self.endpoints[i].inflight == least),
                   key=lambda i: (i - self._turn) % n)
        self._turn = best + 1
        return self.endpoints[best]

    async def _pick(self, progress: Progress) -> Endpoint:
        """An endpoint to try next, waiting for a retry when none is ready."""
        while True:
            now = time.monotonic()
            give_up_at = progress.last_progress + self.give_up_s
            endpoint = self._choose(now)
            # A request that has failed, or has waited, give_up_s since its last token stops.
            if now >= give_up_at and (endpoint is None or progress.failures):
                raise RemoteError(self._no_endpoint_message())
            if endpoint is not None:
                return endpoint
            retry_at = min(e.down_until for e in self.endpoints)
            await trio.sleep(min(retry_at, give_up_at) - now)

    def _no_endpoint_message(self) -> str:
        reasons = "; ".join(f"{e.url}: {e.last_error or 'not tried'}" for e in self.endpoints)
        return f"no endpoint answers: {reasons}"

    # -- one attempt on one endpoint

    async def _run_on(self, endpoint: Endpoint, progress: Progress,
                      on_text: Callable[[str], None]) -> str | None:
        """Stream the request's remainder from ``endpoint``: its finish reason, or None
        when the endpoint failed (it is then down)."""
        endpoint.inflight += 1
        try:
            finish = await self._client.complete(endpoint.address, progress, self.model,
                                                 lambda: self._mark_up(endpoint), on_text)
        except EndpointFailed as e:
            self._mark_down(endpoint, e)
            return None
        finally:
            endpoint.inflight -= 1
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

    def _mark_up(self, endpoint: Endpoint) -> None:
        endpoint.refused = ""
        if not endpoint.up:
            endpoint.up = True
            log.info("endpoint %s is up again", endpoint.url)
            self._emit("endpoint_up", {"url": endpoint.url})

    def _emit(self, kind: str, fields: dict[str, str]) -> None:
        if self._on_event is not None:
            self._on_event(kind, fields)
