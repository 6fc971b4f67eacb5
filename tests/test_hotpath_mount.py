"""The hot path through the real mount: text published while the next step runs is the
same as without overlap, and many fast streams read at once each get their whole text."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_CTX, Mount, mounted

pytestmark = pytest.mark.mount

PROMPTS = [f"stream {i}: the quick brown fox" for i in range(16)]


def run_all(ax: Mount, prompts: list[str], max_tokens: int) -> dict[str, str]:
    """Submit every prompt, read every stream with its own cat at once; the texts cat saw."""
    names = [f"t{i}" for i in range(len(prompts))]
    for name in names:
        ax.sh(f"mkdir tasks/{name} && printf 'max_tokens {max_tokens}\\ntemperature 0\\n' "
              f"> tasks/{name}/config")
    submit = " ".join(f"printf %s {p!r} > tasks/{n}/prompt;" for n, p in zip(names, prompts,
                                                                          strict=True))
    cats = " ".join(f"cat tasks/{n}/stream > $OUT/{n} &" for n in names)
    out = ax.path.parent / "out"
    out.mkdir(exist_ok=True)
    ax.sh(f"OUT={out}; {submit} {cats} wait", timeout=300)
    return {n: (out / n).read_text() for n in names}


def test_greedy_text_is_the_same_with_and_without_overlap(tiny_model: Path, tmp_path: Path) -> None:
    # One slot, first come first served: each task is decoded alone, in the same order,
    # both times. With tasks sharing steps the text would depend on which step each
    # joined (a matter of timing), since even the tiny model's logits may differ in their
    # last bits between batch sizes (docs/design.md, Replay). tests/test_overlap.py compares 16
    # tasks sharing steps with the fake driver, whose tokens do not depend on the batch.
    texts = {}
    for overlap in ("on", "off"):
        with mounted(tmp_path / overlap, tiny_model, "--ctx", str(TINY_CTX), "--slots", "1",
                     "--policy", "fifo", "--prefix-cache", "off", "--overlap", overlap) as ax:
            texts[overlap] = run_all(ax, PROMPTS, 48)
            for name, text in texts[overlap].items():
                assert ax.status(name)["state"] == "done"
                assert ax.read(f"tasks/{name}/stream") == text
    assert texts["on"] == texts["off"]
    assert len(set(texts["on"].values())) > 1  # the prompts lead to different texts


def test_64_streams_read_at_once_each_get_their_whole_text(tiny_model: Path, tmp_path: Path) -> None:
    prompts = [f"reader {i} of many:" for i in range(64)]
    with mounted(tmp_path, tiny_model, "--ctx", str(TINY_CTX), "--slots", "64") as ax:
        seen = run_all(ax, prompts, 64)
        for name, text in seen.items():
            status = ax.status(name)
            assert status["state"] == "done", name
            assert int(status["generated_tokens"]) == 64 or status["finish_reason"] == "eos"
            assert text == ax.read(f"tasks/{name}/stream") and text, name
