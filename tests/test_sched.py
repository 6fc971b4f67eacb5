"""Scheduling policy with a fake driver: shares, priorities, preemption, FIFO."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import trio

from axfs.fs import views
from axfs.kernel import Kernel
from axfs.task import State, Task
from tests.fakes import FakeDriver, local


async def start(k: Kernel, uid: int, prompt: str = "a", **config: object) -> Task:
    task = k.create(uid, uid)
    k.configure(task, "".join(f"{key} {v}\n" for key, v in {"max_tokens": 60000, **config}.items()))
    await k.submit(task, prompt.encode())
    return task


async def run_until(k: Kernel, done: Callable[[], bool], limit: float = 5) -> None:
    with trio.fail_after(limit):
        while not done():
            await trio.sleep(0.001)


@pytest.fixture
async def kernel1() -> AsyncIterator[Kernel]:
    """One sequence slot: every step runs exactly one task."""
    k = Kernel(FakeDriver(n_seq_max=1, n_ctx=1 << 20))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        yield k
        nursery.cancel_scope.cancel()


async def test_users_share_equally_however_many_tasks_each_has(kernel1: Kernel) -> None:
    a = [await start(kernel1, 1) for _ in range(3)]
    b = await start(kernel1, 2)
    await run_until(kernel1, lambda: sum(t.num_processed for t in [*a, b]) >= 2000)
    used_a = sum(t.num_processed for t in a)
    assert 0.8 < used_a / b.num_processed < 1.25


async def test_priorities_weight_tasks_of_one_user(kernel1: Kernel) -> None:
    hi = await start(kernel1, 1, priority=300)
    lo = await start(kernel1, 1, priority=100)
    await run_until(kernel1, lambda: hi.num_processed + lo.num_processed >= 4000)
    assert 2.5 < hi.num_processed / lo.num_processed < 3.5


async def test_ctl_priority_changes_the_share_while_running(kernel1: Kernel) -> None:
    x = await start(kernel1, 1)
    y = await start(kernel1, 1)
    await run_until(kernel1, lambda: x.num_processed + y.num_processed >= 1000)
    kernel1.control(x, "priority 900")
    base_x, base_y = x.num_processed, y.num_processed
    await run_until(kernel1, lambda: x.num_processed + y.num_processed >= base_x + base_y + 4000)
    gained = (x.num_processed - base_x) / (y.num_processed - base_y)
    assert 6 < gained < 12


async def test_a_second_user_is_not_starved_and_preempts_with_state_kept(kernel1: Kernel) -> None:
    hog = [await start(kernel1, 1) for _ in range(5)]
    await run_until(kernel1, lambda: hog[0].num_processed > 50)
    guest = await start(kernel1, 2, max_tokens=10)
    await run_until(kernel1, lambda: guest.finished, limit=2)
    assert guest.state is State.DONE and guest.output.decode() == "bcdefghijk"
    assert any(t.num_preempted for t in hog)
    assert local(kernel1).driver.saves >= 1  # type: ignore[attr-defined]
    assert local(kernel1).scheduler.num_preemptions >= 1
    assert "preempt" in kernel1.trace.read(0, 1 << 22)[0].decode()


async def test_preempted_task_continues_exactly_where_it_stopped(kernel1: Kernel) -> None:
    first = await start(kernel1, 1, max_tokens=300)
    await run_until(kernel1, lambda: first.num_generated > 20)
    other = await start(kernel1, 2, max_tokens=50)
    await run_until(kernel1, lambda: first.finished and other.finished)
    assert first.num_preempted >= 1
    expected = "".join(chr(ord("a") + (i + 1) % 26) for i in range(300))
    assert first.output.decode() == expected  # the fake driver checks every position too


async def test_recompute_when_it_is_cheaper_gives_the_same_text() -> None:
    k = Kernel(FakeDriver(n_seq_max=1, n_ctx=1 << 20))
    local(k).scheduler.costs.prefill_s_per_token = 1e-12  # recomputing is nearly free: drop the KV
    first = await start(k, 1, max_tokens=200)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: first.num_generated > 20)
        other = await start(k, 2, max_tokens=30)
        await run_until(k, lambda: first.finished and other.finished)
        nursery.cancel_scope.cancel()
    assert first.num_preempted >= 1
    expected = "".join(chr(ord("a") + (i + 1) % 26) for i in range(200))
    assert first.output.decode() == expected
    prefills = [p for step in local(k).driver.steps for p in step if len(p.tokens) > 1]  # type: ignore[attr-defined]
    assert prefills  # the history was fed again


async def test_fifo_policy_does_not_preempt() -> None:
    k = Kernel(FakeDriver(n_seq_max=1, n_ctx=1 << 20), policy="fifo")
    hog = await start(k, 1, max_tokens=200)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: hog.num_generated > 5)
        guest = await start(k, 2, max_tokens=5)
        await run_until(k, lambda: guest.finished)
        nursery.cancel_scope.cancel()
    assert hog.finished and hog.finished_at <= guest.started_at
    assert local(k).scheduler.num_preemptions == 0


async def test_admission_never_overcommits_the_kv_cache_under_a_burst() -> None:
    driver = FakeDriver(n_seq_max=8, n_ctx=2000)
    k = Kernel(driver)
    tasks = [await start(k, uid % 3, prompt="ab" * (uid % 7 + 1), max_tokens=50 + uid)
             for uid in range(100)]
    peak = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        with trio.fail_after(20):
            while not all(t.finished for t in tasks):
                stats = local(k).kv.stats()
                assert stats.used_cells + stats.growth_cells <= stats.capacity_cells
                peak = max(peak, stats.used_cells)
                # Not sleep(0): a loop that never sleeps keeps the GIL from the step's thread.
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert all(t.state is State.DONE for t in tasks)
    assert peak <= 2000


async def test_sched_file_shows_policy_and_users(kernel1: Kernel) -> None:
    await start(kernel1, 1)
    await start(kernel1, 2)
    await run_until(kernel1, lambda: local(kernel1).engine.num_steps > 50)
    text = views.sched(kernel1)
    rows = dict(line.split(" ", 1) for line in text.splitlines())
    assert rows["policy"] == "fair" and rows["slots"] == "1" and rows["runnable"] == "2"
    assert rows["user.1.share"] == "0.500" and rows["user.2.weight"] == "100"
    assert int(rows["preemptions"]) >= 1


async def test_a_newcomer_aborts_a_slow_step_and_gets_a_first_token_step_alone() -> None:
    driver = FakeDriver(n_seq_max=4, n_ctx=1 << 20)
    k = Kernel(driver)
    hogs = [await start(k, 1) for _ in range(4)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: all(t.num_generated > 5 for t in hogs))
        driver.step_delay = 0.25  # the four hogs' steps now take a second
        await trio.sleep(0.1)  # one is under way
        before = len(driver.steps)
        started = trio.current_time()
        guest = await start(k, 2, prompt="hello", max_tokens=3)
        await run_until(k, lambda: guest.num_generated > 0, limit=3)
        waited = trio.current_time() - started
        driver.step_delay = 0.0
        await run_until(k, lambda: guest.finished)
        nursery.cancel_scope.cancel()
    assert driver.aborted >= 1 and local(k).engine.num_aborted >= 1
    assert waited < 1.0  # it did not wait for the step in flight
    first_step = driver.steps[before]
    assert [p.seq for p in first_step] == [guest_seq(k, guest, first_step)]
    assert "abort_step" in k.trace.read(0, 1 << 22)[0].decode()


def guest_seq(k: Kernel, guest: Task, step: list[object]) -> int:
    """The sequence the guest's prompt was fed in: the only piece of its first step."""
    pieces = [p for p in step if len(p.tokens) == len(guest.prompt_tokens)]  # type: ignore[attr-defined]
    return int(pieces[0].seq)  # type: ignore[attr-defined]


async def test_fifo_never_aborts_or_boosts() -> None:
    driver = FakeDriver(n_seq_max=4, n_ctx=1 << 20)
    k = Kernel(driver, policy="fifo")
    hog = await start(k, 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: hog.num_generated > 5)
        guest = await start(k, 2, prompt="hello", max_tokens=3)
        await run_until(k, lambda: guest.finished)
        nursery.cancel_scope.cancel()
    assert driver.aborted == 0
    assert all(len(step) == 2 for step in driver.steps if any(p.seq == guest.seq for p in step))
