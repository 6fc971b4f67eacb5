"""The engine applies a step's text while the next step runs (axfs.engine): tasks that end,
are killed or are preempted while a step is under way end cleanly, with their text intact
and their KV accounted. A gated fake driver holds each step until the test lets it go, so
nothing here depends on timing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from axfs.kernel import Kernel
from axfs.task import State, Task
from tests.fakes import FakeDriver, GatedDriver, local, run_steps, settle, step_in_flight


def check_kv(k: Kernel, driver: GatedDriver) -> None:
    """What the KV manager counts is what the model holds, slot by slot."""
    stats = local(k).kv.stats()
    assert stats.used_cells == stats.running_cells + stats.cached_cells
    for slot in range(driver.shape.n_seq_max):
        assert local(k).kv.cells(slot) == driver.positions.get(slot, 0), slot


@pytest.fixture
async def gated() -> AsyncIterator[tuple[Kernel, GatedDriver]]:
    driver = GatedDriver(n_seq_max=4)
    k = Kernel(driver, overlap=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        yield k, driver
        for _ in range(100):  # let a step held at the gate finish, or cancel waits for it
            driver.gate.release()
        nursery.cancel_scope.cancel()


async def submit(k: Kernel, prompt: str, uid: int = 0, **config: object) -> Task:
    task = k.create(uid, uid)
    if config:
        k.configure(task, "".join(f"{key} {v}\n" for key, v in config.items()))
    await k.submit(task, prompt.encode())
    return task


async def test_a_task_killed_while_the_next_step_runs_keeps_its_text_and_frees_its_kv(
        gated: tuple[Kernel, GatedDriver]) -> None:
    k, driver = gated
    task = await submit(k, "a", max_tokens=50)
    await run_steps(driver, 4)  # prompt, then decode steps: "bcd" sampled
    await step_in_flight(driver)  # the 5th step runs; "e" (4th step's) is published meanwhile
    with trio.fail_after(5):
        while task.output != b"bcde":
            await trio.sleep(0.001)
    k.kill(task)
    assert task.state is State.KILLED and task.output == b"bcde"
    driver.gate.release()
    await settle(driver, lambda: local(k).kv.stats().slots_running == 0)
    assert task.output == b"bcde" and task.num_generated == 4  # the 5th step's token is dropped
    assert local(k).kv.stats().slots_cached == 0  # its cells may hold that token: not cached
    check_kv(k, driver)


async def test_a_stop_string_found_while_the_next_step_runs_cuts_the_text_there(
        gated: tuple[Kernel, GatedDriver]) -> None:
    k, driver = gated
    task = await submit(k, "a", max_tokens=50, stop="de")
    await settle(driver, lambda: task.finished)
    assert (task.output, task.finish_reason) == (b"bc", "stop")
    # One more token ("f") was computed for it in the step under way; it is not applied.
    assert task.num_generated == 4
    check_kv(k, driver)
    other = await submit(k, "x", max_tokens=3)  # its slot is clean for the next task
    await settle(driver, lambda: other.finished)
    assert other.output == b"yza"
    check_kv(k, driver)


async def test_ends_known_without_text_take_no_extra_step(gated: tuple[Kernel, GatedDriver]) -> None:
    k, driver = gated
    task = await submit(k, "abcdefghij", max_tokens=3)
    await settle(driver, lambda: task.finished)
    assert (task.output, task.finish_reason) == (b"klm", "length")
    fed = [t for s in driver.steps for p in s if p.seq == 0 for t in p.tokens]
    assert bytes(fed) == b"abcdefghijkl"  # "m" is never fed: no step is spent past the end
    assert local(k).kv.stats().slots_cached == 1  # cached for prompts that begin the same way
    check_kv(k, driver)


async def test_a_task_preempted_while_its_text_is_pending_resumes_with_it(
        gated: tuple[Kernel, GatedDriver]) -> None:
    k, driver = gated
    local(k).scheduler.quantum = local(k).scheduler.min_turn = 2
    hogs = [await submit(k, "a", uid=1, max_tokens=12) for _ in range(4)]
    await run_steps(driver, 3)
    newcomer = await submit(k, "m", uid=2, max_tokens=4)
    await settle(driver, lambda: all(t.finished for t in [*hogs, newcomer]))
    assert newcomer.output == b"nopq"
    assert sum(t.num_preempted for t in hogs) >= 1
    for t in hogs:
        assert t.output == b"bcdefghijklm", t.id
    check_kv(k, driver)


@pytest.mark.parametrize("overlap", [True, False])
async def test_the_same_tokens_with_and_without_overlap(overlap: bool) -> None:
    driver = FakeDriver(n_seq_max=8)
    k = Kernel(driver, overlap=overlap)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        tasks = [await submit(k, chr(ord("a") + i), uid=i % 3, max_tokens=20, stop="zz")
                 for i in range(16)]
        with trio.fail_after(10):
            while not all(t.finished for t in tasks):
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    letters = "abcdefghijklmnopqrstuvwxyz" * 2
    for i, t in enumerate(tasks):
        assert t.output.decode() == letters[i + 1 : i + 21], t.id
        assert t.finish_reason == "length"


def test_overlap_by_default_only_where_the_model_runs_on_a_gpu() -> None:
    on_cpu, on_gpu = FakeDriver(), FakeDriver()
    on_gpu.info.extra["gpu_layers"] = "19"
    assert not local(Kernel(on_cpu)).engine.overlap and local(Kernel(on_gpu)).engine.overlap
    assert local(Kernel(FakeDriver(), overlap=True)).engine.overlap
    assert not local(Kernel(on_gpu, overlap=False)).engine.overlap
