"""Deadlines (issue 15) with a fake driver: a task ends at its deadline with its text kept,
the nearest deadline runs first within a user, and a task that cannot start in time
fails at once."""

from __future__ import annotations

import time

import pytest
import trio

from axfs.errors import BadInput
from axfs.fs import views
from axfs.kernel import Kernel
from axfs.task import State
from axfs.timeline import Finish
from drivers import grammar
from tests.conftest import Mount
from tests.fakes import FakeDriver, local
from tests.test_axctl import axctl
from tests.test_remote_runtime import FakeClient, run_to_end, runtime, submitted
from tests.test_sched import run_until, start


@pytest.mark.parametrize("policy", ["fair", "fifo"])
async def test_a_running_task_ends_at_its_deadline_with_its_text_kept(policy: str) -> None:
    driver = FakeDriver(n_seq_max=2, n_ctx=1 << 20)
    driver.step_delay = 0.01
    k = Kernel(driver, policy=policy)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        task = await start(k, 1, deadline=0.3)
        other = await start(k, 1, max_tokens=5)  # no deadline: runs to its end
        await run_until(k, lambda: task.finished and other.finished)
        nursery.cancel_scope.cancel()
    assert task.state is State.DONE and task.finish_reason is Finish.DEADLINE
    assert "deadlines_met 0\ndeadlines_missed 1\n" in views.sched(k)
    late = task.finished_at - (task.submitted_at + 0.3)
    assert 0 <= late < 0.25  # a step is 10 ms or two; the margin is for a loaded machine
    assert task.num_generated > 0 and len(task.output) > 0
    assert other.finish_reason is Finish.LENGTH
    assert "deadline 0.3" in task.config.render()


async def test_the_nearest_deadline_runs_first_within_a_user() -> None:
    k = Kernel(FakeDriver(n_seq_max=1, n_ctx=1 << 20))
    hog = await start(k, 1, max_tokens=20)
    late = await start(k, 1, max_tokens=20, deadline=100)
    soon = await start(k, 1, max_tokens=20, deadline=50)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: hog.finished and late.finished and soon.finished)
        nursery.cancel_scope.cancel()
    assert soon.started_at < late.started_at < hog.started_at
    assert soon.finish_reason is late.finish_reason is Finish.LENGTH
    assert "deadlines_met 2\ndeadlines_missed 0\n" in views.sched(k)


async def test_a_task_that_cannot_start_before_its_deadline_fails_at_once() -> None:
    driver = FakeDriver(n_seq_max=1, n_ctx=1 << 20)
    driver.step_delay = 0.01
    k = Kernel(driver)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        hog = await start(k, 1, deadline=1000)  # holds the only slot
        await run_until(k, lambda: hog.num_generated > 0)
        waiting = await start(k, 1, max_tokens=5, deadline=0.2)
        await run_until(k, lambda: waiting.finished)
        local(k).scheduler.costs.prefill_s_per_token = 1.0
        slow = await start(k, 2, "a long prompt", deadline=5)
        assert slow.state is State.FAILED  # at once: its prompt takes longer to read
        k.kill(hog)
        nursery.cancel_scope.cancel()
    assert waiting.state is State.FAILED and waiting.finish_reason is Finish.DEADLINE
    assert "passed before it could start" in waiting.error
    assert waiting.finished_at - waiting.submitted_at < 0.3
    assert "more than the" in slow.error and "deadline" in slow.error
    assert "deadlines_met 0\ndeadlines_missed 2\n" in views.sched(k)  # hog was killed: neither


async def test_tasks_without_a_deadline_have_no_timer() -> None:
    driver = FakeDriver(n_seq_max=2, n_ctx=1 << 20)
    driver.step_delay = 0.01
    k = Kernel(driver)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        task = await start(k, 1, max_tokens=20)
        timed = await start(k, 1, max_tokens=20, deadline=60)
        await trio.sleep(0.01)  # the timer's task starts
        assert list(local(k)._watching) == [timed.id]
        await run_until(k, lambda: task.finished and timed.finished)
        await trio.sleep(0.01)
        assert not local(k)._watching  # the timer goes with its task
        nursery.cancel_scope.cancel()
    assert timed.finish_reason is Finish.LENGTH


def test_deadline_is_checked_when_written() -> None:
    k = Kernel(FakeDriver())
    task = k.create(1, 1)
    with pytest.raises(BadInput, match="not a number"):
        k.configure(task, "deadline soon\n")
    with pytest.raises(BadInput, match="outside"):
        k.configure(task, "deadline -1\n")
    k.configure(task, "deadline 2.5\n")
    assert task.config.deadline == 2.5 and time.time() > 0


@pytest.mark.mount
def test_through_the_mount_a_deadline_keeps_the_text_and_axctl_wait_says_so(ax: Mount) -> None:
    name = f"d{time.monotonic_ns()}"
    ax.sh(f"mkdir tasks/{name} && printf 'max_tokens 1000000\\ndeadline 1.5\\n' > tasks/{name}/config"
          f" && echo 'Once upon a time' > tasks/{name}/prompt")
    done = axctl(ax, "wait", name, timeout=60)
    assert done.returncode == 5, done.stderr
    assert "reached its deadline" in done.stderr
    status = ax.status(name)
    assert status["state"] == "done" and status["finish_reason"] == "deadline"
    assert int(status["generated_tokens"]) > 0 and ax.read(f"tasks/{name}/stream")
    assert "deadline 1.5" in ax.read(f"tasks/{name}/config")


async def test_a_remote_task_ends_at_its_deadline_and_its_grammar_is_sent() -> None:
    client = FakeClient(["never"])  # answers only when released: never, here
    rt, ended = runtime(client, slots=1)
    running = submitted("a", deadline=0.2, format="json")
    waiting = submitted("b", deadline=0.2)
    await run_to_end(rt, running, waiting)
    assert running.state is State.DONE and running.finish_reason is Finish.DEADLINE
    assert waiting.state is State.FAILED and "passed before it could start" in waiting.error
    assert client.requests[0].grammar == grammar.JSON and set(ended) == {running, waiting}
