"""The trace: one text line per scheduler event, kept in a bounded ring.

Lines are addressed by absolute byte offset: the file's size is every byte ever
traced, so ``tail -f`` sees it grow. Lines older than the ring are dropped; a
reader that asks for them gets a ``trace_dropped lines=N`` line in their place (see
``read_for``), and the engine never waits for a reader.
"""

from __future__ import annotations

import bisect
import logging
import time
from array import array
from collections import deque

log = logging.getLogger(__name__)


def _value(v: object) -> str:
    s = str(v)
    return repr(s) if (not s or any(c in s for c in " \n\t=\"'")) else s


def _line(event: str, task: str, uid: int | str, details: dict[str, object]) -> bytes:
    """``time task uid event key=value...``; values with spaces are quoted."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    extra = "".join(f" {k}={_value(v)}" for k, v in details.items())
    return f"{stamp} {task} {uid} {event}{extra}\n".encode()


class Trace:
    def __init__(self, max_lines: int = 20_000) -> None:
        self._lines: deque[bytes] = deque()
        self._max_lines = max_lines
        self._base = 0  # absolute offset of the first kept line
        self._size = 0  # absolute offset just past the last line
        self.dropped_lines = 0
        self._dropped_ends: array[int] = array("q")  # end offsets of the latest dropped lines
        self._forgotten = 0  # dropped lines whose end offset is no longer kept

    @property
    def size(self) -> int:
        return self._size

    def emit(self, event: str, task: str = "-", uid: int | str = "-", **details: object) -> None:
        """Add ``time task uid event key=value...``; values with spaces are quoted."""
        line = _line(event, task, uid, details)
        log.debug("trace: %s", line.decode().rstrip())
        self._lines.append(line)
        self._size += len(line)
        while len(self._lines) > self._max_lines:
            self._base += len(self._lines.popleft())
            self.dropped_lines += 1
            self._dropped_ends.append(self._base)
            if len(self._dropped_ends) > 4 * self._max_lines:
                half = len(self._dropped_ends) // 2
                del self._dropped_ends[:half]
                self._forgotten += half

    def missed(self, offset: int) -> int:
        """Dropped lines that end after ``offset`` (at least that many, for an offset
        older than the ones remembered)."""
        return len(self._dropped_ends) - bisect.bisect_right(self._dropped_ends, offset)

    def read_for(self, offset: int, size: int) -> tuple[bytes, int]:
        """What a reader at absolute ``offset`` gets, and the absolute offset it reaches.

        A reader whose next lines were dropped first gets one line saying how many."""
        if offset >= self._base:
            data, start = self.read(offset, size)
            return data, start + len(data)
        n = self.missed(offset)
        notice = _line("trace_dropped", "-", "-", {
            "lines": f"{n}{'+' if offset < self._forgotten_end() else ''}",
            "reason": f"this reader fell behind the {self._max_lines} lines kept"})
        if len(notice) >= size:
            data, start = self.read(offset, size)
            return data, start + len(data)
        data, start = self.read(self._base, size - len(notice))
        return notice + data, start + len(data)

    def _forgotten_end(self) -> int:
        return self._dropped_ends[0] if self._forgotten and self._dropped_ends else 0

    def read(self, offset: int, size: int) -> tuple[bytes, int]:
        """Bytes from absolute ``offset`` (at most ``size``) and the offset they start at.

        The start is later than ``offset`` when those lines were already dropped.
        """
        start = max(offset, self._base)
        out = bytearray()
        pos = self._base
        for line in self._lines:
            end = pos + len(line)
            if end > start:
                out += line[max(0, start - pos) :]
                if len(out) >= size:
                    break
            pos = end
        return bytes(out[:size]), start
