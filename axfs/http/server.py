"""The HTTP server: its routes, and Hypercorn's trio worker serving them in the daemon's
trio loop, beside pyfuse3 (mount/daemon.py), so that a request and a write to the tree
call the same kernel from the same thread.

| route                       | what                                                    |
|-----------------------------|---------------------------------------------------------|
| POST /v1/completions        | a completion (axfs.http.completions)                    |
| POST /v1/chat/completions   | a chat completion                                       |
| GET /v1/models              | the registry's models                                   |
| GET /props                  | the default model's slots, for another axfs (chaining)  |
| GET /health                 | ``{"status": "ok"}`` while the tree is served           |
| GET /                       | the live page (axfs.http.top)                           |
| GET /api/top                | the page's picture of the box, as JSON                  |

Requests are answered by their key's uid (axfs.http.callers). Nothing is logged of a
request but its task's id: no access log, which would carry the clients' addresses and
paths into the tree's log, and never a key.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from axfs.errors import BadInput
from axfs.http.callers import Callers, Unauthorized, read_keys
from axfs.http.completions import Completions
from axfs.http.status import error
from axfs.http.top import Top
from axfs.kernel import Kernel

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """``--http [HOST:]PORT``, ``--http-keys FILE``, ``--http-open-loopback``."""

    host: str
    port: int
    keys_file: str = ""
    open_loopback: bool = False

    @property
    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_options(address: str, keys_file: str = "", open_loopback: bool = False,
                  multi_user: bool = False) -> HttpOptions:
    """The options from the command line; BadInput saying what is wrong (a keys file is
    read by ``callers``, when the server starts). A request without a key is the owner's,
    and every local user can reach loopback: so a ``--multi-user`` tree needs keys."""
    host, colon, port = address.rpartition(":")
    host = host.strip("[]") if colon else DEFAULT_HOST
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"--http {address}: expected [HOST:]PORT, PORT from 1 to 65535")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        if host != "localhost":
            raise BadInput(f"--http {address}: HOST must be an IP address (or localhost)") from None
        loopback = True
    if not loopback and not keys_file:
        raise BadInput(f"--http {address} is not a loopback address: give --http-keys FILE, so "
                       "that only holders of a key are served, each as their uid")
    if multi_user and (open_loopback or not keys_file):
        raise BadInput("--http on a --multi-user tree needs --http-keys, without --http-open-loopback: "
                       "every local user reaches loopback, and a request without a key is the owner's")
    if open_loopback and not keys_file:
        raise BadInput("--http-open-loopback is for a server with --http-keys (without keys, "
                       "every request is the owner's already)")
    return HttpOptions(host, int(port), keys_file, open_loopback)


def load_callers(options: HttpOptions) -> Callers:
    """Who may ask, from the keys file; BadInput with the reason (the mount is refused)."""
    try:
        keys = read_keys(options.keys_file) if options.keys_file else None
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BadInput(f"--http-keys {options.keys_file}: {why}") from None
    return Callers(keys, options.open_loopback)


def application(kernel: Kernel, callers: Callers, multi_user: bool = False) -> Starlette:
    completions = Completions(kernel, callers)
    top = Top(kernel, callers, multi_user)

    async def models(request: Request) -> Response:
        try:
            callers.of(request)
        except Unauthorized as e:
            return error(401, str(e))
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "axfs",
                 "default": name == kernel.registry.default, "loaded": name in kernel.runtimes}
                for name in sorted(kernel.models)]
        return JSONResponse({"object": "list", "data": data})

    async def props(request: Request) -> Response:
        """llama-server's ``/props``, as far as another axfs asks it (drivers/openai.py):
        how many requests the default model runs at once."""
        try:
            callers.of(request)
        except Unauthorized as e:
            return error(401, str(e))
        runtime = kernel.local()
        if runtime is None:
            return error(404, "the default model is not loaded here")
        return JSONResponse({"total_slots": runtime.kv.slots, "model": runtime.name})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, e: Exception) -> Response:
        status = e.status_code if isinstance(e, HTTPException) else 500
        return error(status, e.detail if isinstance(e, HTTPException) else "internal error")

    return Starlette(routes=[
        Route("/v1/completions", completions.completion, methods=["POST"]),
        Route("/v1/chat/completions", completions.chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/props", props, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", top.page, methods=["GET"]),
        Route("/api/top", top.snapshot, methods=["GET"]),
    ], exception_handlers={404: http_error, 405: http_error})


async def serve(kernel: Kernel, options: HttpOptions, callers: Callers, multi_user: bool = False,
                *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; started (``nursery.start``) once listening, with the URLs.
    OSError when the address cannot be bound."""
    config = Config()
    config.bind = [options.bind]
    config.accesslog = None
    config.errorlog = log.getChild("hypercorn")  # its "Running on" is the daemon's to say
    config.errorlog.setLevel(logging.WARNING)
    config.graceful_timeout = 1.0
    await hypercorn_serve(application(kernel, callers, multi_user), config,  # type: ignore[arg-type]
                          task_status=task_status)
