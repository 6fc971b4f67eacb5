"""The FUSE adapter: translates file operations into kernel calls, and nothing more.

Every handler goes through ``_boundary`` (axfs.fs.boundary): kernel errors become their
errno, and any other exception is logged and answered with EIO, because an exception
escaping a pyfuse3 handler would take the whole mount down. The writing side (write,
flush, release) is in axfs.fs.writes.
"""

from __future__ import annotations

import codecs
import errno
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from axfs import privacy, replay
from axfs.errors import (
    Busy,
)
from axfs.fs import views
from axfs.fs.boundary import boundary as _boundary
from axfs.fs.boundary import fail as _fail
from axfs.fs.edits import Edit
from axfs.fs.writes import Writes
from axfs.kernel import Kernel
from axfs.models import ModelCopy
from axfs.task import State, Task
from drivers import devices

log = logging.getLogger(__name__)

TASK_FILES = ("prompt", "stream", "status", "config", "ctl", "fork", "error")
WRITABLE = frozenset({"prompt", "config", "ctl", "fork"})
POLL_SECONDS = 0.2  # a blocked reader checks its signals this often
# Reads of streams, all streams together, the tree aims to answer each second at most.
# Each read is a FUSE request answered by the one Python thread (about 0.1 ms of it
# here), and at one read per token a fast model (a GPU) would spend the tree on them. So
# a reader that comes back sooner than its share of this rate (open streams / rate; 0.5 ms
# for one stream, 32 ms for 64) waits the rest of its share for more text, and one read
# carries every token that came meanwhile. A first read, and a read whose last answer is
# older than its share (a stream slower than that), is answered as soon as there is text:
# only text that is flowing fast is held back, and by no more than MAX_HOLD_S.
STREAM_READS_PER_S = 2000.0
MAX_HOLD_S = 0.05

@dataclass(frozen=True, slots=True)
class Node:
    """A place in the tree: ``kind`` plus the model or task name and file it names."""

    kind: str
    name: str = ""
    file: str = ""


ROOT = Node("root")
TASKS = Node("tasks")
MODELS = Node("models")
ROOT_FILES = {"README": Node("readme"), "memory": Node("memory"), "sched": Node("sched"),
              "trace": Node("trace"), "devices": Node("devices")}
REPLAY = Node("replay")
USERS = Node("users")
ROOT_DIRS = {"models": MODELS, "tasks": TASKS, "replay": REPLAY, "users": USERS}
REPLAY_FILES = ("timeline", "ctl", "result")
MODEL_FILES = ("info", "ctl")


@dataclass(slots=True)
class Handle:
    node: Node
    task: Task | None
    pid: int
    uid: int
    gid: int
    data: bytes = b""  # snapshot of a read-only file, taken at open
    pending: bytearray = field(default_factory=bytearray)  # prompt bytes not yet submitted
    submitted: Task | None = None  # what a write to tasks/new created
    skew: int = 0  # trace: absolute offset minus file offset (lines dropped meanwhile)
    replied: int = 0  # tasks/new: bytes of the id already read (the write moved the offset)
    copy: ModelCopy | None = None  # cp FILE models/: the copy being written
    last_read: float = -1.0  # trio time of the last stream read answered
    edit: Edit | None = None  # config opened for writing: the lines written (axfs.fs.edits)
    refused: int = 0  # the errno of a refused write: every later write fails with it too
    utf8: codecs.IncrementalDecoder = field(  # checks the prompt's text as it is written
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")())


_SIGNAL_MASKS = re.compile(rb"^(SigPnd|ShdPnd|SigBlk):\s*([0-9a-f]+)", re.MULTILINE)


def signal_pending(pid: int) -> bool:
    """Whether thread ``pid`` has a deliverable signal pending (or is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            masks = {k: int(v, 16) for k, v in _SIGNAL_MASKS.findall(f.read())}
    except OSError:
        return True
    if len(masks) < 3:
        return False
    return bool((masks[b"SigPnd"] | masks[b"ShdPnd"]) & ~masks[b"SigBlk"])


class Operations(Writes, pyfuse3.Operations):
    def __init__(self, kernel: Kernel, multi_user: bool = False) -> None:
        super().__init__()
        self.kernel = kernel
        self.multi_user = multi_user  # tasks and users/UID are their owner's only
        self._inodes: dict[Node, int] = {ROOT: pyfuse3.ROOT_INODE}
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: ROOT}
        self._handles: dict[int, Handle] = {}
        self._streams = 0  # open stream files (see STREAM_READS_PER_S)
        self._dirs: dict[int, list[tuple[bytes, Node]]] = {}
        self._dir_uid: dict[int, int] = {}
        self._next_fh = 1
        self._copies: dict[str, ModelCopy] = {}  # models/FILENAME being copied in
        self.started = time.time_ns()

    # -- inodes and nodes ----------------------------------------------------------

    def _ino(self, node: Node) -> int:
        ino = self._inodes.get(node)
        if ino is None:
            ino = len(self._nodes) + 1
            self._inodes[node] = ino
            self._nodes[ino] = node
        return ino

    def _node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None or not self._exists(node):
            raise _fail(errno.ENOENT)
        return node

    def _exists(self, node: Node) -> bool:
        if node.kind in ("task", "task_file", "parent", "replay_task", "replay_file"):
            return node.name in self.kernel.tasks
        if node.kind in ("model", "model_file"):
            return node.name in self.kernel.models
        if node.kind == "model_link":
            return bool(self._model_path(node.name))
        if node.kind == "model_copy":
            return node.name in self._copies
        if node.kind == "user":
            return node.name.isdigit() and int(node.name) in self.kernel.quota.users()
        return True

    def _task(self, node: Node) -> Task:
        return self.kernel.get(node.name)

    def _child(self, parent: Node, name: str, uid: int) -> Node:
        if parent is ROOT:
            node = ROOT_FILES.get(name) or ROOT_DIRS.get(name)
        elif parent is TASKS:
            if name == "new":
                node = Node("new")
            elif name == "latest":
                node = Node("latest") if self.kernel.latest(uid) else None
            else:
                node = Node("task", name) if name in self.kernel.tasks else None
        elif parent is MODELS:
            node = Node("model", name) if name in self.kernel.models else (
                Node("model_copy", name) if name in self._copies else None)
        elif parent is USERS:
            node = Node("user", name) if self._exists(Node("user", name)) else None
        elif parent is REPLAY:
            node = Node("replay_task", name) if name in self.kernel.tasks else None
        elif parent.kind == "replay_task":
            node = Node("replay_file", parent.name, name) if name in REPLAY_FILES else None
        elif parent.kind == "task":
            if name == "parent":
                node = Node("parent", parent.name) if self._task(parent).parent else None
            else:
                node = Node("task_file", parent.name, name) if name in TASK_FILES else None
        elif parent.kind == "model":
            if name == "file":
                node = Node("model_link", parent.name) if self._model_path(parent.name) else None
            else:
                node = Node("model_file", parent.name, name) if name in MODEL_FILES else None
        else:
            raise _fail(errno.ENOTDIR)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def _children(self, node: Node, uid: int) -> list[tuple[str, Node]]:
        if node is ROOT:
            return [(n, c) for n, c in {**ROOT_FILES, **ROOT_DIRS}.items()]
        if node is MODELS:
            return [(m, Node("model", m)) for m in sorted(self.kernel.models)] + [
                (f, Node("model_copy", f)) for f in sorted(self._copies)]
        if node is USERS:
            return [(str(u), Node("user", str(u))) for u in self.kernel.quota.users()]
        if node is REPLAY:
            return [(i, Node("replay_task", i)) for i in self._task_ids(uid)]
        if node.kind == "replay_task":
            return [(f, Node("replay_file", node.name, f)) for f in REPLAY_FILES]
        if node is TASKS:
            found = [("new", Node("new"))]
            if self.kernel.latest(uid):
                found.append(("latest", Node("latest")))
            return found + [(i, Node("task", i)) for i in self._task_ids(uid)]
        if node.kind == "task":
            files = [(f, Node("task_file", node.name, f)) for f in TASK_FILES]
            if self._task(node).parent:
                files.append(("parent", Node("parent", node.name)))
            return files
        if node.kind == "model":
            files = [(f, Node("model_file", node.name, f)) for f in MODEL_FILES]
            if self._model_path(node.name):
                files.append(("file", Node("model_link", node.name)))
            return files
        raise _fail(errno.ENOTDIR)

    def _model_path(self, name: str) -> str:
        entry = self.kernel.registry.entries.get(name)
        return entry.path if entry else ""

    def _task_ids(self, uid: int) -> list[str]:  # on a multi-user tree, uid's (axfs.privacy)
        who = privacy.viewer(self.multi_user, uid)
        ids = [i for i, t in self.kernel.tasks.items() if privacy.sees_task(who, t.uid)]
        return sorted(ids, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i))

    # -- attributes ----------------------------------------------------------------

    def _attrs(self, node: Node, uid: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(node)
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_uid, a.st_gid = 0, 0
        a.st_blksize = 4096
        mtime = self.started
        if node.kind in ("root", "tasks", "models", "task", "model", "replay", "replay_task",
                         "users"):
            mode, size = stat.S_IFDIR | 0o755, 0
            a.st_nlink = 2
        elif node.kind == "latest":
            latest = self.kernel.latest(uid)
            mode, size = stat.S_IFLNK | 0o777, len(latest.id) if latest else 0
            a.st_nlink = 1
        elif node.kind == "parent":
            mode, size = stat.S_IFLNK | 0o777, len(self._parent_link(node))
            a.st_nlink = 1
        elif node.kind == "model_link":
            mode, size = stat.S_IFLNK | 0o777, len(self._model_path(node.name))
            a.st_nlink = 1
        elif node.kind == "model_copy":
            mode, size = stat.S_IFREG | 0o644, self._copies[node.name].size
            a.st_nlink = 1
        else:
            mode, size = stat.S_IFREG | self._file_mode(node), self._size(node, uid)
            a.st_nlink = 1
        if node.kind in ("task", "task_file", "parent", "replay_task", "replay_file"):
            task = self._task(node)
            a.st_uid, a.st_gid = task.uid, task.gid
            mtime = int(task.updated_at * 1e9)
        elif node.kind in ("memory", "sched", "trace", "devices"):
            mtime = time.time_ns()
        elif node.kind == "user":
            a.st_uid = int(node.name)
        if node is TASKS:
            mode = stat.S_IFDIR | 0o1777  # anyone may mkdir a task; sticky, like /tmp
        if self.multi_user and node.kind in ("task", "task_file", "replay_task", "replay_file", "user"):
            mode &= ~0o077  # the owner's only; root reads and writes all (default_permissions)
        a.st_mode = mode
        a.st_size = size
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    def _file_mode(self, node: Node) -> int:
        if node.kind == "new":
            return 0o666
        if node.kind in ("replay_file", "model_file"):
            return 0o644 if node.file == "ctl" else 0o444
        if node.kind == "task_file" and node.file in WRITABLE:
            if node.file == "prompt" and self._task(node).state is not State.DRAFT:
                return 0o444
            return 0o644
        return 0o444

    def _content(self, node: Node, uid: int) -> bytes:
        """The current bytes of a snapshot file (not the stream's or the trace's: they
        are read live)."""
        kind = node.kind
        if kind == "user":
            return self.kernel.quota.render(int(node.name)).encode()
        if kind == "readme":
            return views.TREE_README.encode()
        if kind == "memory":
            return views.memory(self.kernel).encode()
        if kind == "sched":
            return views.sched(self.kernel).encode()
        if kind == "devices":
            return devices.render().encode()
        if kind == "new":
            return b""
        if kind == "model_file":
            return views.model_info(self.kernel, node.name).encode() if node.file == "info" else b""
        task = self._task(node)
        f = node.file
        if kind == "replay_file":
            if f == "timeline":
                return replay.timeline(task, self.kernel.model_sha).encode()
            if f == "result":
                return self.kernel.replays.result(task).encode()
            return b""
        if f == "prompt":
            return task.prompt.encode()
        if f == "status":
            runtime = self.kernel.local(task.config.model)
            return views.status(task, runtime.kv.cell_bytes if runtime else 0).encode()
        if f == "config":
            return task.config.render().encode()
        if f == "ctl":
            return views.ctl(task).encode()
        if f == "error":
            return self.kernel.error_text(task).encode()
        if f == "fork":
            return b""
        raise _fail(errno.ENOENT)

    def _size(self, node: Node, uid: int) -> int:
        """A regular file's size now, without copying a stream or rendering the trace."""
        if node.kind == "trace":
            return self.kernel.trace.size_for(privacy.viewer(self.multi_user, uid))
        if node.kind == "task_file" and node.file == "stream":
            return len(self._task(node).output)
        return len(self._content(node, uid))

    # -- lookups -------------------------------------------------------------------

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = os.fsdecode(name)
        node = parent if text == "." else self._child(parent, text, ctx.uid)
        if node.kind == "model_file":  # its info's size: the file read again, off this thread
            await self.kernel.refresh_info(node.name)
        return self._attrs(node, ctx.uid)

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode), ctx.uid)

    @_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind == "model_copy":
            return self._attrs(node, ctx.uid)  # cp's chmod or utimes of its copy: nothing to do
        writable = node.kind == "new" or (node.kind == "task_file" and node.file in WRITABLE) or (
            node.kind in ("replay_file", "model_file") and node.file == "ctl")
        only_truncate = fields.update_size and attr.st_size == 0 and not (
            fields.update_mode or fields.update_uid or fields.update_gid)
        # `echo x > file` may truncate first; truncating a control file to 0 is harmless.
        if not (writable and only_truncate) and (fields.update_size or fields.update_mode
                                                 or fields.update_uid or fields.update_gid):
            raise _fail(errno.EPERM)
        return self._attrs(node, ctx.uid)

    def _parent_link(self, node: Node) -> str:
        return f"../{self._task(node).parent}"

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.kind == "parent":
            return self._parent_link(node).encode()
        if node.kind == "model_link":
            return os.fsencode(self._model_path(node.name))
        if node.kind != "latest":
            raise _fail(errno.EINVAL)
        latest = self.kernel.latest(ctx.uid)
        if latest is None:
            raise _fail(errno.ENOENT)
        return latest.id.encode()

    # -- directories ---------------------------------------------------------------

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        fh = self._new_fh()
        self._dirs[fh] = [(n.encode(), c) for n, c in self._children(node, ctx.uid)]
        self._dir_uid[fh] = ctx.uid
        return fh

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        uid = self._dir_uid.get(fh, 0)
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            if not self._exists(node):
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(node, uid), i + 1):
                break

    @_boundary
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        self._dir_uid.pop(fh, None)

    @_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent is MODELS:
            entry = self.kernel.add_remote(os.fsdecode(name), ctx.uid)
            return self._attrs(Node("model", entry.name), ctx.uid)
        if parent is not TASKS:
            raise _fail(errno.EPERM)
        task = self.kernel.create(ctx.uid, ctx.gid, os.fsdecode(name))
        return self._attrs(Node("task", task.id), ctx.uid)

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        node = self._child(parent, os.fsdecode(name), ctx.uid)
        if node.kind == "model":
            self.kernel.unregister(node.name, ctx.uid)
            return
        if node.kind != "task":
            raise _fail(errno.EPERM)
        self.kernel.remove(self._task(node))

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        node = self._child(parent, os.fsdecode(name), ctx.uid)
        # A task's (or model's) files go with it: unlinking one succeeds and changes
        # nothing, so that `rm -r tasks/ID` reaches the rmdir that removes the task.
        if node.kind == "model_copy":
            self._copies.pop(node.name).abort()
            return
        if node.kind not in ("task_file", "parent", "model_file", "model_link"):
            raise _fail(errno.EPERM)

    @_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """``cp FILE models/``: a model file copied into the state directory."""
        if self._node(parent_inode) is not MODELS:
            raise _fail(errno.EACCES)
        filename = os.fsdecode(name)
        if filename in self._copies:
            raise _fail(errno.EEXIST)
        copy = self.kernel.begin_copy(filename, ctx.uid)  # opens one file: no need for a thread
        self._copies[filename] = copy
        node = Node("model_copy", filename)
        fh = self._new_fh()
        self._handles[fh] = Handle(node, None, ctx.pid, ctx.uid, ctx.gid, copy=copy)
        info = pyfuse3.FileInfo(fh=fh)
        info.direct_io = True
        return info, self._attrs(node, ctx.uid)

    async def rename(self, *args: Any) -> None:
        raise _fail(errno.EPERM)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    @_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """``ln -s FILE models/NAME``: register a model file where it is. The reply is the
        link (as the kernel expects); looked up again, models/NAME is the model's directory."""
        if self._node(parent_inode) is not MODELS:
            raise _fail(errno.EPERM)
        entry = await self.kernel.register(os.fsdecode(name), os.fsdecode(target), uid=ctx.uid)
        return self._attrs(Node("model_link", entry.name), ctx.uid)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        runtime = self.kernel.local()
        if runtime is None:
            s.f_bsize = s.f_frsize = 4096
            s.f_namemax = 64
            return s
        kv = runtime.kv.stats()
        s.f_bsize = s.f_frsize = max(1, kv.cell_bytes)
        s.f_blocks = kv.capacity_cells
        s.f_bfree = s.f_bavail = kv.free_cells + kv.cached_cells
        s.f_files = len(self.kernel.tasks)
        s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = 64
        return s

    # -- files ---------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.kind not in ("readme", "memory", "sched", "trace", "devices", "new", "model_file",
                             "task_file", "replay_file", "user"):
            raise _fail(errno.EISDIR)
        task = self._task(node) if node.kind in ("task_file", "replay_file") else None
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and not self._file_mode(node) & 0o200:
            if task is not None:  # a replay file's refusal is not the task's error
                self.kernel.reject(ctx.uid, task if node.kind == "task_file" else None, Busy(
                    f"{node.file} of task {task.id} is read-only"
                    + (" once submitted" if node.file == "prompt" else "")), task.id)
            raise _fail(errno.EACCES)
        if node.kind == "model_file":
            await self.kernel.refresh_info(node.name)
        h = Handle(node, task, ctx.pid, ctx.uid, ctx.gid)
        if writing and node.kind == "task_file" and node.file == "config":
            h.edit = Edit(reset=bool(flags & os.O_TRUNC))
        live = node.kind == "trace" or node.file == "stream"
        if node.file == "stream":
            self._streams += 1
        if not live and node.kind != "new":
            h.data = self._content(node, ctx.uid)
        fh = self._new_fh()
        self._handles[fh] = h
        info = pyfuse3.FileInfo(fh=fh)
        info.direct_io = True
        info.keep_cache = False
        return info

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise _fail(errno.EBADF)
        return h

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        node = h.node
        if node.kind == "trace":
            data, end = self.kernel.trace.read_for(off + h.skew, size, privacy.viewer(self.multi_user, h.uid))
            h.skew = end - (off + len(data))
            return data
        if node.kind == "new" or node.file == "fork":
            await self._submit_pending(h)
            reply = f"{h.submitted.id}\n".encode() if h.submitted else b""
            data = reply[h.replied : h.replied + size]
            h.replied += len(data)
            return data
        if h.task is not None and node.file == "stream":
            return await self._read_stream(h, h.task, off, size)
        return h.data[off : off + size]

    async def _read_stream(self, h: Handle, task: Task, off: int, size: int) -> bytes:
        """Wait until there is text past ``off`` or the task has ended; EOF after the end.

        A draft's stream is empty and ends at once: nothing runs until it is submitted,
        and ``grep -r`` over the tree must not wait on it.
        """
        check_at = trio.current_time() + POLL_SECONDS
        while True:
            changed = task.changed
            if len(task.output) > off or task.finished or task.state is State.DRAFT:
                share = min(MAX_HOLD_S, self._streams / STREAM_READS_PER_S)
                hold = h.last_read + share - trio.current_time()
                if hold > 0 and not task.finished and len(task.output) - off < size:
                    with trio.move_on_after(hold):
                        while not task.finished and len(task.output) - off < size:
                            await task.changed.wait()
                h.last_read = trio.current_time()
                return bytes(task.output[off : off + size])
            with trio.move_on_at(check_at):
                await changed.wait()
            # Signals are checked once a slice, not at every wake-up: reading /proc for
            # every token of every reader costs a visible share of a core.
            if trio.current_time() >= check_at:
                if signal_pending(h.pid):
                    raise _fail(errno.EINTR)
                check_at = trio.current_time() + POLL_SECONDS
