"""The remote runtime alone (axfs.remote, with its queue axfs.remotequeue), its HTTP
client replaced by a fake: text streams into the task, the server's ending and token
count are kept, an error fails the task, no endpoint gets more requests than its slots,
the waiting tasks go in the policy's order, a newcomer takes a slot from the user most
over their share, and a stopped task goes on from its text."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from axfs.config import TaskConfig
from axfs.errors import BadInput
from axfs.models import ModelEntry, Registry, parse_remote
from axfs.policy import make_policy
from axfs.remote import RemoteRuntime
from axfs.task import State, Task
from axfs.timeline import Finish
from axfs.trace import Trace
from drivers.openai import Address, RemoteError
from drivers.request import Progress, Request
from tests.servers import free_port


class FakeClient:
    """Stands in for drivers.openai.Client. Each request waits for ``release``, then
    streams ``pieces`` (one every ``gap`` s; with ``forever``, again and again until it is
    stopped) and ends with ``finish``, the server's count ``tokens`` if given."""

    def __init__(self, pieces: list[str], finish: str = "stop", tokens: int = 0, error: str = "",
                 forever: bool = False, gap: float = 0.0, slots: int | None = None) -> None:
        self.pieces, self.finish, self.tokens, self.error = pieces, finish, tokens, error
        self.forever, self.gap, self.n_slots = forever, gap, slots
        self.requests: list[Request] = []
        self.payloads: list[dict[str, Any]] = []
        self.running = self.most_running = 0
        self.release = trio.Event()

    async def slots(self, address: Address) -> int | None:
        return self.n_slots

    async def aclose(self) -> None:
        pass

    async def complete(self, address: Address, progress: Progress, model: str,
                       on_answer: Callable[[], None], on_text: Callable[[str], None]) -> str:
        self.requests.append(progress.request)
        self.payloads.append(progress.payload(model))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        start = progress.tokens
        try:
            await self.release.wait()
            if self.error:
                raise RemoteError(self.error)
            on_answer()
            for i in itertools.count() if self.forever else range(len(self.pieces)):
                if progress.tokens_left <= 0:
                    return "length"
                # Forever: the pieces in turn, going on where an earlier request stopped.
                piece = self.pieces[(progress.tokens if self.forever else i) % len(self.pieces)]
                progress.tokens += 1
                progress.text.append(piece)
                on_text(piece)
                await trio.sleep(self.gap)
            if self.tokens:
                progress.tokens = start + self.tokens
            return self.finish
        finally:
            self.running -= 1


def runtime(client: FakeClient, slots: int = 4, policy: str = "fair"
            ) -> tuple[RemoteRuntime, list[Task]]:
    rt = RemoteRuntime("far", ["http://127.0.0.1:9"], Trace(), make_policy(policy), [slots])
    rt.pool._client = client  # type: ignore[assignment]
    ended: list[Task] = []
    rt.on_end = ended.append
    return rt, ended


def submitted(name: str, uid: int = 0, **config: object) -> Task:
    task = Task(name, uid, uid, TaskConfig(**config))  # type: ignore[arg-type]
    task.submit(f"prompt {name}", [])
    return task


async def finished(task: Task) -> None:
    with trio.fail_after(5):
        while not task.finished:
            await task.changed.wait()


async def run_to_end(rt: RemoteRuntime, *tasks: Task) -> None:
    """Run ``rt`` with ``tasks`` added until every one of them has finished."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        for task in tasks:
            rt.add(task)
        for task in tasks:
            await finished(task)
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.001)


def test_endpoints_take_slots_after_their_url_and_models_json_keeps_them(tmp_path: Path) -> None:
    spec = parse_remote(["http://a:1", "slots=8", "http://b:2", "key=/k"])
    assert spec.slots == {"http://a:1": 8} and spec.endpoints == ["http://a:1", "http://b:2"]
    for words, why in [(["slots=2", "http://a:1"], "follows the URL"),
                       (["http://a:1", "slots=2", "slots=3"], "follows the URL"),
                       (["http://a:1", "slots=0"], "from 1 to 4096"),
                       (["http://a:1", "slots=x"], "from 1 to 4096")]:
        with pytest.raises(BadInput, match=why):
            parse_remote(words)
    registry = Registry(tmp_path / "models.json")
    registry.add(ModelEntry("far")).set_remote(spec)
    registry.save()
    again = Registry(tmp_path / "models.json")
    again.load()
    assert again.entries["far"].slots == {"http://a:1": 8}


async def test_text_streams_in_and_the_servers_count_and_ending_are_kept() -> None:
    client = FakeClient(["Hel", "lo", "!"], finish="length", tokens=5)
    rt, ended = runtime(client)
    task = submitted("a", max_tokens=5, temperature=0.0, stop=["x"])
    client.release.set()
    await run_to_end(rt, task)
    assert task.output == b"Hello!" and task.num_generated == 5
    assert task.state is State.DONE and task.finish_reason is Finish.LENGTH and ended == [task]
    req = client.requests[0]
    assert req.prompt == "prompt a" and req.max_tokens == 5 and req.stop == ("x",)
    assert rt.policy.users() == {0: (100.0, 5)} and task.num_processed == 5


async def test_the_sampler_settings_go_to_the_server() -> None:
    client = FakeClient(["ok"])
    rt, _ = runtime(client)
    task = submitted("a", min_p=0.2, repeat_penalty=1.5, repeat_last_n=1000,
                     presence_penalty=0.5, frequency_penalty=-0.25)
    client.release.set()
    await run_to_end(rt, task)
    payload = Progress(client.requests[0]).payload("far")
    assert {k: payload[k] for k in ("min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
                                    "frequency_penalty")} == {
        "min_p": 0.2, "repeat_penalty": 1.5, "repeat_last_n": 1000, "presence_penalty": 0.5,
        "frequency_penalty": -0.25}


async def test_an_error_fails_the_task_with_the_reason() -> None:
    client = FakeClient([], error="all endpoints down")
    rt, ended = runtime(client)
    task = submitted("a")
    client.release.set()
    await run_to_end(rt, task)
    assert task.state is State.FAILED and task.finish_reason is Finish.ERROR
    assert task.error == "remote error: all endpoints down" and ended == [task]


async def test_at_most_the_endpoints_slots_run_and_a_kill_frees_its_place() -> None:
    client = FakeClient(["x"])
    rt, _ = runtime(client, slots=2)
    tasks = [submitted(str(i)) for i in range(5)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        for task in tasks:
            rt.add(task)
        await until(lambda: client.running == 2)
        assert rt.active() == 5 and rt.num_running == 2 and rt.num_waiting == 3
        rt.end(tasks[0], State.KILLED, Finish.KILLED)  # stops its request
        await until(lambda: len(client.requests) == 3)
        client.release.set()
        for task in tasks[1:]:
            await finished(task)
        nursery.cancel_scope.cancel()
    assert client.most_running == 2 and rt.pool.status()[0].inflight == 0
    assert tasks[0].state is State.KILLED and all(t.state is State.DONE for t in tasks[1:])


async def test_the_servers_slots_are_asked_for_when_not_set() -> None:
    client = FakeClient(["x"], slots=3)
    rt, _ = runtime(client, slots=0)
    tasks = [submitted(str(i)) for i in range(5)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        for task in tasks:
            rt.add(task)
        await until(lambda: client.running == 3)
        await trio.sleep(0.01)
        assert client.running == 3 and rt.pool.status()[0].slots_from == "server"
        client.release.set()
        for task in tasks:
            await finished(task)
        nursery.cancel_scope.cancel()


async def test_a_newcomer_takes_a_slot_and_the_stopped_task_goes_on_from_its_text() -> None:
    client = FakeClient(["a", "b"], forever=True, gap=0.002)
    rt, _ = runtime(client, slots=2)
    hogs = [submitted(f"a{i}", uid=1, max_tokens=60) for i in range(3)]
    newcomer = submitted("b", uid=2, max_tokens=4)
    client.release.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        for task in hogs:
            rt.add(task)
        await until(lambda: all(t.num_generated >= 8 for t in hogs[:2]))
        rt.add(newcomer)
        await until(lambda: newcomer.started_at > 0)
        assert rt.queue.num_preemptions == 1 and client.running <= 2
        stopped = next(t for t in hogs if t.num_preempted)
        await finished(newcomer)
        for task in hogs:
            await finished(task)
        nursery.cancel_scope.cancel()
    # The stopped task was sent again with its text as the prompt's end, asking for what
    # was left; its stream has every piece once, in turn.
    again = [p for p in client.payloads if p["prompt"].startswith(f"prompt {stopped.id}")][-1]
    kept = again["prompt"].removeprefix(f"prompt {stopped.id}")
    assert kept and again["max_tokens"] == 60 - len(kept)
    assert all(t.output == b"ab" * 30 and t.num_generated == 60 for t in hogs)
    assert newcomer.output == b"abab"


async def test_under_fifo_the_newcomer_waits_its_turn() -> None:
    client = FakeClient(["a"], forever=True, gap=0.002)
    rt, _ = runtime(client, slots=1, policy="fifo")
    hogs = [submitted(f"a{i}", uid=1, max_tokens=10) for i in range(3)]
    newcomer = submitted("b", uid=2, max_tokens=2)
    client.release.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        for task in hogs:
            rt.add(task)
        await until(lambda: hogs[0].num_generated >= 2)
        rt.add(newcomer)
        await finished(newcomer)
        nursery.cancel_scope.cancel()
    assert rt.queue.num_preemptions == 0 and all(t.finished_at < newcomer.started_at for t in hogs)


async def test_a_waiting_task_given_a_higher_priority_goes_first() -> None:
    client = FakeClient(["a"])
    rt, _ = runtime(client, slots=1)
    tasks = [submitted(f"t{i}", uid=1) for i in range(4)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        for task in tasks:
            rt.add(task)
        await until(lambda: client.running == 1)
        tasks[3].config.priority = 1000  # as `ctl priority 1000` does
        client.release.set()
        for task in tasks:
            await finished(task)
        nursery.cancel_scope.cancel()
    assert [r.prompt for r in client.requests] == ["prompt t0", "prompt t3", "prompt t1", "prompt t2"]


async def test_a_task_with_text_already_is_sent_on_from_it_and_a_chat_as_turns() -> None:
    client = FakeClient(["!"])
    rt, _ = runtime(client)
    restored = submitted("r", max_tokens=10)
    restored.output, restored.output_tokens = bytearray(b"so far"), [-1, -1]
    chat = submitted("c", max_tokens=5)
    chat.turns = [("user", "hi")]
    client.release.set()
    await run_to_end(rt, restored, chat)
    first, second = sorted(client.payloads, key=lambda p: "messages" in p)
    assert first["prompt"] == "prompt rso far" and first["max_tokens"] == 8
    assert restored.output == b"so far!" and restored.num_generated == 3
    assert second["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in second
    resumed = Progress(next(r for r in client.requests if r.messages), ["Hel", "lo"], tokens=2).payload("")
    assert resumed["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert resumed["continue_final_message"] is True and resumed["add_generation_prompt"] is False


async def test_with_every_endpoint_down_for_give_up_s_the_waiting_tasks_fail() -> None:
    rt = RemoteRuntime("far", [f"http://127.0.0.1:{free_port()}"], Trace(), slots=[1],
                       retry_s=0.1, give_up_s=0.3)
    tasks = [submitted(str(i)) for i in range(4)]
    await run_to_end(rt, *tasks)
    for task in tasks:
        assert task.state is State.FAILED and "no endpoint answers" in task.error, task.error
        assert "Connection refused" in task.error
    assert rt.active() == 0 and rt.pool.status()[0].inflight == 0
