"""The mounted tree, read and written with plain file operations: everything axctl does.

Each method is what a shell user would do by hand: ``cat`` a file, ``echo`` into one,
``mkdir`` a task. Errors come back as ``TreeError`` with the words a person needs,
including the reason the tree wrote into the task's ``error`` file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from axfs.fields import parse_fields

ENDED = ("done", "failed", "killed")
STATES = ("running", "preempted", "queued", "draft", *ENDED)


class TreeError(Exception):
    """The tree cannot be reached, or it refused an operation; the message is for people."""


def first_number(value: str | None, default: float = 0.0) -> float:
    """The number a field starts with (``"8192 cells"`` -> 8192.0), or ``default``."""
    try:
        return float((value or "").split()[0])
    except (IndexError, ValueError):
        return default


def _why(e: OSError) -> str:
    return e.strerror or errno.errorcode.get(e.errno or 0, str(e))


@dataclass(frozen=True, slots=True)
class Tree:
    root: Path

    def path(self, rel: str) -> Path:
        return self.root / rel

    def check(self) -> None:
        """Fail with a clear message unless ``root`` is a mounted axfs tree."""
        if not self.path("tasks/new").exists():
            raise TreeError(f"{self.root} is not an axfs tree (there is no {self.path('tasks/new')}): "
                            f"mount one with `axfs mount {self.root}`, or give its place with "
                            "--root or AXFS_ROOT")

    # -- reading -------------------------------------------------------------------

    def read(self, rel: str) -> str:
        try:
            return self.path(rel).read_text(errors="replace")
        except FileNotFoundError:
            raise TreeError(f"{self.path(rel)}: no such file (is the task id right?)") from None
        except OSError as e:
            raise TreeError(f"cannot read {self.path(rel)}: {_why(e)}") from None

    def fields(self, rel: str) -> dict[str, str]:
        return parse_fields(self.read(rel))

    def resolve(self, task: str) -> str:
        """A task id as given, or the one ``latest`` points to."""
        if task != "latest":
            return task
        try:
            return os.readlink(self.path("tasks/latest"))
        except OSError:
            raise TreeError("you have no latest task (tasks/latest does not exist)") from None

    def status(self, task: str) -> dict[str, str]:
        try:
            text = self.path(f"tasks/{task}/status").read_text()
        except FileNotFoundError:
            raise TreeError(f"no task {task!r} in {self.path('tasks')}") from None
        except OSError as e:
            raise TreeError(f"cannot read the status of task {task}: {_why(e)}") from None
        return parse_fields(text)

    def error(self, task: str) -> str:
        try:
            return self.path(f"tasks/{task}/error").read_text().strip()
        except OSError:
            return ""

    def task_ids(self) -> list[str]:
        """Every task's id, numbered ones first in order, then named ones by name."""
        try:
            names = os.listdir(self.path("tasks"))
        except OSError as e:
            raise TreeError(f"cannot list {self.path('tasks')}: {_why(e)}") from None
        ids = [n for n in names if n not in ("new", "latest")]
        return sorted(ids, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i))

    def models(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path("models")))
        except OSError:
            return []

    # -- writing -------------------------------------------------------------------

    def _write(self, rel: str, data: bytes, task: str | None) -> None:
        """Write ``data`` in one write and close (where the tree commits it)."""
        try:
            fd = os.open(self.path(rel), os.O_WRONLY | os.O_TRUNC)
        except FileNotFoundError:
            raise TreeError(f"{self.path(rel)}: no such file (is the task id right?)") from None
        except OSError as e:
            raise self._refused(rel, e, task) from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            with contextlib.suppress(OSError):  # the close says it again: nothing applied
                os.close(fd)
            raise self._refused(rel, e, task) from None
        try:
            os.close(fd)
        except OSError as e:
            raise self._refused(rel, e, task) from None

    def _refused(self, rel: str, e: OSError, task: str | None) -> TreeError:
        reason = self.error(task) if task else ""
        return TreeError(f"writing {rel} failed: {_why(e)}" + (f": {reason}" if reason else ""))

    def submit(self, prompt: bytes, config: str = "", name: str | None = None) -> str:
        """Queue ``prompt``; returns the task's id.

        Without a config or a name it is ``tasks/new`` (write, then read the id back on
        the same open file); otherwise ``mkdir tasks/NAME``, write ``config``, write
        ``prompt``. A draft whose config is refused is removed again.
        """
        if not prompt:
            raise TreeError("the prompt is empty")
        if not config and name is None:
            return self._submit_new(prompt)
        name = name or self._fresh_name()
        try:
            os.mkdir(self.path(f"tasks/{name}"))
        except FileExistsError:
            raise TreeError(f"a task named {name!r} exists already") from None
        except OSError as e:
            raise TreeError(f"cannot make task {name!r}: {_why(e)}") from None
        try:
            if config:
                self._write(f"tasks/{name}/config", config.encode(), name)
        except TreeError:
            self.remove(name)
            raise
        self._write(f"tasks/{name}/prompt", prompt, name)
        return name

    def _submit_new(self, prompt: bytes) -> str:
        try:
            fd = os.open(self.path("tasks/new"), os.O_RDWR)
        except OSError as e:
            raise TreeError(f"cannot open {self.path('tasks/new')}: {_why(e)}") from None
        try:
            view = memoryview(prompt)
            while view:
                view = view[os.write(fd, view):]
            task = os.read(fd, 64).decode().strip()
        except OSError as e:
            raise TreeError(f"the prompt was refused: {_why(e)} (the reason is in "
                            f"{self.path('trace')})") from None
        finally:
            os.close(fd)
        if not task:
            raise TreeError("tasks/new gave no id back")
        return task

    def _fresh_name(self) -> str:
        base = time.strftime("axctl-%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        name, n = base, 1
        while self.path(f"tasks/{name}").exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def control(self, task: str, command: str) -> None:
        """Write one command (``kill``, ``priority N``) to the task's ``ctl``."""
        if not self.path(f"tasks/{task}").is_dir():
            raise TreeError(f"no task {task!r} in {self.path('tasks')}")
        self._write(f"tasks/{task}/ctl", f"{command}\n".encode(), task)

    def remove(self, task: str) -> None:
        try:
            os.rmdir(self.path(f"tasks/{task}"))
        except OSError as e:
            raise TreeError(f"cannot remove task {task}: {_why(e)}") from None

    # -- following a stream ----------------------------------------------------------

    def follow(self, task: str, sink: Callable[[bytes], None] | None = None) -> None:
        """Read the task's stream until the task ends, handing each piece to ``sink``.

        A read of ``stream`` waits for more text and returns end-of-file once the task
        has ended, so this blocks exactly as long as the task runs. A draft's stream
        ends at once: then this waits for the draft's prompt to be written.
        """
        offset = 0
        while True:
            try:
                f = open(self.path(f"tasks/{task}/stream"), "rb", buffering=0)  # noqa: SIM115
            except FileNotFoundError:
                raise TreeError(f"no task {task!r} in {self.path('tasks')}") from None
            except OSError as e:
                raise TreeError(f"cannot open the stream of task {task}: {_why(e)}") from None
            with f:
                f.seek(offset)
                while chunk := self._read_stream(f, task):
                    offset += len(chunk)
                    if sink is not None:
                        sink(chunk)
            if self.status(task).get("state") in ENDED:
                return
            time.sleep(0.2)

    def _read_stream(self, f: BinaryIO, task: str) -> bytes:
        try:
            return f.read(1 << 16) or b""
        except OSError as e:
            raise TreeError(f"cannot read the stream of task {task}: {_why(e)}") from None
