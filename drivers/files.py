"""Opening a file a user named, for reading, without ever waiting on it.

A path given to axfs (a model linked into models/, the mount's --model) may name a
FIFO, whose open waits for a writer; a device (/dev/zero reads forever, a tty); a
socket or a directory. Only regular files are read: the type is checked with stat
before the open, and the open is non-blocking (so a FIFO put in its place meanwhile
does not wait) and checked again with fstat.
"""

from __future__ import annotations

import os
import stat

KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISDIR, "a directory"))


class NotRegular(ValueError):
    """The path names something other than a regular file."""


def check_regular(path: object, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in KINDS if test(mode)), "not a file")
        raise NotRegular(f"{path} is {kind}, not a regular file")


def open_regular(path: str | os.PathLike[str]) -> int:
    """A descriptor of ``path`` open for reading; NotRegular (a ValueError) if it is not
    a regular file, OSError if it cannot be opened."""
    check_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        check_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd
