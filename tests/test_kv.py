"""The KV manager with the fake driver: shared blocks, prefix cache, eviction, fork, swap."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from axfs.config import TaskConfig
from axfs.fs import views
from axfs.kernel import Kernel
from axfs.kv import MIN_KEPT, WAIT_GAIN, KVManager
from axfs.prefixes import common_prefix
from axfs.swap import SwapSpace
from axfs.task import State, Task
from tests.fakes import FakeDriver, GatedDriver, local, run_steps, settle
from tests.test_sched import run_until, start


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 9], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3], 10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2
    assert common_prefix([5], [1], 10) == 0
    assert common_prefix(list(range(1000)), [*range(700), 0], 5000) == 700


def made(tokens: list[int], max_tokens: int = 10) -> Task:
    task = Task(str(tokens[0]), 0, 0, TaskConfig(max_tokens=max_tokens))
    task.submit("x", tokens)
    return task


def test_shared_cells_count_once_and_go_with_their_last_holder() -> None:
    kv = KVManager(capacity_cells=1000, slots=4, cell_bytes=2, seq_limit=1000)
    a = made(list(range(1, 101)))
    adm = kv.plan(a)
    assert adm is not None and adm.source is None
    kv.commit(adm)
    kv.blocks.grow(a.seq or 0, 100)
    a.num_cached = 100
    b = made([*range(1, 61), 500, 501])
    adm = kv.plan(b)
    assert adm is not None and adm.source == a.seq and adm.prefix == 60
    kv.commit(adm)
    assert b.num_cached == 60 and kv.used_cells == 100  # the copy costs no cells
    kv.blocks.grow(b.seq or 0, 2)
    stats = kv.stats()
    assert stats.used_cells == 102 and stats.running_cells == 102 and stats.cached_cells == 0
    assert kv.release(a, cache=True) == []  # a stays cached
    stats = kv.stats()
    assert (stats.running_cells, stats.cached_cells, stats.slots_cached) == (62, 40, 1)
    assert kv.release(b, cache=False) == [1] and kv.used_cells == 100  # a still holds the 60 shared cells
    assert kv.stats().cached_cells == 100


def test_a_full_cache_evicts_the_least_recently_used_cached_sequence() -> None:
    kv = KVManager(capacity_cells=900, slots=8, cell_bytes=2, seq_limit=900, cache_limit=900)
    old, new = made([1] * 300, 0), made([2] * 300, 0)
    for t in (old, new):
        adm = kv.plan(t)
        assert adm is not None
        kv.commit(adm)
        kv.blocks.grow(t.seq or 0, 300)
        t.num_cached = 300
        kv.release(t, cache=True)
    third = made([3] * 450, 0)
    adm = kv.plan(third)
    assert adm is not None and adm.evict == [0]  # old had slot 0
    kv.commit(adm)
    assert kv.counters.evictions == 1 and kv.stats().slots_cached == 1
    assert kv.cached(1) is not None and kv.cached(0) is None


def test_a_short_ended_sequence_stays_cached_only_while_it_is_the_newest() -> None:
    kv = KVManager(capacity_cells=4000, slots=8, cell_bytes=2, seq_limit=4000)
    ended = []
    for first, n in ((1, MIN_KEPT), (2, 50), (3, 60)):
        t = made([first] * n, 0)
        adm = kv.plan(t)
        assert adm is not None
        kv.commit(adm)
        kv.blocks.grow(t.seq or 0, n)
        t.num_cached = n
        ended.append(t.seq)
        kv.release(t, cache=True)
    # the long one and the newest short one; the older short one went at once
    assert kv.cached_slots() == [ended[0], ended[2]]
    assert kv.counters.evictions == 1 and kv.stats().cached_cells == MIN_KEPT + 60


def test_a_task_too_big_for_what_can_be_freed_waits() -> None:
    kv = KVManager(capacity_cells=100, slots=2, cell_bytes=2, seq_limit=100)
    a = made([1] * 50, 30)
    adm = kv.plan(a)
    assert adm is not None
    kv.commit(adm)
    assert kv.plan(made([2] * 30, 10)) is None  # 80 reserved: 20 free
    assert kv.plan(made([2] * 10, 10)) is not None


@pytest.fixture
async def kernel() -> AsyncIterator[Kernel]:
    k = Kernel(FakeDriver(n_seq_max=4, n_ctx=4000, n_batch=64))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        yield k
        nursery.cancel_scope.cancel()


async def finish(k: Kernel, prompt: str, max_tokens: int = 5, uid: int = 1) -> Task:
    task = await start(k, uid, prompt, max_tokens=max_tokens, temperature=0)
    await run_until(k, lambda: task.finished)
    return task


async def test_a_prompt_that_begins_like_an_ended_one_copies_its_prefix(kernel: Kernel) -> None:
    system = "system: be brief. " * 15  # long enough to stay cached (MIN_KEPT)
    first = await finish(kernel, system + "question one")
    driver = local(kernel).driver
    assert isinstance(driver, FakeDriver)
    steps = len(driver.steps)
    second = await finish(kernel, system + "question two")
    assert driver.copies and driver.copies[-1][2] == len(system + "question ")
    assert second.prefix_reused == len(system + "question ")
    fed = sum(len(p.tokens) for step in driver.steps[steps:] for p in step)
    assert fed == len("two") + 4  # the rest of the prompt, then one token a step
    assert first.output == b"fghij" and second.output == b"pqrst"  # the fake's next letters
    mem = local(kernel).kv.counters
    assert mem.prefix_hits == 1 and mem.prefix_tokens == len(system + "question ")
    stats = local(kernel).kv.stats()
    assert stats.used_cells == stats.running_cells + stats.cached_cells
    assert stats.slots_cached == 2
    assert "PrefixHits:" in views.memory(kernel) and "KVCached:" in views.memory(kernel)


async def test_a_task_waits_for_a_prefix_another_is_computing(kernel: Kernel) -> None:
    system = "x" * 200  # prefilled over several 64-token steps
    a = await start(kernel, 1, system + "a", max_tokens=3, temperature=0)
    b = await start(kernel, 2, system + "b", max_tokens=3, temperature=0)
    await run_until(kernel, lambda: a.finished and b.finished)
    assert 200 - WAIT_GAIN < b.prefix_reused <= 200 and a.prefix_reused == 0


async def test_a_burst_waits_for_its_prefix_instead_of_preempting_the_task_computing_it() -> None:
    # Tasks that arrive while the first computes the shared text rank above it once it has
    # been charged for it. Each lacks room for a whole copy of the text (3,000 cells), but
    # needs none: it must wait for the prefix, not preempt the task computing it (the next
    # in line then started the shared text over, 64 tokens at a time, round after round).
    driver = GatedDriver(n_seq_max=4, n_ctx=3000, n_batch=64)
    k = Kernel(driver)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        shared = "x" * 2000
        first = await start(k, 1, shared + "a", max_tokens=3, temperature=0)
        await run_steps(driver, 3)
        burst = [await start(k, 1, shared + c, max_tokens=3, temperature=0) for c in "bcdefg"]
        await settle(driver, lambda: all(t.finished for t in [first, *burst]))
        nursery.cancel_scope.cancel()
    assert first.prefix_reused == 0
    assert all(t.prefix_reused >= 2000 - WAIT_GAIN for t in burst)
    fed = sum(len(p.tokens) for step in driver.steps for p in step)
    assert fed < 2000 + 7 * (WAIT_GAIN + 4)


async def test_prefix_cache_off_copies_nothing() -> None:
    k = Kernel(FakeDriver(n_seq_max=4, n_ctx=4000), prefix_cache=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await finish(k, "the same long prompt, twice")
        second = await finish(k, "the same long prompt, twice")
        nursery.cancel_scope.cancel()
    assert second.prefix_reused == 0 and local(k).kv.stats().slots_cached == 0


async def test_fork_continues_the_parent_and_shares_its_cells(kernel: Kernel) -> None:
    parent = await finish(kernel, "hello there", max_tokens=4)
    child = await kernel.fork(parent, 1, 1, b" and more\n")
    await run_until(kernel, lambda: child.finished)
    assert child.parent == parent.id and child.prompt == " and more"
    assert child.prompt_tokens == parent.prompt_tokens + parent.output_tokens + [
        ord(c) for c in " and more"]
    assert child.prefix_reused == len(parent.prompt_tokens) + len(parent.output_tokens) - 1
    assert child.state is State.DONE and kernel.latest(1) is child


async def test_a_fork_of_a_running_task_waits_for_it(kernel: Kernel) -> None:
    parent = await start(kernel, 1, "slow", max_tokens=200, temperature=0)
    child = await kernel.fork(parent, 1, 1, b"next")
    assert child.state is State.QUEUED and not child.prompt_tokens
    await run_until(kernel, lambda: child.finished)
    assert parent.finished_at <= child.started_at
    assert child.prompt_tokens[: parent.num_history] == parent.prompt_tokens + parent.output_tokens


async def test_a_fork_of_a_failed_task_fails_with_the_reason(kernel: Kernel) -> None:
    parent = await start(kernel, 1, "doomed", max_tokens=200)
    child = await kernel.fork(parent, 1, 1, b"next")
    local(kernel).engine.end(parent, State.FAILED, "error", "model error: boom")
    assert child.state is State.FAILED and "boom" in child.error


async def test_preempted_state_beyond_the_memory_budget_goes_to_disk(tmp_path: Path) -> None:
    driver = FakeDriver(n_seq_max=1, n_ctx=1 << 16)
    driver.step_delay = 0.002
    k = Kernel(driver, swap=SwapSpace(0, tmp_path / "swap"))
    local(k).scheduler.costs.prefill_s_per_token = 1.0  # saving is always cheaper: keep KV
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        hog = await start(k, 1, "a" * 100, max_tokens=300)
        await run_until(k, lambda: hog.num_generated > 10)
        guest = await start(k, 2, "b", max_tokens=5)
        await run_until(k, lambda: local(k).engine.swap.disk_count == 1)
        assert list((tmp_path / "swap").iterdir()) == [tmp_path / "swap" / f"{hog.id}.kv"]
        await run_until(k, lambda: guest.finished and hog.finished, limit=20)
        nursery.cancel_scope.cancel()
    swap = local(k).engine.swap
    assert swap.outs >= 1 and swap.ins >= 1 and swap.disk_count == 0 and swap.disk_bytes == 0
    assert not list((tmp_path / "swap").iterdir())
    assert hog.num_preempted >= 1 and hog.state is State.DONE and hog.num_generated == 300
    assert "SwapOuts:" in views.memory(k)


def test_cached_cells_past_the_limit_go_oldest_first_but_the_newest_stays() -> None:
    kv = KVManager(capacity_cells=1000, slots=8, cell_bytes=2, seq_limit=1000, cache_limit=150)
    evicted = []
    for i in range(3):
        t = made([i + 1] * 100, 0)
        adm = kv.plan(t)
        assert adm is not None
        kv.commit(adm)
        kv.blocks.grow(t.seq or 0, 100)
        t.num_cached = 100
        evicted.append(kv.release(t, cache=True))
    assert [len(e) for e in evicted] == [0, 1, 1] and kv.stats().cached_cells == 100
    assert kv.counters.evictions == 2
    big = made([9] * 400, 0)
    adm = kv.plan(big)
    assert adm is not None
    kv.commit(adm)
    kv.blocks.grow(big.seq or 0, 400)
    big.num_cached = 400
    assert len(kv.release(big, cache=True)) == 1 and kv.stats().cached_cells == 400  # over, kept
