"""Scheduling through the real mount and the tiny llama.cpp model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount, mount, umount

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


@pytest.fixture(scope="module")
def ax1(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One sequence slot, so every step runs one task and preemption is the only way in."""
    base = tmp_path_factory.mktemp("ax1")
    done = mount(base / "mnt", tiny_model, base / "state", "--slots", "1", "--ctx", "4096")
    assert done.returncode == 0, done.stderr
    yield Mount(base / "mnt", base / "state", tiny_model)
    umount(base / "mnt")


def submit(ax: Mount, name: str, prompt: str, **config: object) -> None:
    lines = "".join(f"{k} {v}\\n" for k, v in config.items())
    ax.sh(f"mkdir tasks/{name} && printf '{lines}' > tasks/{name}/config && "
          f"echo {prompt!r} > tasks/{name}/prompt")


def test_preempted_task_gives_the_same_greedy_text_as_an_uninterrupted_run(ax1: Mount) -> None:
    submit(ax1, "long", "the first word", max_tokens=1500, temperature=0)
    ax1.sh("head -c 200 tasks/long/stream > /dev/null")  # it is well under way
    submit(ax1, "urgent", "hello", max_tokens=40, temperature=0, priority=10000)
    ax1.sh("cat tasks/urgent/stream tasks/long/stream > /dev/null", timeout=120)
    status = ax1.status("long")
    assert status["state"] == "done" and int(status["preemptions"]) >= 1, status
    assert " long 0 preempt " in ax1.read("trace")
    submit(ax1, "alone", "the first word", max_tokens=1500, temperature=0)
    ax1.sh("cat tasks/alone/stream > /dev/null", timeout=120)
    assert ax1.status("alone")["preemptions"] == "0"
    interrupted = (ax1.path / "tasks/long/stream").read_bytes()
    assert interrupted == (ax1.path / "tasks/alone/stream").read_bytes()


def test_sched_file_through_the_mount(ax1: Mount) -> None:
    rows = dict(line.split(" ", 1) for line in ax1.read("sched").splitlines())
    assert rows["policy"] == "fair" and rows["slots"] == "1"
    assert int(rows["preemptions"]) >= 1 and "user.0.tokens" in rows
