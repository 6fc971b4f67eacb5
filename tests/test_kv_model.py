"""The KV manager on the tiny llama.cpp model: reuse, fork and swap give the text a run
from scratch gives (greedy), and the manager's cell counts agree with llama.cpp's.

Each comparison runs its tasks one at a time, so that every sequence is decoded alone
both ways: a sequence decoded inside a batch may differ in its last bits (docs/design.md, Replay).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from axfs.kernel import Kernel
from axfs.swap import SwapSpace
from axfs.task import State, Task
from drivers.llamacpp import LlamaCppDriver
from tests.fakes import local
from tests.test_sched import run_until, start

SYSTEM = ("You are a helpful assistant. Answer in one short sentence, and never use more "
          "words than you need. The user asks: ")


@asynccontextmanager
async def kernel(model: Path, prefix_cache: bool = True, slots: int = 4,
                 swap: SwapSpace | None = None) -> AsyncIterator[Kernel]:
    driver = LlamaCppDriver(model, n_ctx=4096, n_seq_max=slots, n_batch=256)
    k = Kernel(driver, prefix_cache=prefix_cache, swap=swap)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(k.run)
            yield k
            nursery.cancel_scope.cancel()
    finally:
        driver.close()


async def done(k: Kernel, prompt: str, max_tokens: int = 24, **config: object) -> Task:
    task = await start(k, 1, prompt, max_tokens=max_tokens, temperature=0, **config)
    await run_until(k, lambda: task.finished, limit=60)
    assert task.state is State.DONE, task.error
    return task


Scenario = Callable[[Kernel], Awaitable[Task]]


async def both_ways(model: Path, scenario: Scenario) -> tuple[Task, Task]:
    async with kernel(model, prefix_cache=True) as k:
        reused = await scenario(k)
    async with kernel(model, prefix_cache=False) as k:
        scratch = await scenario(k)
    return reused, scratch


async def test_a_reused_prefix_gives_the_text_computed_from_scratch(tiny_model: Path) -> None:
    async def scenario(k: Kernel) -> Task:
        await done(k, SYSTEM + "what is the capital of France?")
        return await done(k, SYSTEM + "how far away is the moon?")

    reused, scratch = await both_ways(tiny_model, scenario)
    assert reused.prefix_reused > len(scratch.prompt_tokens) * 3 // 4 and scratch.prefix_reused == 0
    assert reused.output_tokens == scratch.output_tokens


async def test_the_same_prompt_again_reuses_all_but_its_last_token(tiny_model: Path) -> None:
    async def scenario(k: Kernel) -> Task:
        await done(k, SYSTEM + "twice")
        return await done(k, SYSTEM + "twice")

    reused, scratch = await both_ways(tiny_model, scenario)
    assert reused.prefix_reused == len(reused.prompt_tokens) - 1
    assert reused.output_tokens == scratch.output_tokens


async def test_a_fork_gives_the_text_of_its_whole_context_from_scratch(tiny_model: Path) -> None:
    async def scenario(k: Kernel) -> Task:
        parent = await done(k, SYSTEM + "tell me a story.")
        child = await k.fork(parent, 1, 1, b" And then what happened?")
        await run_until(k, lambda: child.finished, limit=60)
        grandchild = await k.fork(child, 1, 1, b" Why?")
        await run_until(k, lambda: grandchild.finished, limit=60)
        return grandchild

    reused, scratch = await both_ways(tiny_model, scenario)
    assert reused.prompt_tokens == scratch.prompt_tokens
    assert reused.prefix_reused > len(reused.prompt_tokens) - 12
    assert reused.output_tokens == scratch.output_tokens


async def test_cell_counts_agree_with_llama_cpp(tiny_model: Path) -> None:
    async with kernel(tiny_model) as k:
        system = SYSTEM * 12  # long enough for both to stay cached (MIN_KEPT)
        first = await done(k, system + "first")
        second = await done(k, system + "second", max_tokens=40)
        await trio.sleep(0.1)  # the engine is idle: nothing runs
        driver = local(k).driver
        assert isinstance(driver, LlamaCppDriver)
        slots = local(k).kv.cached_slots()
        assert len(slots) == 2 and first.seq is None and second.seq is None
        for slot in slots:
            assert local(k).kv.cells(slot) == driver.seq_cells(slot) > 0
        shared = second.prefix_reused
        assert shared > 0
        stats = local(k).kv.stats()
        assert stats.used_cells == stats.running_cells + stats.cached_cells
        assert stats.running_cells == 0
        assert stats.used_cells == sum(local(k).kv.cells(s) for s in slots) - shared


async def test_swapped_out_to_disk_and_back_gives_the_uninterrupted_text(
        tiny_model: Path, tmp_path: Path) -> None:
    async with kernel(tiny_model, slots=1) as k:
        alone = await done(k, "the first word", max_tokens=300)
    async with kernel(tiny_model, slots=1, prefix_cache=False,
                      swap=SwapSpace(0, tmp_path / "swap")) as k:
        local(k).scheduler.costs.prefill_s_per_token = 1.0  # always keep the KV: swap, not recompute
        hog = await start(k, 1, "the first word", max_tokens=300, temperature=0)
        await run_until(k, lambda: hog.num_generated > 50, limit=60)
        await done(k, "hello", max_tokens=10, priority=10000)
        await run_until(k, lambda: hog.finished, limit=60)
        swap = local(k).engine.swap
    assert hog.num_preempted >= 1 and swap.outs >= 1 and swap.ins >= 1
    assert swap.out_bytes > 0 and swap.disk_count == 0
    assert hog.output_tokens == alone.output_tokens
