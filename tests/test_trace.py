"""The trace ring: lines, absolute offsets, dropped lines."""

from __future__ import annotations

import random

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


# -- views (axfs.privacy): a user sees their own lines in full, others' public forms --


def test_others_see_counts_and_ids_but_no_text_and_no_task_names() -> None:
    t = Trace()
    t.emit("config", "7", 0, text="stop SECRET")
    t.emit("submit", "mytask", 0, prompt_tokens=5, max_tokens=31337, model="m")
    t.emit("done", "7", 0, reason="length", tokens=4, seconds=0.5)
    t.emit("reject", "-", 0, reason="temperature: 'hunter2' is not a number")
    t.emit("error", "mytask", "-", reason="cannot write swap file /s/mytask.kv")
    t.emit("model_load", model="m", path="/m.gguf")
    root = t.read(0, 1 << 20)[0].decode()
    other = t.read(0, 1 << 20, 1001)[0].decode()
    assert "SECRET" in root and "hunter2" in root and "mytask" in root and "31337" in root
    assert "SECRET" not in other and "hunter2" not in other and "mytask" not in other
    assert "31337" not in other
    rows = [line.split(" ", 1)[1] for line in other.splitlines()]
    assert rows == ["7 0 config", "* 0 submit prompt_tokens=5",
                    "7 0 done reason=length tokens=4 seconds=0.5", "- 0 reject", "* - error",
                    "- - model_load model=m path=/m.gguf"]
    assert t.read(0, 1 << 20, 0)[0].decode() == root.replace(" mytask - error reason='cannot "
                                                         "write swap file /s/mytask.kv'", " * - error")
    mine = Trace()
    mine.emit("config", "7", 1001, text="stop MINE")
    assert b"MINE" in mine.read(0, 100, 1001)[0] and b"MINE" not in mine.read(0, 100, 1000)[0]


def _views_agree(t: Trace, made: list[tuple[bytes, bytes, int]], max_lines: int) -> None:
    """Every view of ``t`` read at every offset is what its lines say it is."""
    for who in (None, 0, 5, 7, 9):
        lines = [full if who is None or owner == who else short for full, short, owner in made]
        whole = b"".join(lines)
        assert t.size_for(who) == len(whole)
        base = len(b"".join(lines[: max(0, len(lines) - max_lines)]))
        for off in range(0, len(whole) + 2, 5):
            for size in (1, 1 << 20):
                data, start = t.read(off, size, who)
                at = max(off, base)
                assert (data, start) == (whole[at : at + size], at)
        if len(lines) <= 4 * max_lines:  # nothing forgotten: missed counts are exact
            ends = [len(b"".join(lines[: i + 1])) for i in range(len(lines) - max_lines)]
            for off in range(base + 1):
                assert t.missed(off, who) == sum(end > off for end in ends)


def test_every_view_has_consistent_sizes_and_offsets() -> None:
    rng = random.Random(18)
    for _ in range(60):
        max_lines = rng.randint(1, 6)
        t = Trace(max_lines=max_lines)
        made = []
        for _ in range(rng.randint(0, 40)):
            details = rng.choice([{}, {"text": "x" * rng.randint(0, 5)}, {"tokens": 3}])
            t.emit(rng.choice(["config", "done"]), rng.choice(["1", "ab", "-"]),
                   rng.choice([0, 5, 7, "-"]), **details)
            made.append(t._lines[-1])
        _views_agree(t, made, max_lines)


def test_a_user_that_fell_behind_gets_the_notice_and_their_own_view_after_it() -> None:
    t = Trace(max_lines=3)
    t.emit("config", "1", 5, text="mine")
    pos = t.read_for(0, 1 << 20, 5)[1]
    for i in range(2, 12):
        t.emit("config", str(i), 0 if i % 2 else 5, text=f"text{i}")
    data, end = t.read_for(pos, 1 << 20, 5)
    lines = data.decode().splitlines()
    assert " trace_dropped lines=7 " in lines[0]
    assert [line.split(" ", 1)[1] for line in lines[1:]] == [
        "9 0 config", "10 5 config text=text10", "11 0 config"]
    assert end == t.size_for(5) and t.read_for(end, 100, 5) == (b"", end)
    # Long after, with the oldest ends forgotten: "at least" that many.
    for _ in range(100):
        t.emit("config", "x", 0, text="t")
    assert " trace_dropped lines=" in t.read_for(pos, 1 << 20, 5)[0].decode().split("\n")[0]
    assert "+ " in t.read_for(0, 1 << 20, 5)[0].decode().split("\n")[0]
