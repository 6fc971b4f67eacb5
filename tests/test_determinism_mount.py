"""Deterministic mode on Gemma 3 270M through the real mount: tasks that ran in batches
(prefixes copied from the cache, a fork, a preemption swapped to disk, an aborted step,
evictions leaving holes, a grammar) replay alone, after a crash, to the same tokens
(docs/design.md, Replay)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Mount, mount, umount

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")]

# Eight slots for nineteen tasks, cached sequences held to 160 cells (so that ending tasks
# evict older ones, leaving holes), every preempted sequence swapped to disk; a second
# user's task preempts one (axfs/scheduler.py: a newcomer's turn).
OPTIONS = ("--slots", "8", "--ctx", "4096", "--swap-mem", "0", "--cache-cells", "160",
           "--allow-other")
AS_GUEST = "setpriv --reuid=1000 --regid=1000 --clear-groups"
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


def guest(command: str) -> str:
    """``command`` run as a second user (uid 1000)."""
    return f"{AS_GUEST} sh -c {command!r}"


def replay(ax: Mount, name: str) -> str:
    ax.sh(f"echo run > replay/{name}/ctl")
    deadline = time.monotonic() + 60
    while (result := ax.read(f"replay/{name}/result")) in ("", "running\n"):
        assert time.monotonic() < deadline, f"the replay of {name} did not end"
        time.sleep(0.05)
    return result


def test_tasks_that_ran_in_batches_replay_alone_to_the_same_tokens(gemma_model: Path,
                                                                    tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # the second user reaches the mount point through it
    ax, pid = up(tmp_path, gemma_model)
    try:
        info = ax.read(f"models/{gemma_model.stem}/info")
        assert "deterministic yes (cpu: weights not repacked, flash attention, KV q8_0" in info
        ax.sh(task("base", BASE, 8) + " && cat tasks/base/stream > /dev/null")
        names = [f"t{i}" for i in range(16)]
        prompts = [BASE + s for s in SUFFIXES] + OTHERS + [LONG]
        seeded: dict[str, dict[str, object]] = {
            f"t{i}": {"temperature": 0.8, "seed": 7 + i} for i in range(4, 8)}
        seeded["t9"] = {"format": "json"}  # llama.cpp's grammar sampler picks its tokens
        ax.sh(" && ".join(task(n, p, LENGTHS[i % 8], **seeded.get(n, {}))
                          for i, (n, p) in enumerate(zip(names, prompts, strict=True))))
        fork = ax.sh("exec 3<>tasks/base/fork; printf ' Then the treasurer' >&3; read c <&3; "
                     "echo $c").stdout.strip()
        ax.sh("head -c 100 tasks/t0/stream > /dev/null", timeout=120)  # all are running
        ax.sh(guest(task("guest", "The weather tomorrow will be", 16)))
        ax.sh(task("urgent", "The best way to learn a language is", 16, priority=10000))
        everyone = ["base", fork, "guest", "urgent", *names]
        ax.sh(" ".join(f"cat tasks/{n}/stream > /dev/null;" for n in everyone), timeout=240)
        trace = ax.read("trace")
        assert re.search(r" swap_out .*to=disk", trace), "no sequence was swapped to disk"
        assert " swap_in " in trace and " evict " in trace
        assert ax.status("guest")["uid"] == "1000"
        assert ax.read("tasks/t9/stream").startswith("{")
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
        log = (tmp_path / "state/axfs.log").read_text()  # holes packed while tasks ran
        assert re.search(r"KV cache compacted: [1-9]\d* of ", log), log[-3000:]
        assert log.count("KV cache compacted") < 60  # now and then, not at every step
    finally:
        umount(ax.path)
