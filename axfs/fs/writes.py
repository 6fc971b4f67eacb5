"""The FUSE adapter's writing side: write, flush and release (see axfs.fs.operations,
whose Operations class this is a part of, kept apart for size).

A write goes to the kernel as it comes (a prompt's bytes are checked, a config's lines
are checked: axfs.fs.edits), and what a file's close completes (a prompt submitted, a
config applied, a model copy registered) happens at flush. One refused write refuses
every later one through the same open file, so that a shell's exit status says so.
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING

import pyfuse3
import trio

from axfs.errors import AxfsError, BadInput, Busy
from axfs.fs.boundary import boundary as _boundary
from axfs.fs.boundary import errno_of
from axfs.fs.boundary import fail as _fail
from axfs.kernel import Kernel
from axfs.models import ModelCopy
from axfs.task import State

if TYPE_CHECKING:
    from axfs.fs.operations import Handle


class Writes:
    kernel: Kernel
    _copies: dict[str, ModelCopy]
    _handles: dict[int, Handle]
    _streams: int  # open stream files

    if TYPE_CHECKING:
        def _handle(self, fh: int) -> Handle: ...

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if h.refused:  # so that the writer's exit status says so, whichever write it was
            raise _fail(h.refused)
        try:
            return await self._write(h, off, buf)
        except pyfuse3.FUSEError as e:
            h.refused = e.errno
            raise
        except AxfsError as e:
            h.refused = errno_of(e)
            raise

    async def _write(self, h: Handle, off: int, buf: bytes) -> int:
        node = h.node
        if h.copy is not None:
            before = h.copy.size
            try:
                await trio.to_thread.run_sync(h.copy.write, off, buf)
            except OSError as e:
                raise _fail(e.errno or errno.EIO) from e
            self.kernel.copy_wrote(h.copy, before)
            return len(buf)
        if node.kind == "model_file" and node.file == "ctl":
            await self.kernel.model_control(node.name, self._text(h, buf), h.uid)
            return len(buf)
        if node.kind == "new" or node.file in ("prompt", "fork"):
            if h.submitted is not None or (node.file == "prompt" and h.task
                                           and h.task.state is not State.DRAFT):
                raise self.kernel.reject(h.uid, h.task, Busy("the prompt was already submitted"))
            if node.file == "fork" and h.task is not None:
                self.kernel.check_forkable(h.task, h.uid)
            if not h.pending:  # over a per-user limit: refused at the first write, not at close
                self.kernel.check_quota(h.uid, h.task, h.task.config if h.task else None, len(buf))
            try:
                self.kernel.check_prompt_bytes(buf, before=len(h.pending), uid=h.uid, utf8=h.utf8)
            except AxfsError as e:
                h.pending.clear()  # nothing of a refused prompt is submitted at close
                h.utf8.reset()
                raise self.kernel.reject(h.uid, h.task, e) from e
            h.pending += buf
            return len(buf)
        if h.task is None:
            raise _fail(errno.EBADF)
        if h.edit is not None:  # config: checked now, applied at close
            try:
                text = h.edit.add(buf, node.file)
            except AxfsError as e:
                raise self.kernel.reject(h.uid, h.task, e) from e
            self.kernel.check_config(h.task, text, h.edit.resets)
            return len(buf)
        text = self._text(h, buf)
        if node.kind == "replay_file":
            if node.file != "ctl":
                raise _fail(errno.EBADF)
            self.kernel.replay(h.task, h.uid, text)
        elif node.file == "ctl":
            self.kernel.control(h.task, text)
        else:
            raise _fail(errno.EBADF)
        return len(buf)

    def _text(self, h: Handle, buf: bytes) -> str:
        try:
            return buf.decode("utf-8")
        except UnicodeDecodeError as e:
            task = h.task if h.node.kind == "task_file" else None
            raise self.kernel.reject(h.uid, task, BadInput(f"{h.node.file}: not UTF-8 text"),
                                     h.node.name) from e

    def _apply_edit(self, h: Handle, closing: bool = False) -> None:
        """Apply what was written to a config through this open file (at the last close,
        also the reset of a ``: > config`` that wrote nothing), unless a write was refused."""
        edit, task = h.edit, h.task
        if edit is None or task is None or h.refused or not (edit.written or (closing and edit.resets)):
            return
        try:
            try:
                text = edit.finish(h.node.file)
            except AxfsError as e:
                raise self.kernel.reject(h.uid, task, e) from e
            self.kernel.configure(task, text, edit.resets)
        except AxfsError as e:
            h.refused = errno_of(e)
            raise
        edit.done()

    async def _submit_pending(self, h: Handle) -> None:
        """Submit what was written to tasks/new or a draft's prompt, once."""
        if not h.pending:
            return
        data = bytes(h.pending)
        h.pending.clear()
        if h.node.kind == "new":
            h.submitted = await self.kernel.submit_new(h.uid, h.gid, data)
        elif h.task is not None and h.node.file == "fork":
            h.submitted = await self.kernel.fork(h.task, h.uid, h.gid, data)
        elif h.task is not None:
            await self.kernel.submit(h.task, data)
            h.submitted = h.task

    async def _finish_copy(self, h: Handle) -> None:
        """The end of ``cp FILE models/``: the copy is checked and registered (its close
        fails with EINVAL, the reason in the trace, when it is not a model)."""
        copy = h.copy
        if copy is None or copy.done:
            return
        self._copies.pop(copy.filename, None)
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
        await self._submit_pending(h)

    @_boundary
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None and h.node.file == "stream":
            self._streams -= 1
        if h is not None:
            with contextlib.suppress(AxfsError, OSError):
                await self._finish_copy(h)
            with contextlib.suppress(AxfsError):  # refused and recorded; release cannot say so
                self._apply_edit(h, closing=True)
                await self._submit_pending(h)
