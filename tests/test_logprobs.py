"""Confidence and sampler settings (issue 15) with the tiny model: the driver's sampler
chain and token records, then ``tasks/ID/tokens``, ``status`` and the config keys through
a real mount, checked with real tools against llama.cpp's own logits (llama-cpp-python's
``Llama``, which computes them apart from axfs)."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from drivers import logprobs
from drivers.base import Piece, Sampling
from drivers.llamacpp import LlamaCppDriver
from drivers.llamalib import cpu_has_amx
from tests.conftest import Mount

PROMPT = "The quick brown fox"


# -- the driver ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def driver(tiny_model: Path) -> Iterator[LlamaCppDriver]:
    d = LlamaCppDriver(tiny_model, n_ctx=1024, n_seq_max=4, n_batch=64)
    yield d
    d.close()


def decode(d: LlamaCppDriver, sampling: Sampling, prompt: list[int], steps: int,
           seq: int = 0) -> tuple[list[int], list[bytes]]:
    """Greedy-fed decode of one sequence: its tokens and their records."""
    d.open_seq(seq, sampling)
    tokens, records = [d.step([Piece(seq, prompt, 0, True)])[seq]], [d.token_records().get(seq, b"")]
    for i in range(steps - 1):
        tokens.append(d.step([Piece(seq, [tokens[-1]], len(prompt) + i, True)])[seq])
        records.append(d.token_records().get(seq, b""))
    d.close_seq(seq)
    return tokens, records


def test_min_p_1_keeps_only_the_likeliest_token(driver: LlamaCppDriver) -> None:
    prompt = driver.tokenize(PROMPT)
    greedy, _ = decode(driver, Sampling(temperature=0), prompt, 16)
    wide = Sampling(temperature=1.5, top_k=0, top_p=1.0, seed=11)
    assert decode(driver, wide, prompt, 16)[0] != greedy  # a draw, without min-p
    assert decode(driver, Sampling(temperature=1.5, top_k=0, top_p=1.0, seed=11, min_p=1.0),
                  prompt, 16)[0] == greedy


@pytest.mark.parametrize("penalty", [{"repeat_penalty": 1e30}, {"presence_penalty": 1e30},
                                     {"frequency_penalty": 1e30}])
def test_a_huge_penalty_repeats_no_token_of_the_sequence(driver: LlamaCppDriver,
                                                         penalty: dict[str, float]) -> None:
    prompt = driver.tokenize(PROMPT)
    plain, _ = decode(driver, Sampling(temperature=0), prompt, 30)
    assert len(set(plain)) < len(plain)  # the tiny model's greedy text repeats itself
    sampling = Sampling(temperature=0, repeat_last_n=1024, recent=tuple(prompt), **penalty)  # type: ignore[arg-type]
    tokens, _ = decode(driver, sampling, prompt, 30)
    assert len(set(tokens)) == len(tokens) and not set(tokens) & set(prompt)


def test_records_come_only_for_sequences_that_ask_and_survive_a_save(driver: LlamaCppDriver) -> None:
    prompt = driver.tokenize(PROMPT)
    driver.open_seq(0, Sampling(temperature=0, logprobs=3))
    driver.open_seq(1, Sampling(temperature=1.0, seed=4))
    out = driver.step([Piece(0, prompt, 0, True), Piece(1, prompt, 0, True)])
    assert set(driver.token_records()) == {0}
    (rec,) = logprobs.read(driver.token_records()[0], 3)
    assert rec["ids"][0] == out[0] and rec["logprob"] == rec["logprobs"][0] <= 0
    state = driver.save_seq(0, keep_kv=True)
    driver.restore_seq(2, state)
    driver.step([Piece(2, [out[0]], len(prompt), True)])
    assert set(driver.token_records()) == {2}
    for seq in (1, 2):
        driver.close_seq(seq)


# -- through the mount -----------------------------------------------------------------------

def draft(ax: Mount, config: str) -> str:
    name = f"lp{time.monotonic_ns()}"
    ax.sh(f"mkdir tasks/{name} && printf '{config}' > tasks/{name}/config")
    return name


def run(ax: Mount, config: str, prompt: str = PROMPT) -> str:
    name = draft(ax, config)
    ax.sh(f"echo '{prompt}' > tasks/{name}/prompt")
    assert ax.wait_state(name, "done", "failed", timeout=60) == "done", ax.read(f"tasks/{name}/error")
    return name


def reference(model: Path, prompt: str, ids: list[int], deterministic: bool = False) -> np.ndarray:
    """llama.cpp's own log-probabilities of the rows ``ids`` were drawn from, computed
    from the logits llama-cpp-python's Llama gives for the prompt, then each of ``ids``
    in turn, with the same weight layout and attention as axfs: a batch of another shape
    rounds differently (up to 3e-3 here), flash attention off (llama.cpp's "auto" chose it
    for axfs's context) and Gemma's weights not repacked by up to 0.02."""
    import llama_cpp
    from llama_cpp import llama_cpp as lc

    def params() -> lc.llama_model_params:  # weights repacked or not, as axfs loads them
        p = default()
        p.use_extra_bufts = not cpu_has_amx() and not deterministic
        return p

    default = lc.llama_model_default_params
    with mock.patch.object(lc, "llama_model_default_params", params):
        # n_ctx rows of n_vocab scores are kept: no more than the prompt and ids need
        # deterministic mode's KV type (drivers/determinism.py) where the tree runs in it
        kv = {"type_k": llama_cpp.GGML_TYPE_Q8_0, "type_v": llama_cpp.GGML_TYPE_Q8_0} \
            if deterministic else {}
        llm = llama_cpp.Llama(str(model), n_ctx=len(prompt.encode()) + len(ids) + 8,
                              logits_all=True, flash_attn=True, verbose=False, **kv)
    try:
        start = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        llm.eval(start)
        for token in ids[:-1]:
            llm.eval([token])
        logits = llm.scores[len(start) - 1: len(start) - 1 + len(ids)].astype(np.float64)
    finally:
        llm.close()
    top = logits.max(axis=1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))


def check_against_llama_cpp(ax: Mount, name: str, n: int) -> None:
    """Each line of tasks/NAME/tokens (read with cut and awk) against ``reference``."""
    lines = ax.sh(f"cut -f1-5 tasks/{name}/tokens").stdout.splitlines()
    assert len(lines) == int(ax.status(name)["generated_tokens"]) > 1
    assert ax.sh(f"awk -F'\\t' 'NF != 6' tasks/{name}/tokens").stdout == ""
    fields = [line.split("\t") for line in lines]
    assert [int(f[0]) for f in fields] == list(range(len(lines)))
    ids = [int(f[1]) for f in fields]
    deterministic = "deterministic yes" in ax.sh("cat models/*/info").stdout
    ref = reference(ax.model, ax.read(f"tasks/{name}/prompt"), ids, deterministic)
    for row, f in zip(ref, fields, strict=True):
        token = int(f[1])
        assert row.argmax() == token  # greedy
        assert float(f[2]) == pytest.approx(row[token], abs=1e-3)
        p = np.exp(row)
        assert float(f[3]) == pytest.approx(-(p * row).sum(), abs=1e-3)
        alts = [a.split(":") for a in f[4].split(",")]
        assert len(alts) == n and int(alts[0][0]) == token
        assert [float(lp) for _, lp in alts] == pytest.approx(np.sort(row)[::-1][:n].tolist(), abs=1e-3)
        assert all(float(lp) == pytest.approx(row[int(a)], abs=1e-3) for a, lp in alts)


@pytest.mark.mount
def test_tokens_has_a_line_a_token_and_logprobs_agree_with_llama_cpp(ax: Mount) -> None:
    name = run(ax, "temperature 0\\nmax_tokens 24\\nlogprobs 5\\n")
    check_against_llama_cpp(ax, name, 5)
    status = ax.status(name)
    column = [float(v) for v in ax.sh(f"cut -f3 tasks/{name}/tokens").stdout.split()]
    assert float(status["min_logprob"]) == pytest.approx(min(column), abs=1e-4)
    assert float(status["mean_logprob"]) == pytest.approx(sum(column) / len(column), abs=1e-3)
    assert float(status["mean_entropy"]) > 0


@pytest.mark.mount
def test_without_logprobs_tokens_lists_index_id_and_text(ax: Mount) -> None:
    name = run(ax, "temperature 0\\nmax_tokens 12\\n")
    assert ax.sh(f"awk -F'\\t' '{{print NF}}' tasks/{name}/tokens | sort -u").stdout == "3\n"
    assert ax.sh(f"wc -l < tasks/{name}/tokens").stdout.strip() == "12"
    assert "min_logprob" not in ax.read(f"tasks/{name}/status")
    sampled = run(ax, "temperature 1\\nseed 3\\nmax_tokens 12\\nlogprobs 2\\nformat json\\n")
    assert ax.sh(f"awk -F'\\t' 'NF != 6' tasks/{sampled}/tokens").stdout == ""
    assert "min_logprob" in ax.read(f"tasks/{sampled}/status")


@pytest.mark.mount
def test_a_huge_repeat_penalty_reaches_the_sampler(ax: Mount) -> None:
    plain = run(ax, "temperature 0\\nmax_tokens 30\\n")
    ids = ax.sh(f"cut -f2 tasks/{plain}/tokens").stdout.split()
    assert len(set(ids)) < len(ids)
    name = run(ax, "temperature 0\\nmax_tokens 30\\nrepeat_penalty 1e30\\nrepeat_last_n 100000\\n")
    assert ax.sh(f"cut -f2 tasks/{name}/tokens | sort | uniq -d").stdout == ""
    assert "repeat_penalty 1e+30\nrepeat_last_n 100000\n" in ax.read(f"tasks/{name}/config")


@pytest.mark.mount
@pytest.mark.parametrize("line,reason", [
    ("logprobs 21", "outside 0..20"),
    ("logprobs many", "not an integer"),
    ("min_p 2", "outside 0.0..1.0"),
    ("repeat_penalty 0", "not above 0"),
    ("repeat_last_n -1", "outside 0..2147483647"),
    ("presence_penalty inf", "not a finite number"),
    ("frequency_penalty nan", "not a finite number"),
])
def test_a_value_out_of_range_fails_the_config_write(ax: Mount, line: str, reason: str) -> None:
    name = draft(ax, "max_tokens 3\\n")
    f = open(ax.path / f"tasks/{name}/config", "a")  # noqa: SIM115 (its close is the test)
    f.write(line + "\n")
    with pytest.raises(OSError) as bad:
        f.close()
    assert bad.value.errno == errno.EINVAL
    assert reason in ax.read(f"tasks/{name}/error")
    assert "logprobs 0\n" in ax.read(f"tasks/{name}/config")


@pytest.mark.mount
def test_a_remote_model_refuses_logprobs(ax: Mount) -> None:
    ax.sh("mkdir -p models/far && echo 'endpoints http://127.0.0.1:9' > models/far/ctl")
    name = draft(ax, "max_tokens 3\\n")
    done = ax.sh(f"printf 'model far\\nlogprobs 2\\n' >> tasks/{name}/config", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert "logprobs: model far is remote" in ax.read(f"tasks/{name}/error")
    ax.sh("rm -r models/far")
