"""One streamed completion from an OpenAI-compatible server (llama-server, vLLM, Ollama):
the request, its answer and its failures, in words. drivers.pool spreads requests over
endpoints and moves them.

One request is one streamed ``POST /v1/completions`` (or, for a conversation,
``/v1/chat/completions``: the server applies its own chat template) through httpx
(HTTP/1.1, https with certificate checks, connections kept alive between requests), the
answer read as server-sent events by httpx-sse until ``data: [DONE]``. Leaving a request
before its end closes its connection: the server notices and stops generating.

Tokens are counted as the streamed chunks that carry a choice's text (llama-server and
vLLM stream one token per chunk), not counting a closing chunk that has only a
``finish_reason``; when the server reports ``usage`` (asked for with ``stream_options``:
llama-server sends it with the finish, vLLM in a chunk after it) its
``completion_tokens`` replaces the count of the chunks it finished, and its
``prompt_tokens`` and cached tokens are kept (Progress). A count from chunks can be low:
llama-server holds back a token that ends inside a UTF-8 character and sends it with the
next one.

A request resumed on an endpoint (moved after a failure, or preempted by axfs.remote and
sent again) goes on from the text received so far: the prompt and that text as the new
prompt, or for a conversation that text as the assistant's unfinished last turn, and the
tokens left as max_tokens; so a stop string cut in two by the move is not seen.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import httpx_sse

from drivers.base import DriverError
from drivers.credentials import Access
from drivers.request import Attempt, Progress

PROBE_TIMEOUT_S = 5.0  # the longest wait for a server's /props or /slots
MAX_ERROR_BODY = 65536  # bytes of an error answer read for its message
KEEPALIVE = 64  # idle connections kept per pool for the next requests
KEY_SHOWN_AS = "[key]"  # what a server's message shows in place of the key it echoed


class RemoteError(DriverError):
    """A remote request failed for good (the message says why, in words)."""


class EndpointFailed(Exception):
    """The endpoint failed (no connection, no answer in time, 5xx, a broken stream): the
    request may go on elsewhere. ``reason`` says why, in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EndpointRefused(EndpointFailed):
    """The endpoint and axfs do not accept each other: ``state`` is "denied" (it answered
    401 or 403 to the key) or "untrusted" (its certificate failed the check)."""

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(reason)
        self.state = state


# -- urls ---------------------------------------------------------------------------------

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Address:
    """Where an endpoint listens; ``url`` is its normalised base, ``SCHEME://host:port``."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str) -> Address:
    """``http://host[:port]`` or ``https://host[:port]`` with an optional trailing ``/``
    or ``/v1``; port 80 or 443 when left out. Anything else is a ValueError that says
    what is accepted."""
    expected = (f"{url!r} is not an endpoint url: expected http://HOST:PORT or https://HOST:PORT "
                "(optionally ending in /v1)")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError as e:
        raise ValueError(f"{expected}: {e}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"{expected}: only http and https are supported")
    if not parts.hostname:
        raise ValueError(f"{expected}: no host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{expected}: no user, query or fragment (a key goes in a key file)")
    if parts.path.rstrip("/") not in ("", "/v1"):
        raise ValueError(f"{expected}: no path other than /v1")
    return Address(parts.scheme, parts.hostname, port)


# -- one streamed request ------------------------------------------------------------------------

class Client:
    """A pool's HTTP client: its connections, the key it sends, the certificates it
    trusts. ``timeout_s`` is the longest wait for a connection or the next byte."""

    def __init__(self, access: Access, timeout_s: float) -> None:
        headers = {"User-Agent": "axfs"}
        if access.key:
            headers["Authorization"] = f"Bearer {access.key}"
        self.timeout_s = timeout_s
        self._key = access.key
        # trust_env=False: no proxy or .netrc from the environment; the endpoints are
        # reached as named, with only the key named for them.
        self._http = httpx.AsyncClient(
            headers=headers, verify=access.tls, trust_env=False,
            timeout=httpx.Timeout(timeout_s, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=KEEPALIVE))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def slots(self, address: Address) -> int | None:
        """How many requests the server runs at once, where it says so: llama-server's
        ``/props`` ``total_slots``, else the length of its ``/slots`` list. None when it
        does not say (vLLM, Ollama) or does not answer in PROBE_TIMEOUT_S."""
        for path, read in (("/props", _total_slots), ("/slots", _slot_count)):
            try:
                answer = await self._http.get(address.url + path, timeout=PROBE_TIMEOUT_S)
                n = read(answer.json()) if answer.status_code == 200 else None
            except httpx.TransportError:
                return None
            except ValueError:  # not JSON
                n = None
            if n is not None:
                return n
        return None

    async def complete(self, address: Address, progress: Progress, model: str,
                       on_answer: Callable[[], None], on_text: Callable[[str], None]) -> str:
        """Stream the request's remainder from ``address``: its finish reason. Calls
        ``on_answer`` once the endpoint answers (200, or a 4xx that is the request's
        fault). EndpointFailed when the endpoint failed, RemoteError when it refused
        the request."""
        url = address.url + progress.path
        try:
            async with httpx_sse.aconnect_sse(self._http, "POST", url,
                                              json=progress.payload(model)) as events:
                answer = events.response
                status = answer.status_code
                if status in (401, 403):
                    message = self._words(error_message(await _read_some(answer)))
                    raise EndpointRefused("denied", f"HTTP {status}: {message}")
                if status == 200 or 400 <= status < 500:
                    on_answer()
                if status != 200:
                    message = self._words(error_message(await _read_some(answer)))
                    if 400 <= status < 500:  # the request's fault, not the endpoint's
                        raise RemoteError(f"{address.url} refused the request (HTTP {status}): {message}")
                    raise EndpointFailed(f"HTTP {status}: {message}")
                return await self._read_events(address, events, progress, on_text)
        except httpx.TransportError as e:
            raise failure(e, self.timeout_s) from None

    async def _read_events(self, address: Address, events: httpx_sse.EventSource,
                           progress: Progress, on_text: Callable[[str], None]) -> str:
        """Read the event stream to its end: the finish reason. After the finish, the
        stream is read on for the usage chunk a server may send after it (vLLM)."""
        attempt = Attempt(progress.tokens)
        try:
            async for event in events.aiter_sse():
                if event.event == "error":
                    raise self._stream_error(address, event.data)
                if event.data.strip() == "[DONE]":
                    return attempt.finish or ("length" if progress.tokens_left <= 0 else "stop")
                self._take_chunk(address, event.data, progress, attempt, on_text)
                if attempt.finish is not None and attempt.told:
                    return attempt.finish
        except httpx_sse.SSEError as e:
            if attempt.finish is None:
                raise EndpointFailed(f"not an event stream: {e}") from None
        except httpx.TransportError as e:
            if attempt.finish is None:
                reason = failure(e, self.timeout_s).reason
                raise EndpointFailed(f"the stream broke off after {progress.tokens - attempt.start} "
                                     f"tokens: {reason}") from None
        if attempt.finish is not None:
            return attempt.finish
        raise EndpointFailed(f"the stream ended after {progress.tokens - attempt.start} tokens, "
                             "before it finished")

    def _take_chunk(self, address: Address, data: str, progress: Progress, attempt: Attempt,
                    on_text: Callable[[str], None]) -> None:
        """Take one streamed chunk: its text to ``on_text``, its usage and its finish
        reason to ``attempt``."""
        try:
            chunk = json.loads(data)
        except ValueError:
            raise EndpointFailed(self._words(f"bad JSON in the stream: {data[:80]!r}")) from None
        if not isinstance(chunk, dict):
            raise EndpointFailed(self._words(f"bad chunk in the stream: {data[:80]!r}"))
        if "error" in chunk:
            raise self._stream_error(address, data)
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if isinstance(choice, dict):
            self._take_choice(choice, progress, attempt, on_text)
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            attempt.take_usage(usage, progress)

    @staticmethod
    def _take_choice(choice: dict[str, Any], progress: Progress, attempt: Attempt,
                     on_text: Callable[[str], None]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):  # a chat chunk: its first may carry only the role
            text, counts = delta.get("content") or "", delta.get("content") is not None
        else:
            text, counts = choice.get("text") or "", True
        finish = choice.get("finish_reason")
        if text or (counts and finish is None):
            progress.tokens += 1
            progress.last_progress = time.monotonic()
        if text:
            progress.text.append(text)
            on_text(text)
        if finish == "abort":  # vLLM: the server dropped the request
            raise EndpointFailed("the server aborted the request")
        if finish is not None:
            attempt.finish = "length" if finish == "length" else "stop"

    def _stream_error(self, address: Address, data: str) -> Exception:
        """An error event mid-stream: the server's own failure (code 5xx, or none given)
        is EndpointFailed, the request's fault is RemoteError."""
        try:
            error = json.loads(data)
        except ValueError:
            error = data
        if isinstance(error, dict) and "error" in error:
            error = error["error"]
        code = error.get("code") if isinstance(error, dict) else None
        message = self._words(error_message(json.dumps({"error": error}).encode()))
        if isinstance(code, int) and 400 <= code < 500:
            return RemoteError(f"{address.url} refused the request (HTTP {code}): {message}")
        return EndpointFailed(f"error mid-stream: {message}")

    def _words(self, text: str) -> str:
        """A server's words, with the key taken out should the server have echoed it."""
        return text.replace(self._key, KEY_SHOWN_AS) if self._key else text


def _total_slots(props: Any) -> int | None:
    n = props.get("total_slots") if isinstance(props, dict) else None
    return n if isinstance(n, int) and n > 0 else None


def _slot_count(slots: Any) -> int | None:
    return len(slots) if isinstance(slots, list) and slots else None


async def _read_some(answer: httpx.Response) -> bytes:
    """An error answer's body, cut at MAX_ERROR_BODY bytes."""
    body = bytearray()
    async for piece in answer.aiter_bytes():
        body += piece
        if len(body) >= MAX_ERROR_BODY:
            break
    return bytes(body[:MAX_ERROR_BODY])


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


def failure(e: httpx.TransportError, timeout_s: float) -> EndpointFailed:
    """httpx's failure as the endpoint's, in words."""
    if isinstance(e, httpx.ConnectTimeout):
        return EndpointFailed(f"cannot connect: no answer for {timeout_s:g} s")
    if isinstance(e, httpx.ReadTimeout):
        return EndpointFailed(f"no answer for {timeout_s:g} s")
    if isinstance(e, httpx.WriteTimeout):
        return EndpointFailed(f"the request was not taken in {timeout_s:g} s")
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return EndpointRefused("untrusted", f"certificate verify failed: {cause.verify_message}")
    if isinstance(e, httpx.ConnectError):
        return EndpointFailed(f"cannot connect: {_words(e)}")
    return EndpointFailed(f"connection lost: {_words(e)}")


def _words(e: BaseException) -> str:
    """An OS error in words: "Connection refused" rather than "[Errno 111] ...";
    httpx's errors by their cause."""
    if isinstance(e, ssl.SSLError):  # its errno is OpenSSL's, not the OS's
        return f"TLS: {e.reason.lower().replace('_', ' ')}" if e.reason else f"TLS: {e}"
    if isinstance(e, OSError) and e.errno and e.errno > 0:  # not a resolver error (< 0)
        return os.strerror(e.errno)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, BaseExceptionGroup):  # trio's connect: one error per address tried
        return "; ".join(dict.fromkeys(_words(sub) for sub in e.exceptions))
    cause = e.__cause__ or e.__context__  # httpx raises its errors during httpcore's
    if cause is not None:
        return _words(cause)
    return str(e) or type(e).__name__
