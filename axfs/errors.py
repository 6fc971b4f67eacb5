"""The kernel's errors. Plain exceptions here; the FUSE adapter maps them to errno."""

from __future__ import annotations


class AxfsError(Exception):
    """Base of the errors the kernel raises on purpose; the message is for people."""


class BadInput(AxfsError):
    """A write that cannot be parsed or is out of range (EINVAL)."""


class NotFound(AxfsError):
    """No such task or model (ENOENT)."""


class Busy(AxfsError):
    """The object is in a state that forbids the change (EBUSY)."""


class Exists(AxfsError):
    """The name is taken (EEXIST)."""


class TooLarge(AxfsError):
    """The input is over a size limit (EFBIG)."""


class NoSpace(AxfsError):
    """The work can never fit in the model's memory (ENOSPC)."""


class QuotaExceeded(AxfsError):
    """The user is over a per-user limit on tasks or tokens (EDQUOT)."""


class ParameterTooLarge(AxfsError):
    """A parameter is over the user's limit for it, e.g. max_tokens (E2BIG)."""


class Unavailable(AxfsError):
    """The model cannot be loaded or reached now (EIO); the message says why."""


class NotRecorded(AxfsError):
    """The journal cannot record the request, so it is refused: ``errno`` is the disk's
    (ENOSPC when it is full)."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno
