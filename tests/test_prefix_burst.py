"""A burst of prompts that share a long beginning computes it once, through the mount.

The first task admitted computes the shared text; the others wait for it rather than
starting it again, and are not mistaken for tasks that lack room (making room for them
preempted the very task computing their prefix, and the next in line started it over).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import Mount, mounted

pytestmark = pytest.mark.mount

SHARED = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(160))


def burst(ax: Mount, n: int, shared: str) -> None:
    for i in range(n):
        (ax.path.parent / f"p{i}.txt").write_text(f"{shared} unique {i}\n")
        ax.sh(f"mkdir tasks/b{i} && printf 'max_tokens 8\\ntemperature 0\\n' > tasks/b{i}/config")
    ax.sh(" ".join(f"cat ../p{i}.txt > tasks/b{i}/prompt;" for i in range(n)))
    ax.sh(" ".join(f"cat tasks/b{i}/stream > /dev/null;" for i in range(n)), timeout=600)
    for i in range(n):
        assert ax.status(f"b{i}")["state"] == "done"


def computed_prompt_tokens(trace: str, n: int) -> int:
    return sum(int(m) for m in re.findall(r" b\d+ \S+ prefill tokens=(\d+)", trace))


def check_computed_once(ax: Mount, n: int) -> None:
    shared_tokens = int(ax.status("b0")["prompt_tokens"]) - 8  # less " unique 0" and more
    trace = ax.read("trace")
    computed = computed_prompt_tokens(trace, n)
    assert computed < shared_tokens + n * 32, (computed, shared_tokens)
    saved = int(re.search(r"PrefixTokensSaved:\s+(\d+)", ax.read("memory")).group(1))
    assert saved >= (n - 1) * (shared_tokens - 32)


def test_a_burst_sharing_a_long_prefix_computes_it_once(tiny_model: Path, tmp_path: Path) -> None:
    # 8,192 cells: room for one whole copy of the shared text, not two (as for Gemma by
    # default), so a task that does not wait for the prefix must preempt the one computing it.
    with mounted(tmp_path, tiny_model, "--ctx", "8192", "--slots", "16") as ax:
        burst(ax, 40, SHARED)
        assert 4096 < int(ax.status("b0")["prompt_tokens"]) < 8000
        check_computed_once(ax, 40)


def test_gemma_burst_sharing_a_long_prefix_computes_it_once(gemma_model: Path, tmp_path: Path) -> None:
    with mounted(tmp_path, gemma_model) as ax:
        burst(ax, 12, SHARED)
        assert int(ax.status("b0")["prompt_tokens"]) > 1000
        check_computed_once(ax, 12)
