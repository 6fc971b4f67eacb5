"""The GPU path: how many layers to offload, what NVML says, what the driver chose.

Where there is no GPU (or no NVML) the tests that need one skip, saying why; the
planning logic and the driver's choice are tested everywhere, the GPU faked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llama_cpp as lc
import pytest

import drivers.llamacpp as llamacpp
from drivers import devices
from drivers.base import Piece, Sampling
from drivers.gguf import read_header, read_info
from drivers.llamacpp import LlamaCppDriver
from drivers.llamalib import kv_cell_bytes

REPO = Path(__file__).resolve().parent.parent

GiB = 1 << 30
MiB = 1 << 20


def test_everything_fits() -> None:
    # 18 layers, 2 GiB of weights, 1 GiB of KV on an 80 GiB GPU: all layers and the output
    assert devices.plan_gpu_layers(18, 2 * GiB, GiB, 80 * GiB) == 19


def test_exactly_fits_with_the_reserve() -> None:
    assert devices.plan_gpu_layers(10, 1000 * MiB, 100 * MiB, 1100 * MiB + 512 * MiB) == 11
    assert devices.plan_gpu_layers(10, 1000 * MiB, 100 * MiB, 1100 * MiB + 511 * MiB) == 10


def test_some_layers_fit() -> None:
    # 31 shares of 1 GiB (30 layers + output), 15 GiB of KV (0.5 GiB a layer): 1.5 GiB a
    # layer; 16 GiB - 0.5 GiB reserve = 15.5 GiB -> 10 layers
    assert devices.plan_gpu_layers(30, 31 * GiB, 15 * GiB, 16 * GiB) == 10
    assert devices.plan_gpu_layers(30, 31 * GiB, 15 * GiB, 16 * GiB, reserve_bytes=0) == 10
    assert devices.plan_gpu_layers(30, 31 * GiB, 15 * GiB, 17 * GiB, reserve_bytes=0) == 11


def test_nothing_fits() -> None:
    assert devices.plan_gpu_layers(30, 31 * GiB, 0, GiB) == 0  # a layer needs 1 GiB, 0.5 left
    assert devices.plan_gpu_layers(30, 31 * GiB, 0, 256 * MiB) == 0  # less than the reserve
    assert devices.plan_gpu_layers(30, 31 * GiB, 0, 0) == 0
    assert devices.plan_gpu_layers(0, GiB, 0, 80 * GiB) == 0  # no layers: nothing to place


def test_never_more_than_all_and_more_memory_never_fewer_layers() -> None:
    last = 0
    for free in range(0, 40 * GiB, 256 * MiB):
        n = devices.plan_gpu_layers(24, 20 * GiB, 8 * GiB, free)
        assert last <= n <= 25
        last = n
    assert last == 25


def test_kv_estimate_matches_the_driver(tiny_model: Path) -> None:
    d = LlamaCppDriver(tiny_model, n_ctx=256, n_seq_max=1, n_batch=32)
    try:
        assert kv_cell_bytes(read_header(tiny_model).metadata) == d.shape.cell_bytes
    finally:
        d.close()


def test_kv_estimate_for_gemma(gemma_model: Path) -> None:
    # 18 layers x 1 KV head x (256 + 256) x 2 bytes
    assert kv_cell_bytes(read_header(gemma_model).metadata) == 18 * 1 * 512 * 2


def nvml_gpus() -> list[devices.Gpu]:
    found, why = devices.gpus()
    if not found:
        pytest.skip(f"no GPU to test with: {why}")
    return found


def test_free_memory_from_nvml() -> None:
    found = nvml_gpus()
    free = devices.free_gpu_memory()
    assert [i for i, _ in free] == [g.index for g in found]
    for (_, f), g in zip(free, found, strict=True):
        assert 0 < f <= g.memory_total


def test_devices_file_shows_the_gpus() -> None:
    found = nvml_gpus()
    text = devices.render()
    for g in found:
        assert f"gpu{g.index}.name: {g.name}\n" in text
        assert f"gpu{g.index}.memory_total: {g.memory_total // MiB} MiB\n" in text


def test_without_a_gpu_devices_says_so() -> None:
    found, why = devices.gpus()
    if found:
        pytest.skip("this machine has a GPU")
    assert devices.free_gpu_memory() == []
    assert f"gpus: none ({why})\n" in devices.render()


def test_driver_on_cpu(tiny_model: Path) -> None:
    if lc.llama_supports_gpu_offload() and devices.free_gpu_memory():
        pytest.skip("this llama.cpp offloads to a GPU here")
    for asked in (None, 0, 5):
        d = LlamaCppDriver(tiny_model, n_ctx=256, n_seq_max=1, n_batch=32, gpu_layers=asked)
        try:
            assert d.info.device.startswith("cpu (")
            assert d.info.extra["gpu_layers"] == "0"
        finally:
            d.close()


def fake_gpu(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """A llama.cpp that says it can offload and one GPU with ``free`` bytes free.

    A CPU-only llama.cpp loads the model all the same: it has no GPU device to put the
    layers on, so n_gpu_layers changes nothing.
    """
    monkeypatch.setattr(lc, "llama_supports_gpu_offload", lambda: True)
    monkeypatch.setattr(llamacpp, "free_gpu_memory", lambda: [(0, free)])
    monkeypatch.setattr(llamacpp, "gpus", lambda: (
        [devices.Gpu(0, "Fake GPU", 0, free, 0, None, None)], "ok"))


def test_driver_plans_all_layers_on_a_big_gpu(tiny_model: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, 80 * GiB)
    d = LlamaCppDriver(tiny_model, n_ctx=256, n_seq_max=1, n_batch=32)
    try:
        assert d.info.extra["gpu_layers"] == "3"
        assert d.info.device.startswith("GPU 0 Fake GPU: 2/2 layers + output; cpu (")
    finally:
        d.close()


def test_driver_plans_some_layers_on_a_small_gpu(tiny_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Past the 512 MiB reserve, room for a third of the file (2 layers + output) and
    # half of the KV (2 layers), and a little: one layer.
    layer = tiny_model.stat().st_size // 3 + 512 * kv_cell_bytes(
        read_header(tiny_model).metadata) // 2
    fake_gpu(monkeypatch, 512 * MiB + layer + 1000)
    d = LlamaCppDriver(tiny_model, n_ctx=512, n_seq_max=1, n_batch=32)
    try:
        assert d.info.extra["gpu_layers"] == "1"
        assert d.info.device.startswith("GPU 0 Fake GPU: 1/2 layers; cpu (")
    finally:
        d.close()


def test_asked_layers_override_the_plan(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, 80 * GiB)
    for asked, shown, layers in ((0, "0", "cpu ("), (1, "1", "GPU 0 Fake GPU: 1/2 layers;"),
                                 (999, "3", "GPU 0 Fake GPU: 2/2 layers + output;"),
                                 (-1, "3", "GPU 0 Fake GPU: 2/2 layers + output;")):
        d = LlamaCppDriver(tiny_model, n_ctx=256, n_seq_max=1, n_batch=32, gpu_layers=asked)
        try:
            assert d.info.extra["gpu_layers"] == shown
            assert d.info.device.startswith(layers)
        finally:
            d.close()


def test_driver_on_a_real_gpu(tiny_model: Path) -> None:
    if not lc.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp was built without GPU support")
    found = nvml_gpus()
    d = LlamaCppDriver(tiny_model, n_ctx=256, n_seq_max=1, n_batch=32)
    try:
        assert d.info.extra["gpu_layers"] == "3"
        assert d.info.device.startswith(f"GPU {found[0].index} {found[0].name}: 2/2 layers")
        d.open_seq(0, Sampling())
        assert len(d.step([Piece(0, d.tokenize("hello"), 0, True)])) == 1
    finally:
        d.close()


def test_make_model_writes_a_model_llama_cpp_runs(tmp_path: Path) -> None:
    """tools/make-model, small: the shape of its 150M preset with one layer and a small
    vocabulary (a 1B f16 model was checked by hand: 17 s, 450 MB of memory, 2.0 GB)."""
    out = tmp_path / "random.gguf"
    subprocess.run([sys.executable, str(REPO / "tools/make-model"), "--params", "150M",
                    "--layers", "1", "--vocab", "2000", "--type", "f16", str(out)],
                   check=True, capture_output=True, timeout=120)
    info = read_info(out)
    assert (info.architecture, info.quantisation, info.layers, info.vocab_size,
            info.embedding_length) == ("llama", "F16", 1, 2000, 768)
    d = LlamaCppDriver(out, n_ctx=256, n_seq_max=1, n_batch=32)
    try:
        d.open_seq(0, Sampling())
        tokens = d.tokenize("The history of")
        pos, token = len(tokens), d.step([Piece(0, tokens, 0, True)])[0]
        for _ in range(8):  # the output never favours </s>: greedy runs on
            assert not d.is_eog(token)
            token = d.step([Piece(0, [token], pos, True)])[0]
            pos += 1
    finally:
        d.close()
