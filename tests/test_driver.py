"""The llama.cpp driver on the tiny model: vocabulary, batched steps, guards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.base import DriverError, ModelLoadError, Piece, Sampling, StepAborted
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


def decode(driver: LlamaCppDriver, seqs: list[int], prompt: list[int], steps: int,
           sampling: Sampling | None = None) -> dict[int, list[int]]:
    """Prefill ``prompt`` into each of ``seqs`` and decode ``steps`` more tokens, batched."""
    for s in seqs:
        driver.open_seq(s, sampling or Sampling(temperature=0))
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
    together = decode(driver, [0, 1, 2], prompt, 10)
    assert together[0] == together[1] == together[2]
    assert len(set(together[0])) > 1


def test_greedy_fast_path_matches_llama_cpp_sampling_with_top_k_1(driver: LlamaCppDriver) -> None:
    prompt = driver.tokenize("the quick brown")
    fast = decode(driver, [0], prompt, 12, Sampling(temperature=0))
    chain = decode(driver, [0], prompt, 12, Sampling(temperature=1.0, top_k=1, seed=3))
    assert fast == chain


def test_seeded_sampling_repeats(driver: LlamaCppDriver) -> None:
    prompt = driver.tokenize("once")
    sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=42)
    assert decode(driver, [0], prompt, 15, sampling) == decode(driver, [0], prompt, 15, sampling)


@pytest.mark.parametrize("greedy", [True, False])
def test_save_and_restore_into_another_slot_continues_exactly(driver: LlamaCppDriver,
                                                              greedy: bool) -> None:
    sampling = Sampling(temperature=0) if greedy else Sampling(temperature=1.0, top_k=0, seed=9)
    prompt = driver.tokenize("the first word")
    whole = decode(driver, [0], prompt, 20, sampling)[0]
    driver.open_seq(0, sampling)
    tokens = [driver.step([Piece(0, prompt, 0, True)])[0]]
    for i in range(8):
        tokens.append(driver.step([Piece(0, [tokens[-1]], len(prompt) + i, True)])[0])
    state = driver.save_seq(0, keep_kv=True)
    assert state.kv_bytes > 0
    driver.restore_seq(2, state)
    for i in range(8, 20):
        tokens.append(driver.step([Piece(2, [tokens[-1]], len(prompt) + i, True)])[2])
    driver.close_seq(2)
    assert tokens == whole


def test_a_step_over_n_batch_is_refused_not_aborted(driver: LlamaCppDriver) -> None:
    driver.open_seq(0, Sampling())
    with pytest.raises(DriverError, match="exceeds n_batch"):
        driver.step([Piece(0, [BOS_ID] * 65, 0, True)])
    driver.close_seq(0)


def test_sequence_outside_the_slots_is_refused(driver: LlamaCppDriver) -> None:
    with pytest.raises(DriverError):
        driver.open_seq(4, Sampling())


def test_not_a_gguf_is_refused_before_llama_cpp(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        LlamaCppDriver(bad)


def test_abort_stops_a_step_and_leaves_the_sequence_as_before(driver: LlamaCppDriver) -> None:
    prompt = driver.tokenize("the first word")
    whole = decode(driver, [0], prompt, 5)[0]
    driver.open_seq(0, Sampling(temperature=0))
    driver.abort()
    with pytest.raises(StepAborted):
        driver.step([Piece(0, prompt, 0, True)])
    driver.abort(False)
    tokens = [driver.step([Piece(0, prompt, 0, True)])[0]]  # the same positions again
    for i in range(5):
        tokens.append(driver.step([Piece(0, [tokens[-1]], len(prompt) + i, True)])[0])
    driver.close_seq(0)
    assert tokens == whole
