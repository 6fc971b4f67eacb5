"""The edge of the FUSE adapter: kernel errors become their errno, and any other
exception is logged and answered with EIO, because an exception escaping a pyfuse3
handler would take the whole mount down."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from axfs.errors import (
    AxfsError,
    BadInput,
    Busy,
    Exists,
    NoSpace,
    NotFound,
    ParameterTooLarge,
    QuotaExceeded,
    TooLarge,
    Unavailable,
)

log = logging.getLogger("axfs.fs.operations")

ERRNO: dict[type[AxfsError], int] = {
    BadInput: errno.EINVAL,
    NotFound: errno.ENOENT,
    Busy: errno.EBUSY,
    Exists: errno.EEXIST,
    TooLarge: errno.EFBIG,
    NoSpace: errno.ENOSPC,
    QuotaExceeded: errno.EDQUOT,
    ParameterTooLarge: errno.E2BIG,
    Unavailable: errno.EIO,
}

P = ParamSpec("P")
R = TypeVar("R")


def errno_of(e: AxfsError) -> int:
    """The errno of a refusal: its own (a journal that cannot write says which), else
    its kind's."""
    return getattr(e, "errno", None) or ERRNO.get(type(e), errno.EINVAL)


def boundary(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except AxfsError as e:
            log.info("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno_of(e)) from e
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


