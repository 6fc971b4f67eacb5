"""Replay with the fake driver: it runs alone, compares tokens, explains a mismatch."""

from __future__ import annotations

import re

import pytest
import trio

from axfs.errors import BadInput, Busy
from axfs.kernel import Kernel
from axfs.replay import timeline
from tests.fakes import FakeDriver
from tests.test_sched import run_until, start


async def test_a_replay_runs_alone_and_reports_match_or_the_first_difference() -> None:
    driver = FakeDriver(n_seq_max=4, n_ctx=4000)
    k = Kernel(driver)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        a = await start(k, 1, "abc", max_tokens=20, temperature=0)
        b = await start(k, 2, "xyz", max_tokens=20, temperature=0)
        await run_until(k, lambda: a.finished and b.finished)
        with pytest.raises(BadInput):
            k.replays.control(a, "go")
        steps = len(driver.steps)
        k.replays.run(a)
        assert k.replays.result(a) == "running\n"
        with pytest.raises(Busy):
            k.replays.run(a)
        await run_until(k, lambda: k.replays.result(a) != "running\n")
        assert k.replays.result(a) == "match 20 tokens\n"
        assert all(len(step) == 1 for step in driver.steps[steps:])  # alone in its steps
        assert a.id not in [t for t in k.tasks if t.startswith("replay")]
        a.output_tokens[5] = ord("!")  # as if the original had come out otherwise
        k.replays.run(a)
        await run_until(k, lambda: k.replays.result(a) != "running\n")
        nursery.cancel_scope.cancel()
    result = k.replays.result(a)
    assert result.startswith("mismatch token 5: expected '!' (33), got 'i' (105)")
    assert "ran in batches of up to 2 sequences; the replay ran alone" in result
    text = timeline(a, "")
    # b may join a's steps one step late: batch=2, or batch=1..2
    assert "submit prompt_tokens=3" in text and "decode steps=" in text
    assert re.search(r" batch=(1\.\.)?2\n", text), text


async def test_an_unfinished_task_cannot_be_replayed() -> None:
    k = Kernel(FakeDriver())
    task = await start(k, 1, "abc")
    with pytest.raises(Busy):
        k.replays.run(task)
