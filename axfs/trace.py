"""The trace: one text line per scheduler event, kept in a bounded ring.

Lines are addressed by byte offset in the reader's view: the file's size is every
byte ever traced, so ``tail -f`` sees it grow. Lines older than the ring are dropped; a
reader that asks for them gets a ``trace_dropped lines=N`` line in their place (see
``read_for``), and the engine never waits for a reader.

Views (axfs.privacy): root sees every line in full; on a multi-user tree a user sees
their own lines in full and others' public forms (counts, no text), which are shorter.
So each view has offsets of its own. A line's public form is made once, when it is
traced, and offsets are kept as public offsets plus, per view, the running total of
the bytes its full lines add (``_Extra``): finding an offset is two binary searches,
and reading costs the lines read, whatever the view.
"""

from __future__ import annotations

import bisect
import enum
import logging
import time
from array import array
from dataclasses import dataclass, field

from axfs import privacy

log = logging.getLogger(__name__)
SYSTEM = -1  # the owner of a line without a uid


class Event(enum.StrEnum):
    """The name of a trace line (its fourth column). A StrEnum: a line is made from it
    as from the string it is, at no extra cost."""

    ABORT_STEP = "abort_step"
    ADMIT = "admit"
    CONFIG = "config"
    DONE = "done"
    ENDPOINT_DOWN = "endpoint_down"
    ENDPOINT_UP = "endpoint_up"
    ERROR = "error"
    EVICT = "evict"
    FIRST_TOKEN = "first_token"
    FORK = "fork"
    JOURNAL_ERROR = "journal_error"
    JOURNAL_LOAD = "journal_load"
    JOURNAL_OK = "journal_ok"
    JOURNAL_TORN = "journal_torn"
    KILL = "kill"
    MODEL_ADD = "model_add"
    MODEL_COPY = "model_copy"
    MODEL_DEFAULT = "model_default"
    MODEL_ENDPOINTS = "model_endpoints"
    MODEL_LOAD = "model_load"
    MODEL_LOADING = "model_loading"
    MODEL_REMOVE = "model_remove"
    MODEL_UNLOAD = "model_unload"
    MOVE = "move"
    PREEMPT = "preempt"
    PREFILL = "prefill"
    PRIORITY = "priority"
    REJECT = "reject"
    REMOVE = "remove"
    REPLAY = "replay"
    RESUME = "resume"
    STEP_ERROR = "step_error"
    SUBMIT = "submit"
    SWAP_IN = "swap_in"
    SWAP_OUT = "swap_out"
    TRACE_DROPPED = "trace_dropped"


def _value(v: object) -> str:
    s = str(v)
    return repr(s) if (not s or any(c in s for c in " \n\t=\"'")) else s


def _stamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _line(stamp: str, event: Event, task: str, uid: int | str, details: dict[str, object]) -> bytes:
    """``time task uid event key=value...``; values with spaces are quoted."""
    extra = "".join(f" {k}={_value(v)}" for k, v in details.items())
    return f"{stamp} {task} {uid} {event}{extra}\n".encode()


@dataclass(slots=True)
class _Extra:
    """The bytes a view's full lines add to the public offsets: for each line it sees
    in full that differs from its public form, the line's number and the total so far."""

    seqs: array[int] = field(default_factory=lambda: array("q"))
    totals: array[int] = field(default_factory=lambda: array("q"))
    base: int = 0  # the total of entries forgotten (older than every remembered line)

    def add(self, seq: int, extra: int) -> None:
        """Line ``seq``, newer than every line added before, adds ``extra`` bytes."""
        self.seqs.append(seq)
        self.totals.append((self.totals[-1] if self.totals else self.base) + extra)

    def through(self, seq: int) -> int:
        """The bytes added by lines up to ``seq``, included."""
        k = bisect.bisect_right(self.seqs, seq)
        return self.totals[k - 1] if k else self.base

    def forget(self, before: int) -> None:
        k = bisect.bisect_left(self.seqs, before)
        if k:
            self.base = self.totals[k - 1]
            del self.seqs[:k]
            del self.totals[:k]


class Trace:
    def __init__(self, max_lines: int = 20_000) -> None:
        self._max_lines = max_lines
        # Kept lines (full, public, owner uid), from index _head; line number (seq) s is
        # at _head + s - _first.
        self._lines: list[tuple[bytes, bytes, int] | None] = []
        self._head = 0
        self._first = 0  # seq of the first kept line: lines before it were dropped
        self._next = 0  # seq of the next line
        # Public end offsets of lines _remembered.. _next-1 (dropped ones too, so that a
        # reader that fell behind can be told how many it missed).
        self._ends: array[int] = array("q")
        self._remembered = 0
        self._forgotten_end = 0  # public end of the last line no longer remembered
        self._extra: dict[privacy.Viewer, _Extra] = {None: _Extra()}

    @property
    def dropped_lines(self) -> int:
        return self._first

    @property
    def size(self) -> int:
        return self.size_for(None)

    def size_for(self, who: privacy.Viewer) -> int:
        """The size of the trace in ``who``'s view: every byte it ever showed them."""
        return self._end(self._next - 1, self._view(who))

    def emit(self, event: Event, task: str = "-", uid: int | str = "-", **details: object) -> None:
        """Add ``time task uid event key=value...``; values with spaces are quoted."""
        stamp = _stamp()
        line = _line(stamp, event, task, uid, details)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("trace: %s", line.decode().rstrip())
        public = privacy.public_line(event, task, uid, details)
        short = line if public is None else _line(stamp, event, public[0], uid, public[1])
        owner = uid if isinstance(uid, int) else SYSTEM
        seq = self._next
        self._next += 1
        self._lines.append((line, short, owner))
        self._ends.append((self._ends[-1] if self._ends else self._forgotten_end) + len(short))
        if len(short) != len(line):
            self._extra[None].add(seq, len(line) - len(short))
            if owner != SYSTEM:
                self._extra.setdefault(owner, _Extra()).add(seq, len(line) - len(short))
        while self._next - self._first > self._max_lines:
            self._lines[self._head] = None
            self._head += 1
            self._first += 1
        if self._head > self._max_lines:
            del self._lines[: self._head]
            self._head = 0
        if self._first - self._remembered > 4 * self._max_lines:
            self._forget((self._first - self._remembered) // 2)

    def _forget(self, n: int) -> None:
        """Stop remembering the ends of the oldest ``n`` dropped lines (a reader that far
        behind is told it missed at least as many as are remembered)."""
        self._forgotten_end = self._ends[n - 1]
        del self._ends[:n]
        self._remembered += n
        for extra in self._extra.values():
            extra.forget(self._remembered)

    def _view(self, who: privacy.Viewer) -> _Extra | None:
        """``who``'s extra bytes (None: the view has only public lines of others)."""
        return self._extra.get(who)

    def _end(self, seq: int, view: _Extra | None) -> int:
        """The offset just past line ``seq`` (a remembered one, or the one before them)
        in ``view`` (None: public offsets)."""
        end = self._forgotten_end if seq < self._remembered else self._ends[seq - self._remembered]
        return end if view is None else end + view.through(seq)

    def _text(self, seq: int, who: privacy.Viewer) -> bytes:
        entry = self._lines[self._head + seq - self._first]
        assert entry is not None
        full, short, owner = entry
        return full if who is None or owner == who else short

    def missed(self, offset: int, who: privacy.Viewer = None) -> int:
        """Dropped lines that end after ``offset`` (at least that many, for an offset
        older than the ones remembered)."""
        view = self._view(who)
        seqs = range(self._remembered, self._first)
        return len(seqs) - bisect.bisect_right(seqs, offset, key=lambda s: self._end(s, view))

    def read_for(self, offset: int, size: int, who: privacy.Viewer = None) -> tuple[bytes, int]:
        """What a reader at ``offset`` in ``who``'s view gets, and the offset it reaches.

        A reader whose next lines were dropped first gets one line saying how many."""
        base = self._end(self._first - 1, self._view(who))
        if offset >= base:
            data, start = self.read(offset, size, who)
            return data, start + len(data)
        n = self.missed(offset, who)
        forgotten = offset < self._end(self._remembered - 1, self._view(who))
        notice = _line(_stamp(), Event.TRACE_DROPPED, "-", "-", {
            "lines": f"{n}{'+' if forgotten and self._remembered else ''}",
            "reason": f"this reader fell behind the {self._max_lines} lines kept"})
        if len(notice) >= size:
            data, start = self.read(offset, size, who)
            return data, start + len(data)
        data, start = self.read(base, size - len(notice), who)
        return notice + data, start + len(data)

    def read(self, offset: int, size: int, who: privacy.Viewer = None) -> tuple[bytes, int]:
        """Bytes from ``offset`` in ``who``'s view (at most ``size``) and the offset they
        start at.

        The start is later than ``offset`` when those lines were already dropped.
        """
        view = self._view(who)
        start = max(offset, self._end(self._first - 1, view))
        kept = range(self._first, self._next)
        seq = self._first + bisect.bisect_right(kept, start, key=lambda s: self._end(s, view))
        if seq >= self._next:
            return b"", start
        skip = start - self._end(seq - 1, view)
        out = bytearray(self._text(seq, who)[skip:])
        seq += 1
        while len(out) < size and seq < self._next:
            out += self._text(seq, who)
            seq += 1
        return bytes(out[:size]), start
