"""The FUSE adapter: translates file operations into kernel calls, and nothing more.

What the tree holds is a table (axfs.fs.files, of axfs.fs.tree's rows): lookup, readdir,
getattr, open, read and write here walk the rows and call their functions, without
asking which file a node is. Every handler goes through ``_boundary``
(axfs.fs.boundary): kernel errors become their errno, and any other exception is logged
and answered with EIO, because an exception escaping a pyfuse3 handler would take the
whole mount down. The writing side (write, flush, release) is in axfs.fs.writes.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

import pyfuse3

from axfs.errors import Busy
from axfs.fs.boundary import boundary as _boundary
from axfs.fs.boundary import fail as _fail
from axfs.fs.edits import Edit
from axfs.fs.files import ROOT, TASK, TASKS
from axfs.fs.tree import Dir, File, Handle, Link, Node, Owner
from axfs.fs.writes import Writes
from axfs.kernel import Kernel
from axfs.models import ModelCopy
from axfs.task import State, Task

log = logging.getLogger(__name__)

ROOT_NODE = Node(ROOT)
# How long the kernel may keep a lookup of a fixed row (tasks/ID/stream: the name always
# names the same file while the task is there) and a directory's attributes (its owner
# and mode never change; its mtime may be this late). Without them every path walk asked
# the daemon again for each component's lookup and, for the permission check of each
# directory on the way, its attributes: 36 of the 93 FUSE requests a task of 64 tokens
# took in tools/bench/throughput's 64-task rounds, now 11 (docs/benchmarks.md, the hot
# path). Everything else (names that come and go, as models/NAME and latest, or are shown
# only at times; files whose size and mode change) is asked for every time.
CACHE_S = 1.0
FIXED = ROOT.fixed()
# A task's directory, too: its name names the same task until the task is removed, and a
# removal that is not an rmdir through the tree (retention, a refused HTTP request) tells
# the kernel to forget the name (``_removed``). Each path to one of its files walked
# through a lookup of it before: 4 of the 9 lookups a task in tools/bench/throughput.
KEPT = FIXED | {TASK}
# A file's attributes (its size, the prompt's write bits) change, but the kernel asks for
# them twice in a row on every open: for the permission check, then for the opener's
# fstat. Kept this long, one answer serves both, and a size seen is at most this old.
# Not the volatile files (trace, sched): their size is each viewer's own.
FILE_ATTR_S = 0.01


class Operations(Writes, pyfuse3.Operations):
    def __init__(self, kernel: Kernel, multi_user: bool = False) -> None:
        super().__init__()
        self.kernel = kernel
        self.multi_user = multi_user  # tasks and users/UID are their owner's only
        self._inodes: dict[Node, int] = {ROOT_NODE: pyfuse3.ROOT_INODE}
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: ROOT_NODE}
        self._handles: dict[int, Handle] = {}
        self.streams = 0  # open files whose reads block (see axfs.fs.reads)
        self._dirs: dict[int, list[tuple[bytes, Node]]] = {}
        self._dir_uid: dict[int, int] = {}
        self._next_fh = 1
        self.copies: dict[str, ModelCopy] = {}  # models/FILENAME being copied in
        self.started = time.time_ns()
        self.mounted = False  # set by pyfuse3 (init) once the kernel is there to be told
        kernel.on_remove.append(self._removed)

    def init(self) -> None:
        self.mounted = True

    def _removed(self, task: Task, reason: str) -> None:
        """A task removed: unless by rmdir (the kernel then drops the name itself), the
        kernel's kept lookup of tasks/ID must go (see KEPT)."""
        if self.mounted and reason != "rm":
            pyfuse3.invalidate_entry_async(self._ino(Node(TASKS, ROOT_NODE.name)),
                                           os.fsencode(task.id), ignore_enoent=True)

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
        """Whether what the node's name names is still there."""
        owner, name = node.row.owner, node.name
        if owner.names_task:
            return name in self.kernel.tasks
        if owner is Owner.MODEL:
            return name in self.kernel.models
        if owner is Owner.MODEL_PATH:
            entry = self.kernel.registry.entries.get(name)
            return bool(entry and entry.path)
        if owner is Owner.COPY:
            return name in self.copies
        if owner is Owner.USER:
            return name.isdigit() and int(name) in self.kernel.quota.users()
        return True

    def _dir(self, node: Node) -> Dir:
        if not isinstance(node.row, Dir):
            raise _fail(errno.ENOTDIR)
        return node.row

    def _child(self, parent: Node, name: str, uid: int) -> Node:
        d = self._dir(parent)
        row = d.named.get(name)
        if row is not None:
            node = Node(row, parent.name)
            if row.shown is None or row.shown(self, node, uid):
                return node
        elif d.find is not None and (row := d.find(self, name)) is not None:
            return Node(row, name)
        raise _fail(errno.ENOENT)

    def _children(self, parent: Node, uid: int) -> list[tuple[str, Node]]:
        d = self._dir(parent)
        found: list[tuple[str, Node]] = []
        for row in d.files:
            node = Node(row, parent.name)
            if row.shown is None or row.shown(self, node, uid):
                found.append((row.name, node))
        return found + d.each(self, uid) if d.each is not None else found

    # -- attributes ----------------------------------------------------------------

    def _mode(self, node: Node) -> int:
        """The row's permission bits; a prompt's lose their write bits once submitted."""
        row = node.row
        if isinstance(row, File) and row.draft_only and self._task(node).state is not State.DRAFT:
            return row.mode & ~0o222
        return row.mode

    def _task(self, node: Node) -> Task:
        return self.kernel.get(node.name)

    def _attrs(self, node: Node, uid: int) -> pyfuse3.EntryAttributes:
        row = node.row
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(node)
        a.entry_timeout = CACHE_S if row in KEPT else 0
        a.attr_timeout = (CACHE_S if isinstance(row, Dir) else
                          0 if isinstance(row, File) and row.volatile else FILE_ATTR_S)
        a.st_uid, a.st_gid = 0, 0
        a.st_blksize = 4096
        a.st_nlink = 2 if isinstance(row, Dir) else 1
        mode = self._mode(node)
        mtime = self.started
        if row.owner.names_task:
            task = self._task(node)
            a.st_uid, a.st_gid = task.uid, task.gid
            mtime = int(task.updated_at * 1e9)
        elif isinstance(row, File) and row.volatile:
            mtime = time.time_ns()
        elif row.owner is Owner.USER:
            a.st_uid = int(node.name)
        if self.multi_user and row.owner.private and not isinstance(row, Link):
            mode &= ~0o077  # the owner's only; root reads and writes all (default_permissions)
        a.st_mode = row.type | mode
        a.st_size = row.size(self, node, uid)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    # -- lookups -------------------------------------------------------------------

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = os.fsdecode(name)
        node = parent if text == "." else self._child(parent, text, ctx.uid)
        if node.row.refresh is not None:  # models/NAME/info's size: the file read again
            await node.row.refresh(self, node)
        return self._attrs(node, ctx.uid)

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode), ctx.uid)

    @_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        row = node.row
        if isinstance(row, File) and row.ignores_setattr:  # cp's chmod or utimes of its copy
            return self._attrs(node, ctx.uid)
        writable = isinstance(row, File) and row.write is not None
        only_truncate = fields.update_size and attr.st_size == 0 and not (
            fields.update_mode or fields.update_uid or fields.update_gid)
        # `echo x > file` may truncate first; truncating a control file to 0 is harmless.
        if not (writable and only_truncate) and (fields.update_size or fields.update_mode
                                                 or fields.update_uid or fields.update_gid):
            raise _fail(errno.EPERM)
        return self._attrs(node, ctx.uid)

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not isinstance(node.row, Link):
            raise _fail(errno.EINVAL)
        target = node.row.target(self, node, ctx.uid)
        if not target:
            raise _fail(errno.ENOENT)
        return os.fsencode(target)

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
        make = self._dir(self._node(parent_inode)).mkdir
        if make is None:
            raise _fail(errno.EPERM)
        return self._attrs(make(self, os.fsdecode(name), ctx.uid, ctx.gid), ctx.uid)

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._child(self._node(parent_inode), os.fsdecode(name), ctx.uid)
        if not isinstance(node.row, Dir) or node.row.remove is None:
            raise _fail(errno.EPERM)
        node.row.remove(self, node, ctx.uid)

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._child(self._node(parent_inode), os.fsdecode(name), ctx.uid)
        if isinstance(node.row, Dir) or node.row.remove is None:
            raise _fail(errno.EPERM)
        node.row.remove(self, node, ctx.uid)

    @_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """``cp FILE models/``: a model file copied into the state directory."""
        create = self._dir(self._node(parent_inode)).create
        if create is None:
            raise _fail(errno.EACCES)
        filename = os.fsdecode(name)
        file, copy = create(self, filename, ctx.uid)
        node = Node(file, filename)
        fh = self._new_fh()
        self._handles[fh] = Handle(file, filename, None, ctx.pid, ctx.uid, ctx.gid, copy=copy)
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
        """``ln -s FILE models/NAME``: register a model file where it is."""
        link = self._dir(self._node(parent_inode)).symlink
        if link is None:
            raise _fail(errno.EPERM)
        node = await link(self, os.fsdecode(name), os.fsdecode(target), ctx.uid)
        return self._attrs(node, ctx.uid)

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
        row = node.row
        if not isinstance(row, File) or (row.render is None and row.read is None):
            raise _fail(errno.EISDIR)
        task = self._task(node) if row.owner.names_task else None
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and not self._mode(node) & 0o200:
            if task is not None:  # a replay file's refusal is not the task's error
                self.kernel.reject(ctx.uid, task if row.owner is Owner.TASK else None, Busy(
                    f"{row.name} of task {task.id} is read-only"
                    + (" once submitted" if row.draft_only else "")), task.id)
            raise _fail(errno.EACCES)
        if row.refresh is not None:
            await row.refresh(self, node)
        h = Handle(row, node.name, task, ctx.pid, ctx.uid, ctx.gid)
        if writing and row.edit:
            h.edit = Edit(reset=bool(flags & os.O_TRUNC))
        if row.blocks:
            self.streams += 1
        if row.render is not None:
            h.data = row.render(self, node, ctx.uid)
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
        read = h.file.read
        if read is None:  # rendered at open
            return h.data[off : off + size]
        return await read(self, h, off, size)
