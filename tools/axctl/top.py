"""``axctl top``: the tasks, live, like htop: one row a task from its ``status`` file.

A frame is plain text built by ``frame()`` from a ``Snapshot`` of the tree, so the same
frame is drawn by curses in a terminal and printed by ``--once``. Ended tasks cannot
change, so their status is read once and kept.
"""

from __future__ import annotations

import contextlib
import curses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from axfs.fields import parse_fields
from tools.axctl.overview import user_name
from tools.axctl.tree import ENDED, STATES, Tree, TreeError, first_number

HELP = "q quit  up/down select  < > sort column  r reverse  k kill  a show/hide ended"


@dataclass(slots=True)
class Row:
    id: str
    user: str
    model: str
    state: str
    priority: int
    tokens: int
    rate: float | None
    kv: int
    wait_ms: float
    prompt: str
    submitted: str  # ISO time, to the second: "-" for a draft


def _id_key(r: Row) -> tuple[bool, int, str]:
    return (not r.id.isdigit(), int(r.id) if r.id.isdigit() else 0, r.id)


def _rate(r: Row) -> str:
    return f"{r.rate:.1f}" if r.rate is not None else "-"


def _wait(r: Row) -> str:
    return f"{r.wait_ms / 1000:.1f}s"


@dataclass(frozen=True, slots=True)
class Column:
    title: str
    width: int  # 0: as wide as the widest value
    text: Callable[[Row], str]
    key: Callable[[Row], Any]
    descending: bool = False  # the natural order: counters highest first, like htop


COLUMNS = (
    Column("ID", 0, lambda r: r.id, _id_key),
    Column("USER", 8, lambda r: r.user, lambda r: r.user),
    Column("MODEL", 0, lambda r: r.model, lambda r: r.model),
    Column("STATE", 9, lambda r: r.state, lambda r: STATES.index(r.state) if r.state in STATES else 99),
    Column("PRIO", 5, lambda r: str(r.priority), lambda r: r.priority, True),
    Column("TOKENS", 7, lambda r: str(r.tokens), lambda r: r.tokens, True),
    Column("TOK/S", 7, _rate, lambda r: r.rate or 0.0, True),
    Column("KV", 7, lambda r: str(r.kv), lambda r: r.kv, True),
    Column("WAIT", 7, _wait, lambda r: r.wait_ms, True),
)
SORT_DEFAULT = 3  # STATE: running tasks first


@dataclass(slots=True)
class Snapshot:
    rows: list[Row]
    memory: dict[str, str]
    sched: dict[str, str]
    taken: float


@dataclass(slots=True)
class Reader:
    """Reads snapshots; remembers the rows of ended tasks, which cannot change."""

    tree: Tree
    ended: dict[str, Row] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)

    def row(self, task: str) -> Row | None:
        if task in self.ended:
            return self.ended[task]
        try:
            s = self.tree.status(task)
        except TreeError:
            return None  # removed while we looked
        state = s.get("state", "?")
        if task not in self.prompts or state == "draft":
            self.prompts[task] = " ".join(self._prompt(task).split())[:200]
        rate = s.get("decode_tokens_per_second", "-")
        row = Row(task, user_name(s.get("uid", "?")), s.get("model", "?"), state,
                  int(first_number(s.get("priority"))), int(first_number(s.get("generated_tokens"))),
                  None if rate == "-" else first_number(rate), int(first_number(s.get("kv_cells"))),
                  first_number(s.get("waited_ms")), self.prompts[task], s.get("submitted", "-"))
        if state in ENDED:
            self.ended[task] = row
        return row

    def _prompt(self, task: str) -> str:
        try:
            with open(self.tree.path(f"tasks/{task}/prompt"), "rb") as f:
                return f.read(400).decode(errors="replace")
        except OSError:
            return ""

    def snapshot(self) -> Snapshot:
        ids = self.tree.task_ids()
        for gone in set(self.ended) - set(ids):
            del self.ended[gone]
            self.prompts.pop(gone, None)
        rows = [r for r in map(self.row, ids) if r is not None]
        return Snapshot(rows, parse_fields(self.tree.read("memory")), parse_fields(self.tree.read("sched")),
                        time.monotonic())


@dataclass(slots=True)
class View:
    """What the person chose: the sort column and order, the selection, ended tasks shown."""

    sort: int = SORT_DEFAULT
    reverse: bool = False
    show_ended: bool = True
    selected: str | None = None

    def rows(self, snap: Snapshot) -> list[Row]:
        col = COLUMNS[self.sort]
        rows = [r for r in snap.rows if self.show_ended or r.state not in ENDED]
        rows.sort(key=lambda r: (r.submitted, _id_key(r)), reverse=True)  # ties: newest first
        rows.sort(key=col.key, reverse=col.descending != self.reverse)
        return rows


def _bar(part: float, whole: float, width: int) -> str:
    filled = round(width * part / whole) if whole else 0
    return "|" * min(filled, width) + " " * (width - min(filled, width))


def header(tree: Tree, snap: Snapshot, rate: float | None) -> list[str]:
    m, s = snap.memory, snap.sched
    counts = {st: sum(1 for r in snap.rows if r.state == st) for st in STATES}
    cap, used = first_number(m.get("KVCapacity")), first_number(m.get("KVUsed"))
    reserved = f", {first_number(m['KVReserved']):g} reserved" if "KVReserved" in m else ""
    throughput = f"{rate:.1f} tok/s" if rate is not None else "- tok/s"
    return [
        f"axfs {tree.root}   policy {s.get('policy', '?')}   {throughput}   steps {s.get('steps', '?')}   "
        f"tokens {s.get('tokens', '?')}   preemptions {s.get('preemptions', '?')}",
        f"KV  [{_bar(used, cap, 30)}] {used:g}/{cap:g} cells used{reserved}   "
        f"sequences {m.get('Sequences', '?')}",
        "Tasks " + ", ".join(f"{counts[st]} {st}" for st in STATES),
    ]


def frame(tree: Tree, snap: Snapshot, view: View, rate: float | None, width: int
          ) -> tuple[list[str], list[Row]]:
    """The frame's lines (header, blank, column titles, one line a task) and its rows."""
    rows = view.rows(snap)
    widths = [c.width or max([len(c.title), *(len(c.text(r)) for r in rows)]) for c in COLUMNS]
    widths[0] = min(widths[0], 28)
    widths[2] = min(widths[2], 24)

    def line(cells: list[str], last: str) -> str:
        parts = [c[:w].rjust(w) if col.descending else c[:w].ljust(w)
                 for c, w, col in zip(cells, widths, COLUMNS, strict=True)]
        return (" ".join(parts) + " " + last)[:width].rstrip()

    marks = ["v" if view.reverse != c.descending else "^" for c in COLUMNS]
    titles = [c.title + (marks[i] if i == view.sort else "") for i, c in enumerate(COLUMNS)]
    lines = [*header(tree, snap, rate), "", line(titles, "PROMPT")]
    lines += [line([c.text(r) for c in COLUMNS], r.prompt) for r in rows]
    return lines, rows


def once(tree: Tree, width: int) -> str:
    """One frame as text; the throughput is measured over half a second before it."""
    start, tokens = time.monotonic(), first_number(parse_fields(tree.read("sched")).get("tokens"), -1)
    time.sleep(0.5)
    snap = Reader(tree).snapshot()
    now = first_number(snap.sched.get("tokens"), -1)
    rate = (now - tokens) / (snap.taken - start) if tokens >= 0 and now >= tokens else None
    lines, _ = frame(tree, snap, View(), rate, width)
    return "\n".join(lines) + "\n"


def run(tree: Tree, interval: float) -> None:
    # curses believes COLUMNS and LINES over the terminal's size, also after a resize:
    # exported ones are stale (a shell keeps its own unexported), so the terminal decides.
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
    curses.wrapper(lambda screen: _Live(tree, screen, interval).loop())


class _Live:
    """The curses loop: draw a frame, wait for a key or the next refresh, act on the key."""

    def __init__(self, tree: Tree, screen: curses.window, interval: float) -> None:
        self.tree, self.screen, self.interval = tree, screen, interval
        self.reader = Reader(tree)
        self.view = View()
        self.message = ""
        self.last: tuple[float, float] | None = None  # (time, sched tokens) of the last snapshot
        self.rate: float | None = None
        self.rows: list[Row] = []
        self.lines: list[str] = []

    def loop(self) -> None:
        curses.curs_set(0)
        self.screen.timeout(int(self.interval * 1000))
        snap = self._snapshot()
        while True:
            self._draw(snap)
            key = self.screen.getch()
            if key in (ord("q"), ord("Q"), 27):
                return
            if key == -1 or not self._key(key):
                snap = self._snapshot()

    def _snapshot(self) -> Snapshot:
        snap = self.reader.snapshot()
        tokens = first_number(snap.sched.get("tokens"), -1)
        if self.last is not None and tokens >= 0 and snap.taken > self.last[0]:
            self.rate = max(0.0, tokens - self.last[1]) / (snap.taken - self.last[0])
        self.last = (snap.taken, tokens)
        return snap

    def _key(self, key: int) -> bool:
        """Act on ``key``; True when the frame only needs redrawing, not re-reading."""
        self.message = ""
        ids = [r.id for r in self.rows]
        at = ids.index(self.view.selected) if self.view.selected in ids else 0
        moves = {curses.KEY_UP: -1, curses.KEY_DOWN: 1, curses.KEY_PPAGE: -10, curses.KEY_NPAGE: 10,
                 curses.KEY_HOME: -len(ids), curses.KEY_END: len(ids)}
        if key in moves and ids:
            self.view.selected = ids[max(0, min(len(ids) - 1, at + moves[key]))]
            return True
        if key in (ord("<"), ord(","), curses.KEY_LEFT):
            self.view.sort = (self.view.sort - 1) % len(COLUMNS)
        elif key in (ord(">"), ord("."), curses.KEY_RIGHT):
            self.view.sort = (self.view.sort + 1) % len(COLUMNS)
        elif key == ord("r"):
            self.view.reverse = not self.view.reverse
        elif key == ord("a"):
            self.view.show_ended = not self.view.show_ended
        elif key == ord("k") and ids:
            self._kill(ids[at])
            return False
        elif key == curses.KEY_RESIZE:
            return True
        return True

    def _kill(self, task: str) -> None:
        self.message = f"kill task {task}? y/n"
        self._draw(None)
        self.screen.timeout(-1)
        answer = self.screen.getch()
        self.screen.timeout(int(self.interval * 1000))
        if answer not in (ord("y"), ord("Y")):
            self.message = ""
            return
        try:
            self.tree.control(task, "kill")
            self.message = f"killed task {task}"
        except TreeError as e:
            self.message = str(e)

    def _draw(self, snap: Snapshot | None) -> None:
        height, width = self.screen.getmaxyx()
        if snap is not None:
            self.lines, self.rows = frame(self.tree, snap, self.view, self.rate, width)
            if self.view.selected not in [r.id for r in self.rows]:
                self.view.selected = self.rows[0].id if self.rows else None
        self.screen.erase()
        top = 5  # header lines, a blank line and the column titles come first
        body = max(0, height - top - 1)
        ids = [r.id for r in self.rows]
        at = ids.index(self.view.selected) if self.view.selected in ids else 0
        first = max(0, at - body + 1)
        shown = self.lines[:top] + self.lines[top + first : top + first + body]
        for y, text in enumerate(shown):
            attr = curses.A_REVERSE if y == top - 1 else curses.A_NORMAL
            if y >= top and first + y - top == at:
                attr = curses.A_BOLD | curses.A_REVERSE
            self._put(y, text.ljust(width) if attr != curses.A_NORMAL else text, attr, width)
        self._put(height - 1, self.message or HELP, curses.A_BOLD if self.message else curses.A_DIM, width)
        self.screen.refresh()

    def _put(self, y: int, text: str, attr: int, width: int) -> None:
        with contextlib.suppress(curses.error):  # a terminal too small for the frame
            self.screen.addnstr(y, 0, text, max(0, width - 1), attr)
