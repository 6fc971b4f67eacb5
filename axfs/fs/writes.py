"""The FUSE adapter's writing side: the rows' write functions (axfs.fs.files), and
write, flush and release (a part of axfs.fs.operations' Operations class, kept apart
for size).

A write goes to the kernel as it comes (a prompt's bytes are checked, a config's lines
are checked: axfs.fs.edits), and what a file's close completes (a prompt submitted, a
config applied, a model copy registered) happens at flush. One refused write refuses
every later one through the same open file, so that a shell's exit status says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
from typing import TYPE_CHECKING

import pyfuse3
import trio

from axfs.errors import AxfsError, BadInput
from axfs.fs.boundary import boundary as _boundary
from axfs.fs.boundary import errno_of
from axfs.fs.boundary import fail as _fail
from axfs.fs.edits import Edit
from axfs.fs.tree import Handle, Mounted
from axfs.kernel import Kernel
from axfs.models import ModelCopy
from axfs.task import Task

# -- what one write does, by file ----------------------------------------------------


async def write_prompt(m: Mounted, h: Handle, off: int, buf: bytes) -> None:
    """tasks/new, a draft's prompt: checked now, submitted at close."""
    _take_prompt(m, h, buf, fork=False)


async def write_fork(m: Mounted, h: Handle, off: int, buf: bytes) -> None:
    """tasks/ID/fork: a follow-up to the task, checked now, submitted at close."""
    _take_prompt(m, h, buf, fork=True)


def _take_prompt(m: Mounted, h: Handle, buf: bytes, fork: bool) -> None:
    try:
        m.kernel.check_prompt_write(h.uid, h.task, buf, len(h.pending), h.utf8, fork=fork,
                                    submitted=h.submitted is not None)
    except AxfsError:
        h.pending.clear()  # nothing of a refused prompt is submitted at close
        h.utf8.reset()
        raise
    h.pending += buf


def _gather(m: Mounted, h: Handle, buf: bytes) -> tuple[Task, Edit, str]:
    """Add ``buf`` to the text written through an edited file (config, schema, grammar):
    its task, its edit, and the whole text so far; a refused part is recorded."""
    if h.edit is None or h.task is None:
        raise _fail(errno.EBADF)
    try:
        return h.task, h.edit, h.edit.add(buf, h.file.name)
    except AxfsError as e:
        raise m.kernel.reject(h.uid, h.task, e) from e


async def write_config(m: Mounted, h: Handle, off: int, buf: bytes) -> None:
    """tasks/ID/config: checked now with the lines before it, applied at close."""
    task, edit, text = _gather(m, h, buf)
    m.kernel.check_config(task, text, edit.resets)


async def write_constraint(m: Mounted, h: Handle, off: int, buf: bytes) -> None:
    """tasks/ID/schema, tasks/ID/grammar: gathered, compiled at close (a part of either
    may not compile alone); a schema that is whole JSON already is compiled now, so
    that a shell's ``echo`` sees a refusal (it does not look at close's result)."""
    task, edit, text = _gather(m, h, buf)
    if h.file.name == "schema" and edit.resets and _whole_json(text):
        m.kernel.check_constraint(task, "schema", text)


def _whole_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def write_ctl(m: Mounted, h: Handle, off: int, buf: bytes) -> None:
    if h.task is None:
        raise _fail(errno.EBADF)
    m.kernel.control(h.task, _text(m, h, buf))


async def write_replay_ctl(m: Mounted, h: Handle, off: int, buf: bytes) -> None:
    if h.task is None:
        raise _fail(errno.EBADF)
    m.kernel.replay(h.task, h.uid, _text(m, h, buf))


async def write_model_ctl(m: Mounted, h: Handle, off: int, buf: bytes) -> None:
    await m.kernel.model_control(h.name, _text(m, h, buf), h.uid)


async def write_copy(m: Mounted, h: Handle, off: int, buf: bytes) -> None:
    """cp FILE models/: written into the state directory off the trio thread."""
    if h.copy is None:
        raise _fail(errno.EBADF)
    before = h.copy.size
    try:
        await trio.to_thread.run_sync(h.copy.write, off, buf)
    except OSError as e:
        raise _fail(e.errno or errno.EIO) from e
    m.kernel.copy_wrote(h.copy, before)


def _text(m: Mounted, h: Handle, buf: bytes) -> str:
    try:
        return buf.decode("utf-8")
    except UnicodeDecodeError as e:
        raise m.kernel.reject(h.uid, h.own_task, BadInput(f"{h.file.name}: not UTF-8 text"),
                              h.name) from e


# -- what a close submits ----------------------------------------------------------------


async def submit_new(m: Mounted, h: Handle, data: bytes) -> Task:
    return await m.kernel.submit_new(h.uid, h.gid, data)


async def submit_draft(m: Mounted, h: Handle, data: bytes) -> Task:
    if h.task is None:
        raise _fail(errno.EBADF)
    await m.kernel.submit(h.task, data)
    return h.task


async def submit_fork(m: Mounted, h: Handle, data: bytes) -> Task:
    if h.task is None:
        raise _fail(errno.EBADF)
    return await m.kernel.fork(h.task, h.uid, h.gid, data)


async def submit_pending(m: Mounted, h: Handle) -> None:
    """Submit what was written to tasks/new, a draft's prompt or a fork, once."""
    submit = h.file.submit
    if not h.pending or submit is None:
        return
    data = bytes(h.pending)
    h.pending.clear()
    h.submitted = await submit(m, h, data)


class Writes:
    kernel: Kernel
    copies: dict[str, ModelCopy]
    streams: int
    _handles: dict[int, Handle]
    multi_user: bool

    if TYPE_CHECKING:
        def _handle(self, fh: int) -> Handle: ...

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if h.refused:  # so that the writer's exit status says so, whichever write it was
            raise _fail(h.refused)
        write = h.file.write
        if write is None:
            raise _fail(errno.EBADF)
        try:
            await write(self, h, off, buf)
        except pyfuse3.FUSEError as e:
            h.refused = e.errno
            raise
        except AxfsError as e:
            h.refused = errno_of(e)
            raise
        return len(buf)

    def _apply_edit(self, h: Handle, closing: bool = False) -> None:
        """Apply what was written to a config through this open file (at the last close,
        also the reset of a ``: > config`` that wrote nothing), unless a write was refused."""
        edit, task, apply = h.edit, h.task, h.file.apply
        if edit is None or task is None or apply is None or h.refused \
                or not (edit.written or (closing and edit.resets)):
            return
        try:
            try:
                text = edit.finish(h.file.name)
            except AxfsError as e:
                raise self.kernel.reject(h.uid, task, e) from e
            apply(self, task, text, edit.resets)
        except AxfsError as e:
            h.refused = errno_of(e)
            raise
        edit.done()

    async def _finish_copy(self, h: Handle) -> None:
        """The end of ``cp FILE models/``: the copy is checked and registered (its close
        fails with EINVAL, the reason in the trace, when it is not a model)."""
        copy = h.copy
        if copy is None or copy.done:
            return
        self.copies.pop(copy.filename, None)
        copy.done = True  # a second flush of the same file (a dup'ed descriptor) does nothing
        try:
            await trio.to_thread.run_sync(copy.finish)
        except OSError as e:
            copy.abort()
            raise _fail(e.errno or errno.EIO) from e
        await self.kernel.register_copy(copy, h.uid)

    @_boundary
    async def flush(self, fh: int) -> None:
        h = self._handle(fh)
        await self._finish_copy(h)
        if h.refused:  # nothing written through it applies; close() says so too
            raise _fail(h.refused)
        self._apply_edit(h)
        await submit_pending(self, h)

    @_boundary
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None and h.file.blocks:
            self.streams -= 1
        if h is not None:
            with contextlib.suppress(AxfsError, OSError):
                await self._finish_copy(h)
            with contextlib.suppress(AxfsError):  # refused and recorded; release cannot say so
                self._apply_edit(h, closing=True)
                await submit_pending(self, h)
