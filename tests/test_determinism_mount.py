"""Deterministic mode on Gemma 3 270M through the real mount: tasks that ran in batches
(prefixes copied from the cache, a fork, a preemption swapped to disk, evictions leaving
holes) replay alone, after a crash, to the same tokens (notes/determinism.md)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Mount, mount, umount

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")

# Eight slots for seventeen tasks, cached sequences held to 160 cells (so that ending tasks
# evict older ones, leaving holes), every preempted sequence swapped to disk.
OPTIONS = ("--slots", "8", "--ctx", "4096", "--swap-mem", "0", "--cache-cells", "160")
BASE = "The committee met on Tuesday to discuss the budget for the new library, and"
SUFFIXES = [" the chair", " everyone agreed", " the mayor said", " after a long debate"]
OTHERS = ["Photosynthesis is the process by which plants",
          "The rules of chess are simple:", "A good cup of coffee starts with",
          "In the summer of 1969, three astronauts", "Computers store information using",
          "Elephants are the largest land animals, and they",
          "The ocean covers most of the Earth, and", "To bake bread at home, you will need",
          "Water boils at a lower temperature on mountains because",
          "The city of Paris is famous for", "Once upon a time, in a small village by the sea,"]
# Past Gemma 3's 512-token sliding window (drivers.determinism.Placement)
LONG = "The main causes of the French Revolution were " + " ".join(OTHERS) * 6
LENGTHS = [120, 20, 70, 10, 30, 8, 90, 16]


def up(base: Path, model: Path) -> tuple[Mount, int]:
    done = mount(base / "mnt", model, base / "state", *OPTIONS)
    assert done.returncode == 0, done.stderr
    found = re.search(r"pid (\d+)", done.stdout + done.stderr)
    assert found, done.stdout
    return Mount(base / "mnt", base / "state", model), int(found.group(1))


def task(name: str, prompt: str, max_tokens: int, **config: object) -> str:
    """A shell command that submits task ``name``."""
    lines = "".join(f"{k} {v}\\n" for k, v in {"max_tokens": max_tokens, "temperature": 0,
                                               **config}.items())
    return (f"mkdir tasks/{name} && printf '{lines}' > tasks/{name}/config && "
            f"printf %s {prompt!r} > tasks/{name}/prompt")


def replay(ax: Mount, name: str) -> str:
    ax.sh(f"echo run > replay/{name}/ctl")
    deadline = time.monotonic() + 60
    while (result := ax.read(f"replay/{name}/result")) in ("", "running\n"):
        assert time.monotonic() < deadline, f"the replay of {name} did not end"
        time.sleep(0.05)
    return result


def test_tasks_that_ran_in_batches_replay_alone_to_the_same_tokens(gemma_model: Path,
                                                                    tmp_path: Path) -> None:
    ax, pid = up(tmp_path, gemma_model)
    try:
        info = ax.read(f"models/{gemma_model.stem}/info")
        assert "deterministic yes (cpu: weights not repacked, flash attention, KV q8_0" in info
        ax.sh(task("base", BASE, 8) + " && cat tasks/base/stream > /dev/null")
        names = [f"t{i}" for i in range(16)]
        prompts = [BASE + s for s in SUFFIXES] + OTHERS + [LONG]
        seeded = {f"t{i}": {"temperature": 0.8, "seed": 7 + i} for i in range(4, 8)}
        ax.sh(" && ".join(task(n, p, LENGTHS[i % 8], **seeded.get(n, {}))
                          for i, (n, p) in enumerate(zip(names, prompts, strict=True))))
        fork = ax.sh("exec 3<>tasks/base/fork; printf ' Then the treasurer' >&3; read c <&3; "
                     "echo $c").stdout.strip()
        ax.sh("head -c 250 tasks/t0/stream > /dev/null", timeout=120)  # well into its turn
        ax.sh(task("urgent", "The weather tomorrow will be", 16, priority=10000))
        everyone = ["base", fork, "urgent", *names]
        ax.sh(" ".join(f"cat tasks/{n}/stream > /dev/null;" for n in everyone), timeout=240)
        trace = ax.read("trace")
        assert re.search(r" swap_out .*to=disk", trace), "no sequence was swapped to disk"
        assert " swap_in " in trace and " evict " in trace
        assert int(ax.status("t0")["kv_prefix_reused"]) >= 8  # copied from base's sequence
        assert int(ax.status(fork)["kv_prefix_reused"]) >= 8
        assert re.search(r"batch=(\d+\.\.)?([2-9]|1\d)\n", ax.read("replay/t1/timeline"))
        assert int(ax.status("t15")["prompt_tokens"]) > 512
        time.sleep(1.2)  # a journal flush
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        ax, _ = up(tmp_path, gemma_model)  # clears the dead mount
        results = {n: replay(ax, n) for n in everyone}
        generated = {n: ax.status(n)["generated_tokens"] for n in everyone}
        assert results == {n: f"match {generated[n]} tokens\n" for n in everyone}
        assert "deterministic yes" in ax.read("replay/t5/timeline")
    finally:
        umount(ax.path)
