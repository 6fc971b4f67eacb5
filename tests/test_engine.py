"""The engine alone (axfs.engine): a scheduler and a fake driver, no kernel. A step's
tokens are applied, tasks end for their reasons, ends are told once, a failed step
fails its task alone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from axfs.config import TaskConfig
from axfs.engine import Engine
from axfs.kv import KVManager
from axfs.policy import make_policy
from axfs.scheduler import Scheduler
from axfs.task import State, Task
from axfs.timeline import Finish, Steps
from axfs.trace import Trace
from tests.fakes import EOG, FakeDriver


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, list[Task]]]:
    driver = FakeDriver(n_ctx=1024, n_seq_max=4)
    shape = driver.shape
    scheduler = Scheduler(KVManager(shape.n_ctx, shape.n_seq_max, shape.cell_bytes, seq_limit=shape.n_ctx),
                          shape.n_batch, make_policy("fifo"))
    eng = Engine(driver, scheduler, Trace(), overlap=True)
    ended: list[Task] = []
    eng.on_end = ended.append
    async with trio.open_nursery() as nursery:
        nursery.start_soon(eng.run)
        yield eng, ended
        nursery.cancel_scope.cancel()
    eng.close()


def submitted(prompt: str, **config: object) -> Task:
    task = Task(prompt, 0, 0, TaskConfig(**config))  # type: ignore[arg-type]
    task.submit(prompt, [ord(c) for c in prompt])
    return task


async def finished(task: Task) -> None:
    with trio.fail_after(5):
        while not task.finished:
            await task.changed.wait()


async def test_tasks_run_to_max_tokens_and_their_end_is_told_once(engine: tuple[Engine, list[Task]]
                                                                  ) -> None:
    eng, ended = engine
    a, b = submitted("ab", max_tokens=5), submitted("xy", max_tokens=3)
    eng.add(a)
    eng.add(b)
    await finished(a)
    await finished(b)
    assert a.output == b"cdefg" and b.output == b"zab"
    assert a.finish_reason is Finish.LENGTH and a.state is State.DONE
    assert sorted(t.prompt for t in ended) == ["ab", "xy"]
    assert eng.num_tokens >= 2 + 5 + 2 + 3 - 2  # prompts and every token but the last ones


async def test_a_stop_string_ends_the_task_before_it(engine: tuple[Engine, list[Task]]) -> None:
    eng, _ = engine
    task = submitted("ab", max_tokens=20, stop=["fg"])
    eng.add(task)
    await finished(task)
    assert task.output == b"cde" and task.finish_reason is Finish.STOP


async def test_the_end_of_generation_token_ends_with_eos(engine: tuple[Engine, list[Task]]) -> None:
    eng, _ = engine
    driver = eng.driver
    assert isinstance(driver, FakeDriver)
    driver.script = lambda t: EOG if t == ord("d") else t + 1
    task = submitted("ab", max_tokens=20)
    eng.add(task)
    await finished(task)
    assert task.output == b"cd" and task.finish_reason is Finish.EOS


async def test_the_timeline_counts_steps_in_typed_entries(engine: tuple[Engine, list[Task]]) -> None:
    eng, _ = engine
    task = submitted("abc", max_tokens=4)
    eng.add(task)
    await finished(task)
    steps = [e for e in task.timeline if isinstance(e, Steps)]
    assert [s.kind for s in steps] == ["prefill", "decode"]
    assert steps[0].tokens == 3 and steps[1].steps == 3 and steps[1].tokens == 3


async def test_a_failed_step_fails_its_only_task_and_the_next_runs(engine: tuple[Engine, list[Task]]
                                                                   ) -> None:
    eng, _ = engine
    driver = eng.driver
    assert isinstance(driver, FakeDriver)
    driver.fail_next = "boom"
    bad = submitted("ab", max_tokens=3)
    eng.add(bad)
    await finished(bad)
    assert bad.state is State.FAILED and bad.error == "model error: boom"
    good = submitted("xy", max_tokens=2)
    eng.add(good)
    await finished(good)
    assert good.state is State.DONE


async def test_end_finishes_a_task_and_frees_its_slot(engine: tuple[Engine, list[Task]]) -> None:
    eng, ended = engine
    task = submitted("ab", max_tokens=100_000)
    eng.add(task)
    with trio.fail_after(5):
        while task.num_generated < 3:
            await trio.sleep(0.001)
    eng.end(task, State.KILLED, Finish.KILLED)
    assert task.state is State.KILLED and ended == [task]
    with trio.fail_after(5):
        while eng.scheduler.kv.stats().slots_running:
            await trio.sleep(0.001)
