"""The shape of the tree: each kind of file is one row, and the adapter walks the rows.

After Linux's ``fs/proc/base.c`` (each file of /proc/PID is a ``pid_entry``) and Plan 9's
``Dirtab``: a row says what a file is called, its mode, how it is read (rendered once at
open, or read live: a stream that blocks), how it is written, and one line for the tree's
README. The rows themselves are in axfs.fs.files; axfs.fs.operations looks up, lists,
stats, opens, reads and writes any of them the same way, without asking which it is.

A node is a row and the name it is about: ``Node(STATUS, "7")`` is tasks/7/status,
``Node(TASK, "7")`` the directory tasks/7 (a root file's name is "").
"""

from __future__ import annotations

import codecs
import enum
import stat
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import ClassVar, Protocol

from axfs.fs.edits import Edit
from axfs.kernel import Kernel
from axfs.models import ModelCopy
from axfs.task import Task


class Mounted(Protocol):
    """What a row's functions may use of the mounted tree (axfs.fs.operations)."""

    kernel: Kernel
    multi_user: bool  # tasks and users/UID are their owner's only
    copies: dict[str, ModelCopy]  # models/FILENAME being copied in
    streams: int  # open files whose reads block (see axfs.fs.reads)


class Owner(enum.Enum):
    """What a node's name names: it exists while that does, and its owner is that one's."""

    NONE = enum.auto()  # a fixed place (the root, README, tasks/new)
    TASK = enum.auto()  # tasks/ID and its files: a task's own (a refusal is its error)
    REPLAY = enum.auto()  # replay/ID and its files: about task ID
    MODEL = enum.auto()  # models/NAME and its files
    MODEL_PATH = enum.auto()  # models/NAME/file: there while the model has a file
    COPY = enum.auto()  # models/FILENAME being copied in
    USER = enum.auto()  # users/UID

    @property
    def names_task(self) -> bool:
        """The name is a task's id: the task owns it."""
        return self in (Owner.TASK, Owner.REPLAY)

    @property
    def private(self) -> bool:
        """Its owner's only on a tree mounted with --multi-user (axfs.privacy)."""
        return self in (Owner.TASK, Owner.REPLAY, Owner.USER)


@dataclass(frozen=True, slots=True)
class Node:
    row: Entry
    name: str = ""


Shown = Callable[[Mounted, Node, int], bool]  # whether uid finds it in its directory


@dataclass(frozen=True, eq=False, slots=True)
class Entry:
    """A row of the table: a name in its directory (for a directory's changing entries,
    the word README uses: ID, NAME), permission bits, and the README's line."""

    name: str
    mode: int
    help: str
    _: KW_ONLY
    owner: Owner = Owner.NONE
    shown: Shown | None = None  # None: always there (while its owner is)
    remove: Callable[[Mounted, Node, int], None] | None = None  # rm (rmdir or unlink)
    refresh: Callable[[Mounted, Node], Awaitable[None]] | None = None  # before lookup, open
    type: ClassVar[int] = 0

    def size(self, m: Mounted, node: Node, uid: int) -> int:
        return 0


Reader = Callable[[Mounted, "Handle", int, int], Awaitable[bytes]]
Writer = Callable[[Mounted, "Handle", int, bytes], Awaitable[None]]


@dataclass(frozen=True, eq=False, slots=True, kw_only=True)
class File(Entry):
    """A regular file: ``render`` gives its bytes, taken once at open (what a reader
    sees does not change under it); a live file has ``read`` instead, called for each
    read (``blocks``: it waits for more, as a stream does)."""

    render: Callable[[Mounted, Node, int], bytes] | None = None
    read: Reader | None = None
    blocks: bool = False
    length: Callable[[Mounted, Node, int], int] | None = None  # a live file's size now
    write: Writer | None = None  # one write through an open file (axfs.fs.writes)
    submit: Callable[[Mounted, Handle, bytes], Awaitable[Task]] | None = None  # at close
    edit: bool = False  # settings lines gathered and applied at close (axfs.fs.edits)
    # What a close does with an edit's text: (task, text, reset), raising why not.
    apply: Callable[[Mounted, Task, str, bool], None] | None = None
    draft_only: bool = False  # writable until its task is submitted
    volatile: bool = False  # changes without a task to say when: its mtime is now
    ignores_setattr: bool = False  # chmod and utimes succeed and change nothing
    type: ClassVar[int] = stat.S_IFREG

    def size(self, m: Mounted, node: Node, uid: int) -> int:
        if self.length is not None:
            return self.length(m, node, uid)
        return len(self.render(m, node, uid)) if self.render is not None else 0


@dataclass(frozen=True, eq=False, slots=True, kw_only=True)
class Link(Entry):
    target: Callable[[Mounted, Node, int], str]  # "": none now
    type: ClassVar[int] = stat.S_IFLNK

    def size(self, m: Mounted, node: Node, uid: int) -> int:
        return len(self.target(m, node, uid))


@dataclass(frozen=True, eq=False, slots=True, kw_only=True)
class Dir(Entry):
    """A directory: its fixed ``files`` (each about the directory's own name), then the
    entries that come and go (``find`` one by name, ``each`` lists them for uid; the
    rows they can be are ``varying``, for README)."""

    files: tuple[Entry, ...] = ()
    varying: tuple[Entry, ...] = ()
    find: Callable[[Mounted, str], Entry | None] | None = None
    each: Callable[[Mounted, int], list[tuple[str, Node]]] | None = None
    mkdir: Callable[[Mounted, str, int, int], Node] | None = None  # (name, uid, gid)
    symlink: Callable[[Mounted, str, str, int], Awaitable[Node]] | None = None
    create: Callable[[Mounted, str, int], tuple[File, ModelCopy]] | None = None  # (name, uid)
    named: dict[str, Entry] = field(init=False, repr=False)
    type: ClassVar[int] = stat.S_IFDIR

    def __post_init__(self) -> None:
        object.__setattr__(self, "named", {f.name: f for f in self.files})

    def fixed(self) -> set[Entry]:
        """The rows under this directory that are always there under the same name while
        their directory is (listed in ``files``, not shown only at times, no size to
        refresh at lookup): the kernel may keep their lookups for a while."""
        rows: set[Entry] = set()
        for row in (*self.files, *self.varying):
            if row in self.files and row.shown is None and row.refresh is None:
                rows.add(row)
            if isinstance(row, Dir):
                rows |= row.fixed()
        return rows


@dataclass(slots=True)
class Handle:
    """An open file: its row, the name it is about, and what the open file keeps."""

    file: File
    name: str
    task: Task | None
    pid: int
    uid: int
    gid: int
    data: bytes = b""  # a rendered file's bytes, taken at open
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

    @property
    def own_task(self) -> Task | None:
        """The task whose error file a refusal through this file shows in, if any."""
        return self.task if self.file.owner is Owner.TASK else None
