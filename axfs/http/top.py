"""The live page at ``/``: the picture ``axctl top`` draws (models, the KV cache, the
queue, the tasks with their rates, each user's share), in a browser, a phone's too.

The page (``page.html``: plain HTML and a little JavaScript, served as it is) polls
``/api/top`` each second: the same texts the tree's ``memory``, ``sched`` and each
task's ``status`` show (axfs.fs.views renders them from the kernel), as JSON. Its
viewer is the caller (axfs.http.callers): on a ``--multi-user`` tree, others' tasks show
as the tree lists them to that uid (counts and ids, no prompt; a name as ``*``).
"""

from __future__ import annotations

import functools
import pwd
import time
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from axfs import privacy
from axfs.fields import parse_fields
from axfs.fs import views
from axfs.http.callers import Callers, Unauthorized
from axfs.http.status import error
from axfs.kernel import Kernel
from axfs.runtime import LocalRuntime
from axfs.task import Task

ENDED_SHOWN = 50  # ended tasks on the page, newest first, after every unfinished one
PROMPT_CHARS = 120


def sections(text: str) -> list[dict[str, str]]:
    """A file of sections (one a model, a blank line between) as their fields."""
    return [parse_fields(part) for part in text.split("\n\n") if part.strip()]


class Top:
    def __init__(self, kernel: Kernel, callers: Callers, multi_user: bool = False) -> None:
        self.kernel = kernel
        self.callers = callers
        self.multi_user = multi_user
        self.html = resources.files("axfs.http").joinpath("page.html").read_bytes()

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.html, headers={"cache-control": "no-cache"})

    async def snapshot(self, request: Request) -> Response:
        try:
            who = self.callers.of(request)
        except Unauthorized as e:
            return error(401, str(e))
        return JSONResponse(self.picture(privacy.viewer(self.multi_user, who.uid)),
                            headers={"cache-control": "no-store"})

    def picture(self, viewer: privacy.Viewer) -> dict[str, Any]:
        kernel = self.kernel
        models = [{"name": name, "default": name == kernel.registry.default,
                   "loaded": name in kernel.runtimes,
                   "kind": "remote" if entry.remote or not entry.path else "local"}
                  for name, entry in sorted(kernel.registry.entries.items())]
        return {"now": time.time(), "viewer": viewer, "models": models,
                "memory": sections(views.memory(kernel)) if _any_local(kernel) else [],
                "sched": sections(views.sched(kernel)),
                "tasks": [self._row(task, viewer) for task in self._shown()]}

    def _shown(self) -> list[Task]:
        tasks = list(self.kernel.tasks.values())
        ended = sorted((t for t in tasks if t.finished), key=lambda t: t.finished_at, reverse=True)
        return [t for t in tasks if not t.finished] + ended[:ENDED_SHOWN]

    def _row(self, task: Task, viewer: privacy.Viewer) -> dict[str, str]:
        runtime = self.kernel.runtimes.get(task.config.model)
        cell_bytes = runtime.kv.cell_bytes if isinstance(runtime, LocalRuntime) else 0
        row = parse_fields(views.status(task, cell_bytes))
        own = viewer is None or viewer == task.uid
        row["id"] = task.id if own else privacy.shown_id(task.id)
        row["user"] = user_name(task.uid)
        row["prompt"] = " ".join(task.prompt[:PROMPT_CHARS * 2].split())[:PROMPT_CHARS] if own else ""
        return row


@functools.lru_cache(maxsize=256)
def user_name(uid: int) -> str:
    """A uid's login name, or its number (as axctl top shows it: tools/axctl/overview.py)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _any_local(kernel: Kernel) -> bool:
    return any(isinstance(r, LocalRuntime) for r in kernel.runtimes.values())
