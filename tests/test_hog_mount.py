"""One task asking for a million tokens does not hold the KV cache against another user,
through the real mount, with the tiny model and with Gemma (see axfs/scheduler.py).

The hog's long prompt fills most of the cache at once; the guest's prompt does not fit
beside it, so the guest gets in only if the hog gives way. Before memory was reserved as
a task grows, the hog reserved the whole cache at admission and the guest waited for it
to reach its context limit (with Gemma, minutes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from axfs.kv import RESERVE_AHEAD
from tests.conftest import Mount, mounted

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv"),
]

AS_GUEST = "setpriv --reuid=1000 --regid=1000 --clear-groups"


def lines(n: int, what: str) -> str:
    return " ".join(f"{what} {i}: the quick brown fox jumps over the lazy dog." for i in range(n))


def hog_against_guest(ax: Mount, hog: str, guest: str) -> None:
    (ax.path.parent / "hog.txt").write_text(hog)
    (ax.path.parent / "guest.txt").write_text(guest)
    ax.sh("mkdir tasks/hog && echo 'max_tokens 1000000' > tasks/hog/config && "
          "cat ../hog.txt > tasks/hog/prompt && head -c 1 tasks/hog/stream > /dev/null",
          timeout=300)
    ax.sh(f"{AS_GUEST} sh -c 'mkdir tasks/guest && echo \"max_tokens 10\" > tasks/guest/config"
          " && cat ../guest.txt > tasks/guest/prompt && cat tasks/guest/stream'", timeout=120)
    hog_state = ax.status("hog")["state"]
    ax.sh("echo kill > tasks/hog/ctl")
    guest_status = ax.status("guest")
    assert guest_status["state"] == "done" and guest_status["uid"] == "1000", guest_status
    trace = ax.read("trace")
    assert " hog 0 preempt " in trace, trace[-3000:]
    assert hog_state != "done", "the guest waited for the hog to reach its context limit"
    hog_tokens = int(ax.status("hog")["prompt_tokens"])
    guest_tokens = int(guest_status["prompt_tokens"])
    memory = dict(line.split(":", 1) for line in ax.read("memory").splitlines() if ":" in line)
    cells = int(memory["KVCapacity"].split()[0])
    # the guest does not fit beside the hog, and is within its own share of the cache
    assert hog_tokens + RESERVE_AHEAD + guest_tokens + 10 > cells > 2 * guest_tokens


def test_a_hog_gives_way_to_another_users_task(tiny_model: Path, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # the second user reaches the mount point through it
    with mounted(tmp_path, tiny_model, "--ctx", "4096", "--slots", "4", "--allow-other") as ax:
        hog_against_guest(ax, lines(110, "hog"), lines(20, "guest"))


def test_gemma_hog_gives_way_to_another_users_task(gemma_model: Path, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with mounted(tmp_path, gemma_model, "--ctx", "2048", "--slots", "4", "--allow-other") as ax:
        hog_against_guest(ax, lines(100, "hog"), lines(45, "guest"))
