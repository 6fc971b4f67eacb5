"""The journal and the keeper with the fake driver: records, torn tails, restore, retention."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
import trio

from axfs.config import TaskConfig
from axfs.errors import NotRecorded
from axfs.journal import NAME, Journal
from axfs.kernel import Kernel
from axfs.models import Registry
from axfs.persist import Keeper, Retention
from axfs.task import State, Task
from axfs.trace import Trace
from tests.fakes import FakeDriver, local
from tests.test_sched import run_until, start


def kernel(state: Path, **retention: float) -> Kernel:
    keeper = Keeper(Journal(state, interval=0.05), "sha-a", Retention(**retention))  # type: ignore[arg-type]
    return Kernel(FakeDriver(n_seq_max=4, n_ctx=4000), keeper=keeper)


async def run(k: Kernel, until: list[Task], extra: float = 0.2) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: all(t.finished for t in until))
        await trio.sleep(extra)  # a journal flush
        nursery.cancel_scope.cancel()
    k.close()


async def test_finished_tasks_come_back_as_they_were(tmp_path: Path) -> None:
    k = kernel(tmp_path)
    k.restore()
    a = await start(k, 1, "hello", max_tokens=5, temperature=0)
    b = await start(k, 2, "other", max_tokens=3, stop="c")
    await run(k, [a, b])
    k2 = kernel(tmp_path)
    k2.restore()
    a2, b2 = k2.get(a.id), k2.get(b.id)
    for old, new in [(a, a2), (b, b2)]:
        assert (new.state, new.output, new.output_tokens, new.prompt, new.prompt_tokens) == (
            old.state, old.output, old.output_tokens, old.prompt, old.prompt_tokens)
        assert new.config == old.config and new.uid == old.uid and new.finish_reason == old.finish_reason
        assert new.submitted_at == old.submitted_at and new.timeline
    assert k2.latest(1) is a2 and k2.latest(2) is b2
    assert k2.create(1, 1).id == "3"  # ids go on from the journal's


async def test_unfinished_tasks_run_on_from_their_tokens(tmp_path: Path) -> None:
    k = kernel(tmp_path)
    k.restore()
    assert isinstance(local(k).driver, FakeDriver)
    local(k).driver.step_delay = 0.002
    long = await start(k, 1, "a", max_tokens=300, temperature=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: long.num_generated >= 20)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    k.close()  # as after a crash: no end record
    queued = len(long.output_tokens)
    k2 = kernel(tmp_path)
    k2.restore()
    again = k2.get(long.id)
    assert again.state is State.QUEUED and len(again.output_tokens) >= 20
    assert again.output_tokens == long.output_tokens[: len(again.output_tokens)]
    await run(k2, [again])
    assert again.state is State.DONE and again.num_generated == 300 and queued < 300
    letters = "".join(chr(ord("a") + (i + 1) % 26) for i in range(300))
    assert again.output.decode() == letters


async def test_a_torn_tail_is_cut_and_reported(tmp_path: Path) -> None:
    k = kernel(tmp_path)
    k.restore()
    a = await start(k, 1, "hello", max_tokens=3)
    await run(k, [a])
    path = tmp_path / NAME
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(msgpack.packb({"t": "task", "id": "torn", "prompt": "x" * 100})[:-30])
    k2 = kernel(tmp_path)
    k2.restore()
    assert k2.get(a.id).state is State.DONE and "torn" not in k2.tasks
    assert " journal_torn offset=" in k2.trace.read(0, 1 << 20)[0].decode()
    assert path.stat().st_size <= good + 200  # cut, then compacted


async def test_retention_drops_the_oldest_finished_tasks(tmp_path: Path) -> None:
    k = kernel(tmp_path, keep_tasks=2)
    k.restore()
    tasks = [await start(k, 1, "x", max_tokens=1) for _ in range(4)]
    await run(k, tasks)
    k2 = kernel(tmp_path, keep_tasks=2)
    k2.restore()
    assert sorted(k2.tasks) == [tasks[2].id, tasks[3].id]
    k3 = kernel(tmp_path, keep_tasks=2)
    loaded = k3.keeper.journal.load() if k3.keeper else None
    assert loaded is not None and sorted(loaded.tasks) == [tasks[2].id, tasks[3].id]


async def test_removed_tasks_stay_removed(tmp_path: Path) -> None:
    k = kernel(tmp_path)
    k.restore()
    a = await start(k, 1, "x", max_tokens=2)
    await run(k, [a], extra=0)
    k.remove(a)
    k.close()
    k2 = kernel(tmp_path)
    k2.restore()
    assert a.id not in k2.tasks


async def test_a_write_error_refuses_submissions_and_accepted_tasks_still_run(tmp_path: Path) -> None:
    k = kernel(tmp_path)
    k.restore()
    assert k.keeper is not None
    journal = k.keeper.journal
    a = await start(k, 1, "x", max_tokens=5)
    flush, size = journal.flush, journal.path.stat().st_size

    def full(sync: bool) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    journal.flush = full  # type: ignore[method-assign]
    with pytest.raises(NotRecorded) as refused:
        await start(k, 1, "y", max_tokens=5)
    assert refused.value.errno == errno.ENOSPC and "refuses work" in str(refused.value)
    assert journal.path.stat().st_size == size  # nothing of the refused task is in the file
    assert k.keeper.state.startswith("refusing work (journal write failed: No space left")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: a.finished)
        journal.flush = flush  # type: ignore[method-assign]
        b = await start(k, 1, "z", max_tokens=5)
        await run_until(k, lambda: b.finished)
        nursery.cancel_scope.cancel()
    assert a.state is State.DONE and b.state is State.DONE and k.keeper.state == "ok"
    trace = k.trace.read(0, 1 << 20)[0].decode()
    assert "journal_error reason='journal write failed: No space left on device'" in trace
    assert " journal_ok " in trace and k.keeper.num_errors >= 1
    assert len([t for t in k.tasks.values() if t.state is State.DRAFT]) == 1  # y: still a draft


async def test_a_queued_tasks_new_config_and_a_kill_are_on_disk_when_the_write_returns(
        tmp_path: Path) -> None:
    """No k.run here: nothing flushes the journal in the background, so what is on disk
    is what the writes themselves put there (a crash right after them loses nothing)."""
    k = kernel(tmp_path)
    k.restore()
    queued = await start(k, 1, "a", max_tokens=50, temperature=0)
    doomed = await start(k, 1, "b", max_tokens=50)
    k.configure(queued, "max_tokens 7\nseed 5\n")
    k.control(doomed, "kill")
    k2 = kernel(tmp_path)  # the first one never closed: as after SIGKILL
    k2.restore()
    again = k2.get(queued.id)
    assert (again.config.max_tokens, again.config.seed) == (7, 5)
    assert k2.get(doomed.id).state is State.KILLED


def test_submissions_that_arrive_together_share_one_fsync(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path)
    journal.open()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.02)  # a disk's flush: the other submissions queue meanwhile
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    threads = [threading.Thread(target=journal.commit, args=({"t": "task", "id": str(i)},))
               for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal.close()
    assert journal.records == 40 and 2 <= journal.syncs <= 20
    with open(journal.path, "rb") as f:
        ids = sorted(int(r["id"]) for r in msgpack.Unpacker(f, raw=False))
    assert ids == list(range(40))


def test_a_group_that_cannot_be_written_is_refused_whole(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path)
    journal.commit({"t": "task", "id": "kept"})
    size = journal.path.stat().st_size
    real_fsync, failed = os.fsync, threading.Event()

    def full(fd: int) -> None:
        time.sleep(0.02)
        if not failed.is_set():
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    errors: list[str] = []

    def submit(i: int) -> None:
        try:
            journal.commit({"t": "task", "id": str(i)})
        except OSError as e:
            errors.append(str(i) if e.errno == errno.ENOSPC else repr(e))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal.close()
    with open(journal.path, "rb") as f:
        kept = [r["id"] for r in msgpack.Unpacker(f, raw=False)]
    assert errors and all(e.isdigit() for e in errors)
    assert sorted(kept[1:] + errors, key=int) == [str(i) for i in range(10)]  # each once
    assert kept[0] == "kept" and journal.path.stat().st_size > size


def test_a_remote_tasks_text_and_turns_are_kept_and_survive_compaction(tmp_path: Path) -> None:
    """A remote task's token ids are not known: the journal keeps its text with them."""
    keeper = Keeper(Journal(tmp_path), "sha")
    task = Task("r", 1, 1, TaskConfig())
    task.turns = [("user", "hi")]
    task.submit("hi", [])
    task.remote = True
    keeper.submitted(task)
    for piece in ("Hel", "lo"):
        task.add_text(piece)
    keeper.sync()
    task.add_text(" wörld")
    keeper.sync()

    def load(tokens: int) -> Task:
        [(again, generated)], _ = Keeper(Journal(tmp_path), "sha").load(Trace())
        assert generated == [-1] * tokens
        return again

    again = load(3)
    assert again.output == "Hello wörld".encode() and again.remote
    assert again.turns == [("user", "hi")] and not again.finished
    kept = SimpleNamespace(trace=Trace(), tasks={"r": task}, registry=Registry())
    keeper.compact(kept)  # type: ignore[arg-type]
    task.add_text("!")
    keeper.close()
    assert load(4).output == "Hello wörld!".encode()
