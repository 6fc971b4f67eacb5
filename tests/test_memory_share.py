"""Memory shared out like the batch: reservations that grow, and who gives way when the
KV cache runs out (a fake driver; the real mount and models are in test_hog_mount.py)."""

from __future__ import annotations

import trio

from axfs.fs import views
from axfs.kernel import Kernel
from axfs.kv import RESERVE_AHEAD
from axfs.task import State
from tests.fakes import FakeDriver, local
from tests.test_sched import run_until, start

LETTERS = "".join(chr(ord("a") + (i + 1) % 26) for i in range(2000))  # the fake's text after "a"


async def test_a_task_reserves_its_memory_as_it_grows() -> None:
    k = Kernel(FakeDriver(n_seq_max=4, n_ctx=4096))
    hog = await start(k, 0, max_tokens=1_000_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: hog.seq is not None)
        assert hog.kv_reserved == 1 + RESERVE_AHEAD  # not the whole cache
        assert f"user.0.kv_cells {1 + RESERVE_AHEAD}\n" in views.sched(k)
        await run_until(k, lambda: hog.num_generated > 2 * RESERVE_AHEAD)
        assert hog.num_cached <= hog.kv_reserved <= hog.num_history + RESERVE_AHEAD
        assert local(k).kv.stats().free_cells > 4096 - 4 * RESERVE_AHEAD
        nursery.cancel_scope.cancel()


async def test_a_task_holding_the_whole_cache_gives_way_to_another_users_first_token() -> None:
    driver = FakeDriver(n_seq_max=4, n_ctx=1024)
    driver.step_delay = 0.002
    k = Kernel(driver)
    hog = await start(k, 0, max_tokens=1_000_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: hog.num_cached > 1024 - RESERVE_AHEAD // 2)
        assert local(k).kv.stats().free_cells == 0  # it holds every cell
        steps = local(k).engine.num_steps
        guest = await start(k, 1001, max_tokens=10)
        await run_until(k, lambda: guest.num_generated > 0)
        assert local(k).engine.num_steps - steps <= 4, "the guest waited for the hog"
        await run_until(k, lambda: guest.finished and hog.finished, limit=20)
        nursery.cancel_scope.cancel()
    assert guest.state is State.DONE and guest.output.decode() == LETTERS[:10]
    assert hog.num_preempted >= 1 and guest.finished_at < hog.finished_at
    assert (hog.state, hog.finish_reason) == (State.DONE, "context")
    assert hog.output.decode() == LETTERS[:1023]  # went on where it stopped


async def test_when_growth_runs_out_the_user_over_their_share_gives_way() -> None:
    k = Kernel(FakeDriver(n_seq_max=4, n_ctx=2048))
    big = [await start(k, 1, max_tokens=1000) for _ in range(3)]
    small = await start(k, 2, max_tokens=1000)
    peak = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        with trio.fail_after(30):
            while not all(t.finished for t in [*big, small]):
                stats = local(k).kv.stats()
                assert stats.used_cells + stats.growth_cells <= stats.capacity_cells
                peak = max(peak, stats.used_cells)
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert small.num_preempted == 0, "user 2 held less than half the cache and gave way"
    assert 1 <= sum(t.num_preempted for t in big) <= 6
    assert all(t.output.decode() == LETTERS[:1000] for t in [*big, small])
    assert peak > 2048 - 3 * RESERVE_AHEAD


async def test_under_fifo_the_latest_task_gives_way_when_growth_runs_out() -> None:
    k = Kernel(FakeDriver(n_seq_max=4, n_ctx=1024), policy="fifo")
    first = await start(k, 1, max_tokens=900)
    second = await start(k, 2, max_tokens=900)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: first.finished and second.finished, limit=20)
        nursery.cancel_scope.cancel()
    assert first.num_preempted == 0 and second.num_preempted >= 1
    assert first.finished_at < second.finished_at
    assert first.output.decode() == second.output.decode() == LETTERS[:900]


async def test_users_who_each_want_more_than_a_share_take_turns_by_tasks_not_steps() -> None:
    k = Kernel(FakeDriver(n_seq_max=8, n_ctx=2048))
    tasks = [await start(k, uid, max_tokens=1500) for uid in (1, 1, 2, 2)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: all(t.finished for t in tasks), limit=30)
        nursery.cancel_scope.cancel()
    assert all(t.output.decode() == LETTERS[:1500] for t in tasks)
    assert sum(t.num_preempted for t in tasks) <= 12  # not one each way every few steps


async def test_a_burst_of_long_prompts_is_read_one_prompt_at_a_time() -> None:
    k = Kernel(FakeDriver(n_seq_max=8, n_ctx=1024))
    tasks = [await start(k, 1, prompt=chr(65 + i) * 600, max_tokens=4) for i in range(12)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: all(t.finished for t in tasks), limit=30)
        nursery.cancel_scope.cancel()
    assert all(t.state is State.DONE for t in tasks)
    # one prompt fits at a time: taking turns a chunk each would preempt at every chunk
    assert local(k).scheduler.num_preemptions <= 2
    firsts = sorted(t.first_token_at for t in tasks)
    assert firsts[0] < tasks[-1].finished_at  # the first answer did not wait for the last
