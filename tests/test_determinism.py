"""Deterministic mode without a model: the driver's choice and check, the task's mode in
the journal, and replay's use of it (the real thing on Gemma: test_determinism_mount)."""

from __future__ import annotations

import struct
from pathlib import Path

import llama_cpp as lc
import pytest
import trio

from axfs.journal import Journal
from axfs.kernel import Kernel
from axfs.persist import Keeper
from axfs.replay import timeline
from drivers import determinism
from drivers.base import DriverError, Piece, Sampling
from tests.fakes import FakeDriver
from tests.test_sched import run_until, start


def test_a_cpu_model_gets_the_settings_and_a_gpu_model_says_no(monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.delenv(determinism.TILED_ENV, raising=False)
    mparams, cparams = lc.llama_model_default_params(), lc.llama_context_default_params()
    gpu = determinism.choose(True, on_gpu=True, mparams=mparams)
    assert not gpu.deterministic and "GPU" in gpu.reason and mparams.use_extra_bufts
    off = determinism.choose(False, on_gpu=False, mparams=mparams)
    assert off.line().startswith("no (off by setting")
    mode = determinism.choose(True, on_gpu=False, mparams=mparams)
    assert mode.deterministic and not mparams.use_extra_bufts
    assert determinism.os.environ[determinism.TILED_ENV] == "0"
    slots = cparams.n_seq_max
    gemma = determinism.context(mode, cparams, 256, 256)
    assert gemma.kv is determinism.Q8_0 and cparams.type_k == cparams.type_v == lc.GGML_TYPE_Q8_0
    assert cparams.flash_attn_type == lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert cparams.n_seq_max == slots + 1 and cparams.swa_full  # the pin (Placement)
    assert "KV q8_0" in gemma.line() and gemma.line().startswith("yes (cpu: ")
    assert determinism.context(mode, cparams, 16, 16).kv is determinism.BF16  # heads of 16
    failed = gemma.checked(False)
    assert not failed.deterministic and "differ" in failed.reason


class Logits(FakeDriver):
    """Logits of a sequence's last token; ``batch_dependent``: they change with the number
    of tokens in the step, as llama.cpp's batched kernels can."""

    def __init__(self, batch_dependent: bool) -> None:
        super().__init__(n_seq_max=4)
        self.batch_dependent = batch_dependent
        self.last: list[bytes] = []

    def step(self, pieces: list[Piece]) -> dict[int, int]:
        n = sum(len(p.tokens) for p in pieces) if self.batch_dependent else 0
        self.last = [bytes([p.pos % 251, t % 251, n % 251]) for p in pieces for t in p.tokens]
        return super().step(pieces)

    def logits(self, index: int) -> bytes:
        return self.last[index]


def test_the_probe_tells_batch_invariant_logits_from_others() -> None:
    prompt, other = [5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3]
    assert determinism.probe(Logits(batch_dependent=False), prompt, other)
    assert not determinism.probe(Logits(batch_dependent=True), prompt, other)
    driver = Logits(batch_dependent=False)
    determinism.probe(driver, prompt, other)
    assert not driver.open  # the probe's sequences are cleared
    driver.open_seq(0, Sampling())


def deterministic_kernel(state: Path, deterministic: bool) -> Kernel:
    driver = FakeDriver(n_seq_max=4, n_ctx=4000)
    driver.info.deterministic = deterministic
    return Kernel(driver, keeper=Keeper(Journal(state, interval=0.05), "sha-a"))


async def replayed(k: Kernel, task_id: str) -> str:
    task = k.get(task_id)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        k.replays.run(task)
        await run_until(k, lambda: k.replays.result(task) != "running\n")
        nursery.cancel_scope.cancel()
    return k.replays.result(task)


async def test_the_mode_a_task_ran_in_is_journaled_and_replay_uses_it(tmp_path: Path) -> None:
    k = deterministic_kernel(tmp_path, True)
    k.restore()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        a = await start(k, 1, "abc", max_tokens=20, temperature=0)
        b = await start(k, 2, "xyz", max_tokens=20, temperature=0)
        await run_until(k, lambda: a.finished and b.finished)
        await trio.sleep(0.2)  # a journal flush
        nursery.cancel_scope.cancel()
    k.close()
    assert a.deterministic and "deterministic yes" in timeline(a, "")
    k2 = deterministic_kernel(tmp_path, True)  # a restart: the mode comes from the journal
    k2.restore()
    assert k2.get(a.id).deterministic
    assert await replayed(k2, a.id) == "match 20 tokens\n"
    k2.get(a.id).output_tokens[3] = ord("!")  # as if it had come out otherwise
    result = await replayed(k2, a.id)
    assert result.startswith("mismatch token 3: expected '!'")
    assert "ran in deterministic mode" in result and "batches" not in result
    k2.close()
    k3 = deterministic_kernel(tmp_path, False)  # the model now loads in the other mode
    k3.restore()
    result = await replayed(k3, b.id)
    assert result.startswith(f"mismatch mode: task {b.id} ran in deterministic mode, model ")
    assert "is now loaded not in deterministic mode" in result
    k3.close()


def test_a_compaction_reads_the_live_cells_from_either_state_layout() -> None:
    older = struct.pack("<4I", 1, 37, 0, 0)  # stream count, cell count, ...
    newer = struct.pack("<Ii2I", determinism.STATE_MAGIC, -1, 1, 37)  # magic, seq_id first
    assert determinism.live_cells(older) == determinism.live_cells(newer) == 37
    with pytest.raises(DriverError, match="not a layout deterministic mode reads"):
        determinism.live_cells(struct.pack("<4I", 2, 37, 0, 0))  # two streams: not unified
