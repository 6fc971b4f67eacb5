"""The remote runtime alone (axfs.remote), its pool of endpoints replaced by a fake: text
streams into the task, the server's ending and token count are kept, an error fails
the task, and no more requests run at once than it allows."""

from __future__ import annotations

from collections.abc import Callable

import trio

from axfs.config import TaskConfig
from axfs.remote import RemoteRuntime
from axfs.task import State, Task
from axfs.timeline import Finish
from axfs.trace import Trace
from drivers.base import DriverError
from drivers.openai import Request
from drivers.pool import Outcome


class FakePool:
    """Answers each request with ``pieces``, one per checkpoint, then ``finish``."""

    def __init__(self, pieces: list[str], finish: str = "stop", tokens: int = 0,
                 error: str = "") -> None:
        self.pieces, self.finish, self.tokens, self.error = pieces, finish, tokens, error
        self.requests: list[Request] = []
        self.running = self.most_running = 0
        self.release = trio.Event()

    async def __aenter__(self) -> FakePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def complete(self, req: Request, on_text: Callable[[str], None]) -> Outcome:
        self.requests.append(req)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
            if self.error:
                raise DriverError(self.error)
            for piece in self.pieces:
                on_text(piece)
                await trio.sleep(0)
            return Outcome(self.finish, self.tokens or len(self.pieces), "http://fake", 0)
        finally:
            self.running -= 1


def runtime(pool: FakePool, max_inflight: int = 4) -> tuple[RemoteRuntime, list[Task]]:
    rt = RemoteRuntime("far", ["http://127.0.0.1:9"], Trace(), max_inflight=max_inflight)
    rt.pool = pool  # type: ignore[assignment]
    ended: list[Task] = []
    rt.on_end = ended.append
    return rt, ended


def submitted(name: str, **config: object) -> Task:
    task = Task(name, 0, 0, TaskConfig(**config))  # type: ignore[arg-type]
    task.submit(f"prompt {name}", [])
    return task


async def finished(task: Task) -> None:
    with trio.fail_after(5):
        while not task.finished:
            await task.changed.wait()


async def test_text_streams_in_and_the_servers_count_and_ending_are_kept() -> None:
    pool = FakePool(["Hel", "lo", "!"], finish="length", tokens=5)
    rt, ended = runtime(pool)
    task = submitted("a", max_tokens=5, temperature=0.0, stop=["x"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        rt.add(task)
        pool.release.set()
        await finished(task)
        nursery.cancel_scope.cancel()
    assert task.output == b"Hello!" and task.num_generated == 5
    assert task.state is State.DONE and task.finish_reason is Finish.LENGTH and ended == [task]
    req = pool.requests[0]
    assert req.prompt == "prompt a" and req.max_tokens == 5 and req.stop == ("x",)


async def test_an_error_fails_the_task_with_the_reason() -> None:
    pool = FakePool([], error="all endpoints down")
    rt, ended = runtime(pool)
    task = submitted("a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        rt.add(task)
        pool.release.set()
        await finished(task)
        nursery.cancel_scope.cancel()
    assert task.state is State.FAILED and task.finish_reason is Finish.ERROR
    assert task.error == "remote error: all endpoints down" and ended == [task]


async def test_at_most_max_inflight_requests_run_and_a_kill_frees_its_place() -> None:
    pool = FakePool(["x"])
    rt, _ = runtime(pool, max_inflight=2)
    tasks = [submitted(str(i)) for i in range(5)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        for task in tasks:
            rt.add(task)
        with trio.fail_after(5):
            while pool.running < 2:
                await trio.sleep(0.001)
        assert rt.active() == 5 and rt.num_running == 2
        rt.end(tasks[0], State.KILLED, Finish.KILLED)  # cancels its request
        with trio.fail_after(5):
            while len(pool.requests) < 3:
                await trio.sleep(0.001)
        pool.release.set()
        for task in tasks[1:]:
            await finished(task)
        nursery.cancel_scope.cancel()
    assert pool.most_running == 2
    assert tasks[0].state is State.KILLED and all(t.state is State.DONE for t in tasks[1:])
