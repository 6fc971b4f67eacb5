"""A task turns tokens into text: whole UTF-8 characters, stop strings, limits."""

from __future__ import annotations

from axfs.config import TaskConfig
from axfs.task import State, Task


def running(**config: object) -> Task:
    task = Task("1", 0, 0, TaskConfig(model="m", **config))  # type: ignore[arg-type]
    task.submit("p", [1, 2])
    task.start(0, 100)
    task.num_cached = 2
    return task


def feed(task: Task, *pieces: bytes) -> None:
    for i, p in enumerate(pieces):
        task.add_token(100 + i, p, eog=False, limit_reached=False)


def test_a_character_split_across_tokens_is_published_whole() -> None:
    task = running()
    euro = "€".encode()
    feed(task, b"a", euro[:1])
    assert bytes(task.output) == b"a"
    feed(task, euro[1:2])
    assert bytes(task.output) == b"a"
    feed(task, euro[2:])
    assert task.output.decode() == "a€"


def test_invalid_bytes_become_replacement_characters_never_raw() -> None:
    task = running()
    feed(task, b"\xff", b"ok", b"\xe2\x82")
    task.add_token(2, b"", eog=True, limit_reached=False)
    assert task.output.decode() == "\ufffdok\ufffd"


def test_stop_string_across_tokens_ends_the_task_without_it() -> None:
    task = running(stop=["END"])
    feed(task, b"hello E")
    assert bytes(task.output) == b"hello "  # "E" may start END: held back
    feed(task, b"N")
    feed(task, b"D and more")
    assert task.state is State.DONE and task.finish_reason == "stop"
    assert bytes(task.output) == b"hello "


def test_held_text_is_published_when_it_does_not_become_a_stop() -> None:
    task = running(stop=["END"])
    feed(task, b"hello E", b"x")
    assert bytes(task.output) == b"hello Ex"


def test_max_tokens_ends_with_reason_length() -> None:
    task = running(max_tokens=3)
    feed(task, b"a", b"b")
    assert task.state is State.RUNNING
    feed(task, b"c")
    assert (task.state, task.finish_reason, bytes(task.output)) == (State.DONE, "length", b"abc")


def test_end_of_generation_token_adds_no_text() -> None:
    task = running()
    feed(task, b"a")
    task.add_token(2, b"</s>", eog=True, limit_reached=False)
    assert (task.finish_reason, bytes(task.output)) == ("eos", b"a")


def test_context_limit_ends_with_reason_context() -> None:
    task = running()
    task.add_token(5, b"x", eog=False, limit_reached=True)
    assert (task.state, task.finish_reason) == (State.DONE, "context")


def test_pending_is_the_prompt_then_the_last_token_then_all_after_dropping_kv() -> None:
    task = Task("1", 0, 0, TaskConfig(model="m"))
    task.submit("p", [1, 2, 3])
    task.start(0, 100)
    assert task.pending() == [1, 2, 3]
    task.num_cached = 3
    feed(task, b"a")
    assert task.pending() == [100] and task.kv_cells == 3
    task.num_cached = 4
    feed(task, b"b")
    task.preempt(keep_kv=False)
    assert task.state is State.PREEMPTED and task.num_preempted == 1
    assert task.pending() == [1, 2, 3, 100, 100]  # feed() numbers tokens from 100 each call


def test_notify_wakes_a_waiter_taken_before_the_change() -> None:
    task = running()
    event = task.changed
    feed(task, b"a")
    assert event.is_set()
    assert not task.changed.is_set()
