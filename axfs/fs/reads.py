"""The live files' reads (the rows' ``read``, axfs.fs.files): a task's stream, which
waits for text, the trace, and the id a write to tasks/new or a fork made.

A stream read is the tree's hot path: one per reader per batch of tokens, so it does no
more than find its handle and slice the task's output.
"""

from __future__ import annotations

import errno
import re

import trio

from axfs import privacy
from axfs.fs.boundary import fail
from axfs.fs.tree import Handle, Mounted
from axfs.fs.writes import submit_pending
from axfs.task import State

POLL_SECONDS = 0.2  # a blocked reader checks its signals this often
# Reads of streams, all streams together, the tree aims to answer each second at most.
# Each read is a FUSE request answered by the one Python thread (about 0.1 ms of it
# here), and at one read per token a fast model (a GPU) would spend the tree on them. So
# a reader that comes back sooner than its share of this rate (open streams / rate; 1 ms
# for one stream, 50 ms for 64) waits the rest of its share for more text, and one read
# carries every token that came meanwhile (64 tasks of 64 tokens: 20 reads a task, 34 at
# 2,000 reads a second). A first read, and a read whose last answer is
# older than its share (a stream slower than that), is answered as soon as there is text:
# only text that is flowing fast is held back, and by no more than MAX_HOLD_S.
STREAM_READS_PER_S = 1000.0
MAX_HOLD_S = 0.05

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


async def stream(m: Mounted, h: Handle, off: int, size: int) -> bytes:
    """tasks/ID/stream: wait until there is text past ``off`` or the task has ended; EOF
    after the end.

    A draft's stream is empty and ends at once: nothing runs until it is submitted,
    and ``grep -r`` over the tree must not wait on it.
    """
    task = h.task
    if task is None:
        raise fail(errno.EBADF)
    now = trio.current_time()
    check_at = now + POLL_SECONDS
    # A reader back sooner than its share waits out the rest first, woken by the task's
    # end and not by every token: one wait, whether the text came before it or during it.
    hold_until = h.last_read + min(MAX_HOLD_S, m.streams / STREAM_READS_PER_S)
    if now < hold_until and not task.finished and task.state is not State.DRAFT \
            and len(task.output) - off < size:
        with trio.move_on_at(hold_until):
            await task.ended.wait()
    while True:
        changed = task.changed
        if len(task.output) > off or task.finished or task.state is State.DRAFT:
            h.last_read = trio.current_time()
            return bytes(task.output[off : off + size])
        # Signals are checked once a slice, and only by a read that goes on waiting: one
        # answered now returns to its reader, where a signal is delivered anyway. Reading
        # /proc at every wake-up of every reader took about a third of the trio thread's
        # time with 32 Gemma streams (a token every 0.3 s, longer than a slice).
        if trio.current_time() >= check_at:
            if signal_pending(h.pid):
                raise fail(errno.EINTR)
            check_at = trio.current_time() + POLL_SECONDS
        with trio.move_on_at(check_at):
            await changed.wait()


async def trace(m: Mounted, h: Handle, off: int, size: int) -> bytes:
    """The trace, as this reader may see it; lines dropped since the last read move the
    file's offsets on (``skew``)."""
    data, end = m.kernel.trace.read_for(off + h.skew, size, privacy.viewer(m.multi_user, h.uid))
    h.skew = end - (off + len(data))
    return data


async def reply(m: Mounted, h: Handle, off: int, size: int) -> bytes:
    """tasks/new, tasks/ID/fork: what was written is submitted, and the same open file
    reads the new task's id."""
    await submit_pending(m, h)
    answer = f"{h.submitted.id}\n".encode() if h.submitted else b""
    data = answer[h.replied : h.replied + size]
    h.replied += len(data)
    return data
