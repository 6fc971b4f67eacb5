"""A client for OpenAI-compatible completion servers (llama-server, vLLM, Ollama), and a
pool of such servers that spreads requests by load and moves a request to another
server when its own fails.

One request is one streamed ``POST /v1/completions`` on its own connection: plain
HTTP/1.1 over trio's sockets, the answer read as server-sent events until
``data: [DONE]`` or a ``finish_reason``. Closing the connection is how a request is
stopped: the server notices and stops generating.

Tokens are counted as the streamed chunks that carry a choice (llama-server and vLLM
stream one token per chunk), not counting a closing chunk that has only a
``finish_reason``; when the server reports ``usage.completion_tokens`` at the end (as
llama-server does) that number replaces the count of the chunks it finished. A count
from chunks can be low: llama-server holds back a token that ends inside a UTF-8
character and sends it with the next one.

A request moved to another endpoint goes on from the text received so far (the prompt
and that text as the new prompt, the tokens left as max_tokens), so a stop string cut in
two by the move is not seen.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from drivers.base import DriverError

log = logging.getLogger(__name__)

COMPLETIONS_PATH = "/v1/completions"
MAX_LINE = 65536  # longest status or header line or chunk-size line we accept
MAX_ERROR_BODY = 65536  # bytes of an error answer read for its message


class RemoteError(DriverError):
    """A remote request failed for good (the message says why, in words)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One completion to run remotely. temperature 0 means greedy; seed -1 means random."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int = -1
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")


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
    """One endpoint as the pool sees it; ``retry_in_s`` is 0 when it is up or may be tried."""

    url: str
    up: bool
    inflight: int
    served: int
    failures: int
    last_error: str
    retry_in_s: float


# -- urls ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Address:
    """Where an endpoint listens; ``url`` is its normalised base, ``http://host:port``."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host_header}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(url: str) -> Address:
    """``http://host[:port]`` with an optional trailing ``/`` or ``/v1``; port 80 when
    left out. Anything else is a ValueError that says what is accepted."""
    expected = f"{url!r} is not an endpoint url: expected http://HOST:PORT (optionally ending in /v1)"
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port or 80
    except ValueError as e:
        raise ValueError(f"{expected}: {e}") from None
    if parts.scheme != "http":
        raise ValueError(f"{expected}: only plain http is supported")
    if not parts.hostname:
        raise ValueError(f"{expected}: no host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{expected}: no user, query or fragment")
    if parts.path.rstrip("/") not in ("", "/v1"):
        raise ValueError(f"{expected}: no path other than /v1")
    return Address(parts.hostname, port)


# -- HTTP/1.1 on a trio stream -------------------------------------------------------------

class EndpointFailed(Exception):
    """The endpoint failed (no connection, no answer in time, 5xx, a broken stream): the
    request may go on elsewhere. ``reason`` says why, in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Reader:
    """Buffered reads from a stream; waiting more than ``timeout_s`` for a byte, or the
    connection breaking, is EndpointFailed."""

    def __init__(self, stream: trio.abc.ReceiveStream, timeout_s: float) -> None:
        self._stream = stream
        self._timeout_s = timeout_s
        self._buf = bytearray()

    async def _fill(self) -> bool:
        """Read more into the buffer; False at the end of the connection."""
        try:
            with trio.fail_after(self._timeout_s):
                data = await self._stream.receive_some(65536)
        except trio.TooSlowError:
            raise EndpointFailed(f"no answer for {self._timeout_s:g} s") from None
        except (OSError, trio.BrokenResourceError) as e:
            raise EndpointFailed(f"connection lost: {_words(e)}") from None
        self._buf += data
        return bool(data)

    async def line(self) -> bytes:
        """The next line, without its CRLF."""
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_LINE:
                raise EndpointFailed("a header line is too long")
            if not await self._fill():
                raise EndpointFailed("the connection closed mid-answer")
        line = bytes(self._buf[:end]).rstrip(b"\r")
        del self._buf[:end + 1]
        return line

    async def exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                raise EndpointFailed("the connection closed mid-answer")
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def some(self, most: int) -> bytes:
        """Up to ``most`` bytes, at least one; b"" at the end of the connection."""
        if not self._buf and not await self._fill():
            return b""
        data = bytes(self._buf[:most])
        del self._buf[:most]
        return data


@dataclass(slots=True)
class Head:
    status: int
    headers: dict[str, str]  # names in lower case


async def read_head(reader: Reader) -> Head:
    """The status line and headers of the answer (1xx interim answers skipped)."""
    while True:
        words = (await reader.line()).decode("latin-1").split(None, 2)
        if len(words) < 2 or not words[0].startswith("HTTP/") or not words[1].isdigit():
            raise EndpointFailed(f"not an HTTP answer: {' '.join(words)[:80]!r}")
        headers: dict[str, str] = {}
        while line := (await reader.line()).decode("latin-1"):
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if not 100 <= int(words[1]) < 200:
            return Head(int(words[1]), headers)


class Body:
    """The body of an answer as it arrives: chunked, Content-Length or up to the close."""

    def __init__(self, reader: Reader, headers: dict[str, str]) -> None:
        self._reader = reader
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length", "")
        if not self._chunked and length and not length.isdigit():
            raise EndpointFailed(f"bad Content-Length {length!r}")
        self._left = int(length) if length and not self._chunked else None
        self._done = False

    async def read(self) -> bytes:
        """The next bytes of the body; b"" at its end. A body cut short is EndpointFailed."""
        if self._done:
            return b""
        if self._chunked:
            data = await self._chunk()
        elif self._left is not None:
            data = await self._reader.some(self._left) if self._left else b""
            if self._left and not data:
                raise EndpointFailed("the connection closed mid-answer")
            self._left -= len(data)
        else:
            data = await self._reader.some(65536)
        self._done = not data
        return data

    async def _chunk(self) -> bytes:
        size_line = (await self._reader.line()).split(b";")[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise EndpointFailed(f"bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            while await self._reader.line():  # trailers, up to the blank line
                pass
            return b""
        data = await self._reader.exactly(size)
        if await self._reader.line():
            raise EndpointFailed("a chunk is longer than its size")
        return data

    async def read_all(self, most: int) -> bytes:
        """The rest of the body, cut at ``most`` bytes."""
        data = bytearray()
        while len(data) < most and (piece := await self.read()):
            data += piece
        return bytes(data[:most])


class EventStream:
    """Server-sent events from bytes fed as they come: ``feed`` returns each finished
    event as (field, data), field "data" or "error" (llama-server's error events)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        self._buf += data
        events: list[tuple[str, str]] = []
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end]).rstrip(b"\r").decode("utf-8", "replace")
            del self._buf[:end + 1]
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if not line and self._data:
                events.append(("data", "\n".join(self._data)))
                self._data = []
            elif name == "data":
                self._data.append(value)
            elif name == "error":
                events.append(("error", value))
        return events


def request_bytes(address: Address, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    head = (f"POST {COMPLETIONS_PATH} HTTP/1.1\r\n"
            f"Host: {address.host_header}\r\n"
            "User-Agent: axfs\r\n"
            "Accept: text/event-stream\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


async def connect(address: Address, timeout_s: float) -> trio.SocketStream:
    try:
        with trio.fail_after(timeout_s):
            return await trio.open_tcp_stream(address.host, address.port)
    except trio.TooSlowError:
        raise EndpointFailed(f"cannot connect: no answer for {timeout_s:g} s") from None
    except OSError as e:
        raise EndpointFailed(f"cannot connect: {_words(e)}") from None


async def send(stream: trio.SocketStream, data: bytes, timeout_s: float) -> None:
    try:
        with trio.fail_after(timeout_s):
            await stream.send_all(data)
    except trio.TooSlowError:
        raise EndpointFailed(f"the request was not taken in {timeout_s:g} s") from None
    except (OSError, trio.BrokenResourceError) as e:
        raise EndpointFailed(f"connection lost: {_words(e)}") from None


def error_message(body: bytes) -> str:
    """The server's words from an error answer: OpenAI's {"error": {"message"}}, a bare
    {"error": "..."}, or the body's text."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str) and error:
        return error
    return body.decode("utf-8", "replace").strip()[:500] or "no message"


def _words(e: BaseException) -> str:
    """An OS error in words: "Connection refused" rather than "[Errno 111] ..."."""
    if isinstance(e, OSError) and e.errno and e.errno > 0:  # not a resolver error (< 0)
        return os.strerror(e.errno)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, BaseExceptionGroup):  # trio's connect: one error per address tried
        return "; ".join(dict.fromkeys(_words(sub) for sub in e.exceptions))
    if e.__cause__ is not None:
        return _words(e.__cause__)
    return str(e) or type(e).__name__


# -- the pool -------------------------------------------------------------------------------

@dataclass(slots=True)
class Endpoint:
    address: Address
    up: bool = True
    inflight: int = 0
    served: int = 0
    failures: int = 0
    last_error: str = ""
    down_until: float = 0.0  # time.monotonic() after which a down endpoint may be tried

    @property
    def url(self) -> str:
        return self.address.url

    def ready(self, now: float) -> bool:
        return self.up or now >= self.down_until


@dataclass(slots=True)
class Progress:
    """What a request has received so far, across endpoints."""

    request: Request
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    moves: int = 0
    failures: int = 0  # attempts that failed
    last_progress: float = field(default_factory=time.monotonic)

    @property
    def tokens_left(self) -> int:
        return self.request.max_tokens - self.tokens

    def payload(self, model: str) -> dict[str, Any]:
        """The request's JSON, resuming after what has been received."""
        req = self.request
        payload: dict[str, Any] = {
            "prompt": req.prompt + "".join(self.text), "max_tokens": self.tokens_left,
            "temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p,
            "seed": req.seed, "stop": list(req.stop), "stream": True}
        if model:
            payload["model"] = model
        return payload


class Pool:
    """Endpoints serving the same model; ``complete`` runs a request on the up endpoint
    with the fewest requests in flight (ties in turn) and moves it on when that fails.

    A failed endpoint is down for ``retry_s``; then the next request that picks it tries
    it again. With no endpoint up a request waits for the earliest retry, and fails with
    RemoteError after ``give_up_s`` without a new token. ``timeout_s`` is the longest wait
    for a connection or for the next byte of an answer.
    ``on_event(kind, fields)`` hears "endpoint_down" (url, reason), "endpoint_up" (url)
    and "move" (from, to, tokens).
    """

    def __init__(self, urls: Sequence[str], model: str = "", retry_s: float = 30.0,
                 timeout_s: float = 60.0, give_up_s: float = 120.0,
                 on_event: Callable[[str, dict[str, str]], None] | None = None) -> None:
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
        self.timeout_s = timeout_s
        self.give_up_s = give_up_s
        self._on_event = on_event
        self._turn = 0  # where the next tie-break starts

    async def complete(self, req: Request, on_text: Callable[[str], None]) -> Outcome:
        """Run ``req``, calling ``on_text`` with each piece of text as it arrives, across
        endpoints if one fails. RemoteError when the server refuses the request (4xx) or
        no endpoint answers for ``give_up_s``."""
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
            progress.failures += 1
            previous = endpoint

    def status(self) -> list[EndpointStatus]:
        now = time.monotonic()
        return [EndpointStatus(e.url, e.up, e.inflight, e.served, e.failures, e.last_error,
                               0.0 if e.up else max(0.0, e.down_until - now))
                for e in self.endpoints]

    async def aclose(self) -> None:
        """Nothing to do: each request closes its own connection."""

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
            finish = await self._stream(endpoint, progress, on_text)
        except EndpointFailed as e:
            self._mark_down(endpoint, e.reason)
            return None
        finally:
            endpoint.inflight -= 1
        endpoint.served += 1
        return finish

    async def _stream(self, endpoint: Endpoint, progress: Progress,
                      on_text: Callable[[str], None]) -> str:
        address = endpoint.address
        async with await connect(address, self.timeout_s) as stream:
            await send(stream, request_bytes(address, progress.payload(self.model)), self.timeout_s)
            reader = Reader(stream, self.timeout_s)
            head = await read_head(reader)
            body = Body(reader, head.headers)
            refused = 400 <= head.status < 500  # the request's fault, not the endpoint's
            if head.status == 200 or refused:
                self._mark_up(endpoint)
            if head.status == 200:
                return await self._read_events(endpoint, body, progress, on_text)
            message = error_message(await body.read_all(MAX_ERROR_BODY))
            if refused:
                raise RemoteError(f"{endpoint.url} refused the request (HTTP {head.status}): {message}")
            raise EndpointFailed(f"HTTP {head.status}: {message}")

    async def _read_events(self, endpoint: Endpoint, body: Body, progress: Progress,
                           on_text: Callable[[str], None]) -> str:
        """Read the event stream to its end: the finish reason."""
        events = EventStream()
        start_tokens = progress.tokens
        while data := await self._read_body(body, progress.tokens - start_tokens):
            for name, value in events.feed(data):
                if name == "error":
                    raise stream_error(endpoint, value)
                if value.strip() == "[DONE]":
                    return "length" if progress.tokens_left <= 0 else "stop"
                finish = self._take_chunk(endpoint, value, progress, start_tokens, on_text)
                if finish is not None:
                    return finish
        raise EndpointFailed(f"the stream ended after {progress.tokens - start_tokens} tokens, "
                             "before it finished")

    @staticmethod
    async def _read_body(body: Body, tokens: int) -> bytes:
        try:
            return await body.read()
        except EndpointFailed as e:
            raise EndpointFailed(f"the stream broke off after {tokens} tokens: {e.reason}") from None

    def _take_chunk(self, endpoint: Endpoint, data: str, progress: Progress, start_tokens: int,
                    on_text: Callable[[str], None]) -> str | None:
        """Take one streamed chunk: its text to ``on_text``; the finish reason if it ends."""
        try:
            chunk = json.loads(data)
        except ValueError:
            raise EndpointFailed(f"bad JSON in the stream: {data[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise EndpointFailed(f"bad chunk in the stream: {data[:80]!r}")
        if "error" in chunk:
            raise stream_error(endpoint, data)
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None
        text = choices[0].get("text") or ""
        finish = choices[0].get("finish_reason")
        if text or finish is None:
            progress.tokens += 1
            progress.last_progress = time.monotonic()
        if text:
            progress.text.append(text)
            on_text(text)
        if finish is None:
            return None
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            progress.tokens = start_tokens + usage["completion_tokens"]
        if finish == "abort":  # vLLM: the server dropped the request
            raise EndpointFailed("the server aborted the request")
        return "length" if finish == "length" else "stop"

    # -- bookkeeping

    def _mark_down(self, endpoint: Endpoint, reason: str) -> None:
        endpoint.failures += 1
        endpoint.last_error = reason
        endpoint.down_until = time.monotonic() + self.retry_s
        if endpoint.up:
            endpoint.up = False
            log.warning("endpoint %s is down: %s", endpoint.url, reason)
            self._emit("endpoint_down", {"url": endpoint.url, "reason": reason})

    def _mark_up(self, endpoint: Endpoint) -> None:
        if not endpoint.up:
            endpoint.up = True
            log.info("endpoint %s is up again", endpoint.url)
            self._emit("endpoint_up", {"url": endpoint.url})

    def _emit(self, kind: str, fields: dict[str, str]) -> None:
        if self._on_event is not None:
            self._on_event(kind, fields)


def stream_error(endpoint: Endpoint, data: str) -> Exception:
    """An error event mid-stream: the server's own failure (code 5xx, or none given) is
    EndpointFailed, the request's fault is RemoteError."""
    try:
        error = json.loads(data)
    except ValueError:
        error = data
    if isinstance(error, dict) and "error" in error:
        error = error["error"]
    code = error.get("code") if isinstance(error, dict) else None
    message = error_message(json.dumps({"error": error}).encode())
    if isinstance(code, int) and 400 <= code < 500:
        return RemoteError(f"{endpoint.url} refused the request (HTTP {code}): {message}")
    return EndpointFailed(f"error mid-stream: {message}")
