"""Scheduling through the real mount and the tiny llama.cpp model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount, mounted

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def ax1(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One sequence slot, so every step runs one task and preemption is the only way in."""
    with mounted(tmp_path_factory.mktemp("ax1"), tiny_model, "--slots", "1", "--ctx", "4096") as m:
        yield m


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


@pytest.fixture(scope="module")
def shared(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """Two slots, other users let in: the way a shared machine mounts it."""
    base = tmp_path_factory.mktemp("shared")
    base.chmod(0o755)  # the second user reaches the mount point through it
    with mounted(base, tiny_model, "--slots", "2", "--allow-other") as m:
        yield m


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")
def test_a_second_user_is_not_starved_by_a_first_users_many_tasks(shared: Mount) -> None:
    for i in range(6):
        submit(shared, f"hog{i}", "the first word", max_tokens=20000)
    shared.wait_state("hog1", "running")
    done = shared.sh("setpriv --reuid=1000 --regid=1000 --clear-groups sh -c "
                     "'mkdir tasks/guest && echo \"max_tokens 30\" > tasks/guest/config && "
                     "echo hello > tasks/guest/prompt && cat tasks/guest/stream'", timeout=30)
    assert done.stdout
    status = shared.status("guest")
    assert status["state"] == "done" and status["uid"] == "1000"
    assert (shared.path / "tasks/guest").stat().st_uid == 1000
    rows = dict(line.split(" ", 1) for line in shared.read("sched").splitlines())
    assert rows["user.1000.weight"] == "100" and int(rows["preemptions"]) >= 1
    assert all(shared.status(f"hog{i}")["state"] != "done" for i in range(6))
    shared.sh("for i in 0 1 2 3 4 5; do echo kill > tasks/hog$i/ctl; done")


@pytest.fixture(scope="module")
def tight(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """A KV cache of 1,024 cells for 16 slots: admission is bounded by cells, not slots."""
    with mounted(tmp_path_factory.mktemp("tight"), tiny_model, "--slots", "16", "--ctx", "1024") as m:
        yield m


def test_a_burst_of_100_tasks_all_complete_without_a_full_cache(tight: Mount) -> None:
    tight.sh("for i in $(seq 100); do mkdir tasks/b$i && "
              "echo \"max_tokens $((20 + i))\" > tasks/b$i/config && "
              "echo \"burst task $i\" > tasks/b$i/prompt; done", timeout=120)
    tight.sh("for i in $(seq 100); do cat tasks/b$i/stream > /dev/null; done", timeout=300)
    states = [tight.status(f"b{i}")["state"] for i in range(1, 101)]
    assert states == ["done"] * 100
    assert " error " not in tight.read("trace")
