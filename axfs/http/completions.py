"""``POST /v1/completions`` and ``POST /v1/chat/completions``: a request as a task of the
kernel, and the task's answer back, whole or streamed.

A request is made into a task as a shell makes one: a draft named ``http-N``
(``mkdir``), its parameters (``config``), its schema or grammar, then its prompt
(``submit``), each checked and refused by the kernel as those writes are; a refused
request leaves no draft behind. Its answer is read from the task as ``stream`` is read,
with, when asked, the logprobs of its tokens from their records (axfs.http.logprobs).
While it runs, a client that closes its connection ends the task (killed, with that
reason in its error and the trace), and a task killed in the tree ends its answer
with the reason (HTTP 410, or an error event in a stream).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from axfs.errors import AxfsError
from axfs.http import answer
from axfs.http.ask import Ask, parse
from axfs.http.callers import Caller, Callers, Unauthorized
from axfs.http.logprobs import Logprobs
from axfs.http.status import FAILED, KILLED, error, error_body, status_of
from axfs.kernel import Kernel
from axfs.task import State, Task

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 128 << 20  # a request's JSON; the prompt's own limit is the user's (quota)
LEFT = "the HTTP client closed the connection"
STOPPED = "the HTTP server stopped (the tree was unmounted) while it ran"


class Completions:
    def __init__(self, kernel: Kernel, callers: Callers) -> None:
        self.kernel = kernel
        self.callers = callers
        self._next = 1

    async def completion(self, request: Request) -> Response:
        return await self._answer(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    async def _answer(self, request: Request, chat: bool) -> Response:
        try:
            who = self.callers.of(request)
            body = json.loads(await _body(request))
        except Unauthorized as e:
            return error(401, str(e))
        except _TooLarge:
            return error(413, f"the request is over {MAX_BODY_BYTES} bytes")
        except (ValueError, ClientDisconnect):
            return error(400, "the request body is not JSON")
        try:
            ask = parse(body, chat, self.kernel.models)
        except AxfsError as e:  # recorded as the tree records a bad write (trace, users/UID)
            return error(status_of(e), str(self.kernel.reject(who.uid, None, e)))
        try:
            task = await self._submit(who, ask)
        except AxfsError as e:
            return error(status_of(e), str(e))
        return TaskAnswer(self.kernel, task, ask)

    def _name(self) -> str:
        """The next free ``http-N``."""
        while f"http-{self._next}" in self.kernel.tasks:
            self._next += 1
        self._next += 1
        return f"http-{self._next - 1}"

    async def _submit(self, who: Caller, ask: Ask) -> Task:
        kernel = self.kernel
        task = kernel.create(who.uid, who.gid, self._name())
        try:
            kernel.configure(task, ask.config)
            if ask.schema or ask.grammar:
                kind = "schema" if ask.schema else "grammar"
                kernel.constrain(task, kind, ask.schema or ask.grammar, reset=True)
            # The tree takes a prompt less one newline at its end (echo's): one is added,
            # so that the prompt is the text as sent.
            await kernel.submit(task, ask.prompt.encode() + b"\n", ask.turns)
        except AxfsError:
            if task.state is State.DRAFT:
                kernel.remove(task, reason="refused")
            raise
        return task


class _TooLarge(Exception):
    pass


async def _body(request: Request) -> bytes:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise _TooLarge
    return bytes(body)


class TaskAnswer(Response):
    """A submitted task's answer, as an ASGI response: the whole answer once the task
    ends, or (``stream``) server-sent events as its text comes. It watches the client
    meanwhile: a client that leaves ends the task."""

    def __init__(self, kernel: Kernel, task: Task, ask: Ask) -> None:
        super().__init__()
        self.kernel = kernel
        self.task = task
        self.ask = ask
        self.logprobs = Logprobs(task, ask.chat, ask.logprobs) if ask.logprobs is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = self.task
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, receive, nursery.cancel_scope)
                if self.ask.stream:
                    await self._stream(send)
                else:
                    await self._whole(send)
                nursery.cancel_scope.cancel()
        finally:
            if not task.finished:  # the server is going: nobody will read the answer
                log.info("task %s: %s", task.id, STOPPED)
                self.kernel.kill(task, STOPPED)

    async def _watch(self, receive: Receive, scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.task.finished:
            log.info("task %s: %s", self.task.id, LEFT)
            self.kernel.kill(self.task, LEFT)
        scope.cancel()

    def _refusal(self) -> tuple[int, str]:
        """Why the task ended without its answer: its status and the reason."""
        task = self.task
        if task.state is State.KILLED:
            return KILLED, f"task {task.id} was killed" + (f": {task.error}" if task.error else "")
        return FAILED, f"task {task.id} failed: {task.error or task.finish_reason}"

    def _logprobs(self, published: int) -> dict[str, Any] | None:
        """If asked, the logprobs of the tokens not yet sent whose text begins in the
        first ``published`` bytes of the answer."""
        if self.logprobs is None:
            return None
        return self.logprobs.take(published, self.kernel.piece_of(self.task))

    async def _whole(self, send: Send) -> None:
        task = self.task
        await task.ended.wait()
        if task.state is State.DONE:
            status, body = 200, answer.whole(task, self.ask.chat, self._logprobs(len(task.output)))
        else:
            status, reason = self._refusal()
            body = error_body(status, reason)
        await send({"type": "http.response.start", "status": status, "headers": _headers(
            task, b"application/json")})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    async def _stream(self, send: Send) -> None:
        task, chat = self.task, self.ask.chat
        await send({"type": "http.response.start", "status": 200, "headers": _headers(
            task, b"text/event-stream", (b"cache-control", b"no-cache"))})
        sent, first = 0, True
        while True:
            changed = task.changed
            if len(task.output) > sent:  # whole UTF-8 characters (axfs.task)
                text = task.output[sent:].decode("utf-8", "replace")
                sent = len(task.output)
                await _body_part(send, answer.chunk(task, chat, text, first,
                                                    logprobs=self._logprobs(sent)))
                first = False
            elif task.finished:
                break
            else:
                await changed.wait()
        if task.state is State.DONE:
            end = answer.chunk(task, chat, "", first, answer.finish_reason(task))
            if self.ask.include_usage:
                end += answer.usage_chunk(task, chat)
            end += answer.event("[DONE]")
        else:
            end = answer.event(error_body(*self._refusal()))
        await send({"type": "http.response.body", "body": end})


async def _body_part(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


def _headers(task: Task, content_type: bytes, *more: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), (b"x-axfs-task", task.id.encode()), *more]
