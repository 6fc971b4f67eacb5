"""Several models in one kernel, with fake drivers: loading on demand, unloading, idle
unload, refusals, a model that cannot load, restored tasks waiting for their model."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from axfs.errors import Busy, Unavailable
from axfs.kernel import Kernel
from axfs.models import ModelEntry
from axfs.task import State, Task
from drivers.base import ModelLoadError
from tests.fakes import FakeDriver

loaded: list[FakeDriver] = []


def load(entry: ModelEntry) -> FakeDriver:
    if entry.path == "/missing":
        raise ModelLoadError("failed to read magic")
    driver = FakeDriver()
    driver.info.name = entry.name
    loaded.append(driver)
    return driver


def make_kernel(idle: float = 0.0) -> Kernel:
    k = Kernel(FakeDriver(), loader=load, idle_unload_s=idle)
    k.registry.add(ModelEntry("other", path="/models/other.gguf"))
    k.registry.add(ModelEntry("broken", path="/missing"))
    return k


@pytest.fixture
async def kernel() -> AsyncIterator[Kernel]:
    k = make_kernel()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        yield k
        nursery.cancel_scope.cancel()


async def run(k: Kernel, model: str, max_tokens: int = 3) -> Task:
    task = k.create(0, 0)
    k.configure(task, f"model {model}\nmax_tokens {max_tokens}\n")
    await k.submit(task, b"ab")
    with trio.fail_after(5):
        while not task.finished:
            await task.changed.wait()
    return task


async def test_a_model_loads_when_a_task_names_it(kernel: Kernel) -> None:
    assert set(kernel.runtimes) == {"fake"}
    task = await run(kernel, "other")
    assert task.state is State.DONE and task.output == b"cde"  # next letters after "ab"
    assert set(kernel.runtimes) == {"fake", "other"}
    assert b"model_load model=other" in kernel.trace.read(0, 1 << 20)[0]
    assert (await run(kernel, "fake")).state is State.DONE  # the default, side by side


async def test_unload_and_rm_are_refused_while_tasks_run(kernel: Kernel) -> None:
    await run(kernel, "other")
    driver = loaded[-1]
    driver.step_delay = 0.05
    task = kernel.create(0, 0)
    kernel.configure(task, "model other\nmax_tokens 1000\n")
    await kernel.submit(task, b"ab")
    with pytest.raises(Busy):
        kernel.unload("other")
    with pytest.raises(Busy, match="unfinished tasks"):
        kernel.unregister("other")
    with pytest.raises(Busy, match="default"):
        kernel.unregister("fake")
    kernel.kill(task)
    kernel.unload("other")
    assert "other" not in kernel.runtimes
    kernel.unregister("other")
    assert "other" not in kernel.models


async def test_a_model_that_cannot_load_fails_the_submission(kernel: Kernel) -> None:
    task = kernel.create(0, 0)
    kernel.configure(task, "model broken\n")
    with pytest.raises(Unavailable, match="failed to read magic"):
        await kernel.submit(task, b"ab")
    assert "cannot be loaded" in kernel.error_text(task) and task.state is State.DRAFT
    assert "failed to read magic" in kernel.load_error("broken")
    kernel.defaults.model = "broken"
    with pytest.raises(Unavailable):
        await kernel.submit_new(0, 0, b"ab")
    latest = kernel.latest(0)
    assert latest is not None and latest.state is State.FAILED and "magic" in latest.error


async def test_an_idle_model_is_unloaded_and_comes_back() -> None:
    k = make_kernel(idle=0.2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run(k, "other")
        with trio.fail_after(10):
            while "other" in k.runtimes:
                await trio.sleep(0.05)
        assert "fake" in k.runtimes  # the default stays
        assert (await run(k, "other")).state is State.DONE
        nursery.cancel_scope.cancel()


async def test_a_restored_task_waits_for_its_model_to_load() -> None:
    k = make_kernel()
    task = Task("7", 0, 0, k.defaults.copy())
    task.config.model = "other"
    task.submit("ab", [ord("a"), ord("b")])
    k.table.adopt(task)
    k.restorer.resume(task, [ord("c")])  # before the kernel runs: the model loads when it starts
    assert "other" not in k.runtimes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        with trio.fail_after(5):
            while not task.finished:
                await task.changed.wait()
        nursery.cancel_scope.cancel()
    assert task.output.startswith(b"c") and task.state is State.DONE
