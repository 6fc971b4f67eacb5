"""The llama.cpp driver on the tiny model: vocabulary, batched steps, guards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.base import DriverError, ModelLoadError, Piece, Sampling
from drivers.llamacpp import LlamaCppDriver
from tests.tinymodel import BOS_ID, EOS_ID


@pytest.fixture(scope="module")
def driver(tiny_model: Path) -> Iterator[LlamaCppDriver]:
    d = LlamaCppDriver(tiny_model, n_ctx=1024, n_seq_max=4, n_batch=64)
    yield d
    d.close()


def test_facts_from_the_file(driver: LlamaCppDriver) -> None:
    assert driver.info.architecture == "llama" and driver.info.name == "tiny"
    assert driver.info.vocab_size > 256 and driver.info.parameters > 0
    assert (driver.shape.n_ctx, driver.shape.n_seq_max, driver.shape.n_batch) == (1024, 4, 64)
    assert driver.shape.cell_bytes > 0


def test_tokenize_adds_bos_and_pieces_round_trip(driver: LlamaCppDriver) -> None:
    tokens = driver.tokenize("The café in 日本")
    assert tokens[0] == BOS_ID
    text = b"".join(driver.piece(t) for t in tokens[1:]).decode()
    assert text.strip() == "The café in 日本"
    assert driver.is_eog(EOS_ID) and not driver.is_eog(tokens[1])


def greedy(driver: LlamaCppDriver, seqs: list[int], prompt: list[int], steps: int
           ) -> dict[int, list[int]]:
    for s in seqs:
        driver.open_seq(s, Sampling(temperature=0))
    out = driver.step([Piece(s, prompt, 0, True) for s in seqs])
    got = {s: [out[s]] for s in seqs}
    for i in range(steps):
        out = driver.step([Piece(s, [got[s][-1]], len(prompt) + i, True) for s in seqs])
        for s in seqs:
            got[s].append(out[s])
    for s in seqs:
        driver.close_seq(s)
    return got


def test_sequences_in_one_batch_decode_independently(driver: LlamaCppDriver) -> None:
    prompt = driver.tokenize("hello world")
    together = greedy(driver, [0, 1, 2], prompt, 10)
    assert together[0] == together[1] == together[2]
    assert len(set(together[0])) > 1


def test_greedy_fast_path_matches_llama_cpp_sampling_with_top_k_1(driver: LlamaCppDriver) -> None:
    prompt = driver.tokenize("the quick brown")
    runs = []
    for sampling in (Sampling(temperature=0), Sampling(temperature=1.0, top_k=1, seed=3)):
        driver.open_seq(0, sampling)
        out = driver.step([Piece(0, prompt, 0, True)])
        tokens = [out[0]]
        for i in range(12):
            out = driver.step([Piece(0, [tokens[-1]], len(prompt) + i, True)])
            tokens.append(out[0])
        driver.close_seq(0)
        runs.append(tokens)
    assert runs[0] == runs[1]


def test_a_step_over_n_batch_is_refused_not_aborted(driver: LlamaCppDriver) -> None:
    driver.open_seq(0, Sampling())
    with pytest.raises(DriverError, match="exceeds n_batch"):
        driver.step([Piece(0, [BOS_ID] * 65, 0, True)])
    driver.close_seq(0)


def test_sequence_outside_the_slots_is_refused(driver: LlamaCppDriver) -> None:
    with pytest.raises(DriverError):
        driver.open_seq(4, Sampling())


def test_seeded_sampling_repeats(driver: LlamaCppDriver) -> None:
    prompt = driver.tokenize("once")
    runs = []
    for _ in range(2):
        driver.open_seq(0, Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=42))
        out = driver.step([Piece(0, prompt, 0, True)])
        tokens = [out[0]]
        for i in range(15):
            out = driver.step([Piece(0, [tokens[-1]], len(prompt) + i, True)])
            tokens.append(out[0])
        driver.close_seq(0)
        runs.append(tokens)
    assert runs[0] == runs[1]


def test_not_a_gguf_is_refused_before_llama_cpp(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        LlamaCppDriver(bad)
