"""The trace ring: lines, absolute offsets, dropped lines."""

from __future__ import annotations

from axfs.trace import Trace


def test_lines_have_time_task_uid_event_and_quoted_details() -> None:
    t = Trace()
    t.emit("reject", "7", 1000, reason="prompt is empty", n=3)
    line = t.read(0, 1000)[0].decode()
    stamp, task, uid, event, rest = line.rstrip("\n").split(" ", 4)
    assert stamp.endswith("Z") and (task, uid, event) == ("7", "1000", "reject")
    assert rest == "reason='prompt is empty' n=3"


def test_reads_continue_from_any_offset() -> None:
    t = Trace()
    for i in range(5):
        t.emit("e", str(i))
    whole = t.read(0, 1 << 20)[0]
    assert t.size == len(whole)
    parts = b""
    while len(parts) < t.size:
        parts += t.read(len(parts), 7)[0]
    assert parts == whole


def test_dropped_lines_move_the_start_forward() -> None:
    t = Trace(max_lines=3)
    for i in range(10):
        t.emit("e", str(i))
    data, start = t.read(0, 1 << 20)
    assert start > 0 and t.dropped_lines == 7
    assert [line.split()[1] for line in data.decode().splitlines()] == ["7", "8", "9"]
    assert start + len(data) == t.size


def test_a_reader_that_fell_behind_is_told_how_many_lines_it_missed() -> None:
    t = Trace(max_lines=3)
    t.emit("e", "0")
    first = t.read_for(0, 1 << 20)
    pos = first[1]
    for i in range(1, 11):
        t.emit("e", str(i))
    data, end = t.read_for(pos, 1 << 20)
    lines = data.decode().splitlines()
    assert " trace_dropped lines=7 " in lines[0]
    assert [line.split()[1] for line in lines[1:]] == ["8", "9", "10"]
    assert end == t.size
    assert t.read_for(end, 100) == (b"", end)
