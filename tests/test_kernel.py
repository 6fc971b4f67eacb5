"""The kernel with a fake driver: scheduling, continuous batching, errors, kill."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from axfs.errors import BadInput, Busy, TooLarge
from axfs.kernel import Kernel
from axfs.quota import Limits
from axfs.task import State, Task
from tests.fakes import EOG, FakeDriver, local


@pytest.fixture
async def kernel() -> AsyncIterator[Kernel]:
    k = Kernel(FakeDriver())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        yield k
        nursery.cancel_scope.cancel()


async def wait_done(task: Task) -> None:
    with trio.fail_after(5):
        while not task.finished:
            await task.changed.wait()


async def submit(k: Kernel, prompt: str, **config: object) -> Task:
    task = k.create(0, 0)
    if config:
        k.configure(task, "".join(f"{key} {v}\n" for key, v in config.items()))
    await k.submit(task, prompt.encode())
    return task


async def test_a_task_streams_the_driver_tokens_and_ends(kernel: Kernel) -> None:
    task = await submit(kernel, "a", max_tokens=5)
    await wait_done(task)
    assert task.output.decode() == "bcdef"
    assert (task.state, task.finish_reason) == (State.DONE, "length")
    assert local(kernel).kv.stats().slots_running == 0


async def test_echo_newline_is_dropped_and_latest_follows_the_user(kernel: Kernel) -> None:
    task = await kernel.submit_new(7, 7, b"abc\n")
    assert task.prompt == "abc"
    assert kernel.latest(7) is task and kernel.latest(0) is None


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", BadInput, "empty"),
        (b"\n", BadInput, "empty"),
        (b"a\0b", BadInput, "NUL"),
        (b"\xff\xfe", BadInput, "UTF-8"),
        (b"x" * (Limits().prompt_bytes + 1), TooLarge, "over"),
    ],
)
async def test_bad_prompts_are_refused_and_traced(kernel: Kernel, data: bytes,
                                                 error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        await kernel.submit_new(0, 0, data)
    assert not kernel.tasks
    assert b" reject " in kernel.trace.read(0, 1 << 20)[0]


async def test_a_prompt_longer_than_the_context_fails_with_enospc_words() -> None:
    k = Kernel(FakeDriver(n_ctx=16))
    task = await k.submit_new(0, 0, b"x" * 20)
    assert task.state is State.FAILED
    assert "prompt is 20 tokens" in task.error


async def test_decode_steps_batch_every_running_task() -> None:
    driver = FakeDriver(n_seq_max=4)
    k = Kernel(driver)
    tasks = [k.create(0, 0) for _ in range(3)]
    for t in tasks:
        k.configure(t, "max_tokens 4")
        await k.submit(t, b"ab")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        for t in tasks:
            await wait_done(t)
        nursery.cancel_scope.cancel()
    assert [len(step) for step in driver.steps] == [3, 3, 3, 3]
    assert all(t.output.decode() == "cdef" for t in tasks)


async def test_long_prompt_prefill_is_chunked_and_running_streams_keep_flowing() -> None:
    driver = FakeDriver(n_batch=8, n_ctx=4096)
    k = Kernel(driver)
    short = await submit(k, "a", max_tokens=2000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        with trio.fail_after(5):
            while short.num_generated < 2:
                await short.changed.wait()
        long = await submit(k, "x" * 40, max_tokens=2)
        await wait_done(long)
        await wait_done(short)
        nursery.cancel_scope.cancel()
    for step in driver.steps:
        assert sum(len(p.tokens) for p in step) <= 8
    steps_with_long_prefill = [s for s in driver.steps if any(len(p.tokens) > 1 for p in s)]
    assert len(steps_with_long_prefill) >= 5  # 40 prompt tokens in chunks of at most 7
    assert all(len(s) == 2 for s in steps_with_long_prefill)  # the short task decoded in each


async def test_admission_waits_for_slots_and_kv_cells() -> None:
    driver = FakeDriver(n_seq_max=2, n_ctx=64)
    k = Kernel(driver)
    tasks = [await submit(k, "a", max_tokens=30) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await trio.sleep(0)
        with trio.fail_after(5):
            while tasks[0].state is State.QUEUED:
                await tasks[0].changed.wait()
        assert tasks[2].state is State.QUEUED  # two slots, 31 cells each of 64
        for t in tasks:
            await wait_done(t)
        nursery.cancel_scope.cancel()
    assert all(t.state is State.DONE for t in tasks)


async def test_kill_ends_a_running_task_and_frees_its_sequence(kernel: Kernel) -> None:
    task = await submit(kernel, "a", max_tokens=100000)
    with trio.fail_after(5):
        while task.num_generated < 3:
            await task.changed.wait()
    kernel.control(task, "kill\n")
    assert (task.state, task.finish_reason) == (State.KILLED, "killed")
    await trio.sleep(0.05)
    assert local(kernel).kv.stats().slots_running == 0
    assert not local(kernel).driver.open  # type: ignore[attr-defined]


async def test_kill_of_a_queued_task(kernel: Kernel) -> None:
    task = kernel.create(0, 0)
    kernel.control(task, "kill")
    assert task.state is State.KILLED


async def test_driver_error_fails_the_step_tasks_and_the_engine_goes_on(kernel: Kernel) -> None:
    local(kernel).driver.fail_next = "boom"  # type: ignore[attr-defined]
    bad = await submit(kernel, "a")
    await wait_done(bad)
    assert bad.state is State.FAILED and "boom" in bad.error
    good = await submit(kernel, "a", max_tokens=2)
    await wait_done(good)
    assert good.output.decode() == "bc"


async def test_eog_token_ends_the_task() -> None:
    k = Kernel(FakeDriver(script=lambda t: EOG if t == ord("c") else t + 1))
    task = await submit(k, "a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await wait_done(task)
        nursery.cancel_scope.cancel()
    assert (task.output.decode(), task.finish_reason) == ("bc", "eos")


async def test_config_and_ctl_refusals_land_in_the_error_file(kernel: Kernel) -> None:
    task = kernel.create(0, 0)
    with pytest.raises(BadInput):
        kernel.configure(task, "colour red")
    assert "unknown key 'colour'" in kernel.error_text(task) and not task.error
    with pytest.raises(BadInput):
        kernel.control(task, "explode")
    assert "cannot parse 'explode'" in kernel.error_text(task)
    kernel.control(task, "priority 7")
    assert task.config.priority == 7


async def test_config_is_frozen_once_the_task_runs(kernel: Kernel) -> None:
    task = await submit(kernel, "a", max_tokens=100000)
    with trio.fail_after(5):
        while task.state is not State.RUNNING:
            await task.changed.wait()
    with pytest.raises(Busy):
        kernel.configure(task, "max_tokens 1")
    kernel.kill(task)


async def test_remove_kills_and_forgets(kernel: Kernel) -> None:
    task = await submit(kernel, "a", max_tokens=100000)
    kernel.remove(task)
    assert task.state is State.KILLED and task.id not in kernel.tasks
    assert kernel.latest(0) is None


async def test_mkdir_names_are_checked(kernel: Kernel) -> None:
    kernel.create(0, 0, "job-1")
    for bad in ("new", "latest", "../x", "", ".hidden", "a" * 65):
        with pytest.raises(BadInput):
            kernel.create(0, 0, bad)


async def test_a_driver_error_fails_only_the_task_that_fails_alone() -> None:
    driver = FakeDriver(n_seq_max=4, n_ctx=4000)
    k = Kernel(driver)
    tasks = [await submit(k, "a", max_tokens=30) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        while not all(t.num_generated >= 3 for t in tasks):
            await trio.sleep(0.001)
        poisoned = tasks[1]
        driver.fail_seq = poisoned.seq
        for t in tasks:
            await wait_done(t)
        nursery.cancel_scope.cancel()
    assert poisoned.state is State.FAILED and "poisoned" in poisoned.error
    for t in (tasks[0], tasks[2]):
        assert t.state is State.DONE and t.num_generated == 30 and not t.isolate
    trace = k.trace.read(0, 1 << 20)[0].decode()
    assert " step_error tasks=3 " in trace
