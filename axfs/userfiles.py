"""Calls on paths a user named, kept off the trio thread.

The trio thread answers every request of the tree, so nothing it does may wait on a
file a user chose: a FIFO waits for a writer, a dead NFS server leaves ``stat`` in D
state for minutes. Such calls (reading a model file's GGUF header, checking a file is
one) run here: in a worker thread, through a limiter of their own (threads stuck on a
hung filesystem cannot use up the threads the journal and the engine need), and waited
for at most ``TIME_LIMIT_S``; a call that has not answered by then is abandoned (its
thread finishes or not, unseen) and the request fails with the reason. What is opened
is opened as ``drivers.files`` does: regular files only, without blocking (the GGUF
reader and the sha256 of a model file both do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from axfs.errors import BadInput

TIME_LIMIT_S = 10.0
THREADS = 4  # calls on user paths at once; more wait their turn (within the limit)
_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("user_files")

T = TypeVar("T")


def _threads() -> trio.CapacityLimiter:
    try:
        return _LIMITER.get()
    except LookupError:  # the first call of this trio run
        limiter = trio.CapacityLimiter(THREADS)
        _LIMITER.set(limiter)
        return limiter


async def call(fn: Callable[[str], T], path: str) -> T:
    """``fn(path)`` in a worker thread, at most TIME_LIMIT_S; BadInput when it did not
    answer in time (OSError and ValueError from ``fn`` go through)."""
    with trio.move_on_after(TIME_LIMIT_S):
        return await trio.to_thread.run_sync(fn, path, abandon_on_cancel=True,
                                             limiter=_threads())
    raise BadInput(f"{path}: no answer in {TIME_LIMIT_S:g} s (a hung filesystem?)")
