"""axctl against a real mount with the tiny model: exit statuses, output, and top in tmux."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Mount, mounted

pytestmark = pytest.mark.mount

AXCTL = [sys.executable, "-m", "tools.axctl"]


def axctl(ax: Mount | Path, *args: str, stdin: str = "", timeout: float = 60
          ) -> subprocess.CompletedProcess[str]:
    root = ax.path if isinstance(ax, Mount) else ax
    return subprocess.run([*AXCTL, *args], cwd=REPO, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "AXFS_ROOT": str(root)})


SPAWNED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """Kill what a test started and left running: a reader left behind keeps the mount busy."""
    yield
    while SPAWNED:
        p = SPAWNED.pop()
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)


def popen(ax: Mount, *args: str) -> subprocess.Popen[str]:
    SPAWNED.append(subprocess.Popen([*AXCTL, *args], cwd=REPO, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "AXFS_ROOT": str(ax.path)}))
    return SPAWNED[-1]


def name() -> str:
    return f"c{time.monotonic_ns()}"


def wait_state(ax: Mount, task: str, *states: str) -> str:
    """Mount.wait_state for a task that another process is about to make."""
    deadline = time.monotonic() + 10
    while not (ax.path / f"tasks/{task}/status").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return ax.wait_state(task, *states)


def long_task(ax: Mount) -> str:
    task = axctl(ax, "submit", "--name", name(), "-p", "max_tokens=30000", "a long one").stdout.strip()
    ax.wait_state(task, "running")
    return task


def test_submit_prints_the_id_of_a_queued_task(ax: Mount) -> None:
    done = axctl(ax, "submit", "hello", "world")
    task = done.stdout.strip()
    assert done.returncode == 0 and task.isdigit()
    assert ax.read(f"tasks/{task}/prompt") == "hello world"
    assert ax.wait_state(task, "done") == "done"


def test_submit_wait_streams_the_answer_and_exits_0(ax: Mount) -> None:
    task = name()
    done = axctl(ax, "submit", "--wait", "--name", task, "-p", "max_tokens=12", "--param", "temperature=0",
                 "--model", "tiny", "The cat sat on")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ax.read(f"tasks/{task}/stream") and done.stdout
    assert done.stderr == ""  # no progress in a pipe
    status = ax.status(task)
    assert (status["state"], status["generated_tokens"], status["model"]) == ("done", "12", "tiny")
    assert "temperature 0\n" in ax.read(f"tasks/{task}/config")


def test_submit_reads_the_prompt_from_stdin(ax: Mount) -> None:
    done = axctl(ax, "submit", "-w", "-p", "max_tokens=3", stdin="from\nstdin\n")
    assert done.returncode == 0, done.stderr
    task = os.readlink(ax.path / "tasks/latest")
    assert task.startswith("axctl-")  # --param makes a named task
    assert ax.read(f"tasks/{task}/prompt") == "from\nstdin"  # one trailing newline dropped, as echo's


def test_submit_wait_exits_3_when_the_task_is_killed(ax: Mount) -> None:
    task = name()
    waiting = popen(ax, "submit", "--wait", "--name", task, "-p", "max_tokens=30000", "go on")
    wait_state(ax, task, "running")
    killed = axctl(ax, "kill", task)
    assert killed.returncode == 0, killed.stderr
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 3
    assert f"task {task} was killed" in err
    assert out == ax.read(f"tasks/{task}/stream")
    again = axctl(ax, "kill", task)
    assert again.returncode == 0 and "already ended (killed)" in again.stderr


def test_submit_wait_exits_1_when_the_task_fails(tiny_model: Path, tmp_path: Path) -> None:
    with mounted(tmp_path, tiny_model, "--ctx", "256", "--slots", "2") as small:
        done = axctl(small, "submit", "--wait", " ".join(["word"] * 400))
        assert done.returncode == 1
        task = os.readlink(small.path / "tasks/latest")
        assert small.status(task)["state"] == "failed"
        assert f"axctl: task {task} failed: " in done.stderr
        assert small.read(f"tasks/{task}/error").strip() in done.stderr


def test_bad_usage_exits_2(ax: Mount) -> None:
    for args, stdin, says in [(["submit", "-p", "max_tokens", "hi"], "", "key=value"),
                              (["submit"], "", "prompt is empty"),
                              (["frobnicate"], "", "invalid choice"),
                              (["kill"], "", "required")]:
        done = axctl(ax, *args, stdin=stdin)
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)


def test_refusals_and_a_missing_tree_exit_4(ax: Mount, tmp_path: Path) -> None:
    done = axctl(tmp_path, "status")
    assert done.returncode == 4 and "is not an axfs tree" in done.stderr
    done = axctl(ax, "--root", str(tmp_path), "submit", "hi")  # --root wins over AXFS_ROOT
    assert done.returncode == 4
    done = axctl(ax, "wait", "nosuchtask")
    assert done.returncode == 4 and "no task 'nosuchtask'" in done.stderr
    done = axctl(ax, "submit", "-p", "colour=red", "hi")
    assert done.returncode == 4 and "Invalid argument" in done.stderr
    assert "unknown key 'colour'" in done.stderr
    done = axctl(ax, "submit", "--name", "bad/name", "hi")
    assert done.returncode == 4


def test_wait_exit_statuses_and_timeout(ax: Mount) -> None:
    task = long_task(ax)
    start = time.monotonic()
    done = axctl(ax, "wait", task, "--timeout", "0.5")
    assert done.returncode == 124 and f"task {task} is still running" in done.stderr
    assert time.monotonic() - start < 10
    waiter = popen(ax, "wait", task)
    time.sleep(0.5)
    assert waiter.poll() is None
    axctl(ax, "kill", task)
    assert waiter.wait(timeout=30) == 3
    short = axctl(ax, "submit", "-p", "max_tokens=4", "short").stdout.strip()
    assert axctl(ax, "wait", short).returncode == 0
    assert axctl(ax, "wait", short, task).returncode == 3  # the first that did not end done
    assert axctl(ax, "wait").returncode == 0  # latest: the short one


def test_wait_on_a_draft_waits_for_its_prompt(ax: Mount) -> None:
    task = name()
    (ax.path / "tasks" / task).mkdir()
    (ax.path / f"tasks/{task}/config").write_text("max_tokens 5\n")
    waiter = popen(ax, "wait", task)
    time.sleep(0.8)
    assert waiter.poll() is None
    (ax.path / f"tasks/{task}/prompt").write_text("now it starts")
    assert waiter.wait(timeout=30) == 0
    assert ax.status(task)["state"] == "done"


def test_status_shows_the_box_at_a_glance(ax: Mount) -> None:
    task = axctl(ax, "submit", "-p", "max_tokens=2", "x").stdout.strip()
    ax.wait_state(task, "done")
    done = axctl(ax, "status")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for section in ("Models", "Devices", "Memory", "Queue", "Tasks"):
        assert f"\n{section}\n" in out
    assert "  tiny  [default, loaded]\n    llama, " in out
    assert "cpu0: " in out and "cores" in out
    capacity = ax.read("memory").split()[1]
    assert "KV cache " in out and f"of {capacity} cells used" in out
    assert "policy fair:" in out and "user root (0):" in out
    assert " done," in out
    one = axctl(ax, "status", task)
    assert one.stdout == ax.read(f"tasks/{task}/status")


def test_top_once_prints_a_row_per_task(ax: Mount) -> None:
    task = long_task(ax)
    try:
        done = axctl(ax, "top", "--once")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f"axfs {ax.path}   policy fair")
        assert lines[4].split()[:5] == ["ID", "USER", "MODEL", "STATE^", "PRIO"]
        assert lines[4].endswith("PROMPT")
        assert lines[5].split()[:4] == [task, "root", "tiny", "running"]  # running tasks first
        assert lines[5].endswith("a long one")
        assert sum(1 for line in lines[5:]) == len([t for t in os.listdir(ax.path / "tasks")
                                                    if t not in ("new", "latest")])
    finally:
        axctl(ax, "kill", task)


def test_replay_says_when_the_tree_has_no_replay(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/new").touch()  # looks like a tree, but one without replay/
    done = axctl(tmp_path, "replay", "1")
    assert done.returncode == 4 and "has no replay directory" in done.stderr


def test_replay_runs_a_task_again_and_says_match(ax: Mount) -> None:
    if not (ax.path / "replay").is_dir():
        pytest.skip("this tree has no replay/")
    task = name()
    assert axctl(ax, "submit", "-w", "--name", task, "-p", "max_tokens=8", "-p", "temperature=0",
                 "replay me").returncode == 0
    done = axctl(ax, "replay", task, "--timeline")
    assert done.returncode == 0, done.stderr
    timeline, result = done.stdout.rsplit("\n", 2)[0], done.stdout.splitlines()[-1]
    assert timeline.startswith(f"task {task}\n") and " submit " in timeline
    assert result == "match 8 tokens"
    assert axctl(ax, "replay", "nosuchtask").returncode == 4


def test_help_documents_the_exit_statuses() -> None:
    out = subprocess.run([*AXCTL, "--help"], cwd=REPO, capture_output=True, text=True).stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "124 ", "130 "):
        assert f"\n  {code}" in out
    installed = Path(sys.executable).parent / "axctl"
    assert installed.exists(), "axctl is not installed: pip install -e . again"
    assert subprocess.run([installed, "--help"], capture_output=True, text=True).stdout == out


# -- in a terminal, through tmux ---------------------------------------------------------


class Tmux:
    """A tmux server of its own, with one window running ``command``."""

    def __init__(self, command: str, width: int = 140, height: int = 24) -> None:
        self.socket = f"axctl-test-{os.getpid()}-{time.monotonic_ns()}"
        subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", "new-session", "-d", "-x", str(width),
                        "-y", str(height), "-c", str(REPO), command], check=True)
        self.path = subprocess.run(["tmux", "-L", self.socket, "display", "-p", "#{socket_path}"],
                                   capture_output=True, text=True).stdout.strip()

    def screen(self) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "capture-pane", "-p"], capture_output=True,
                              text=True).stdout

    def wait_for(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never showed; the screen:\n{self.screen()}")

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "-L", self.socket, "send-keys", *keys], check=True)

    def alive(self) -> bool:
        return subprocess.run(["tmux", "-L", self.socket, "has-session"], capture_output=True).returncode == 0

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        if self.path:
            Path(self.path).unlink(missing_ok=True)  # tmux leaves its socket behind


@pytest.fixture
def tmux_for(ax: Mount) -> Iterator[list[Tmux]]:
    if shutil.which("tmux") is None:
        pytest.skip("no tmux")
    made: list[Tmux] = []
    yield made
    for t in made:
        t.close()


def in_tmux(made: list[Tmux], ax: Mount, args: str) -> Tmux:
    made.append(Tmux(f"env AXFS_ROOT={ax.path} TERM=screen {sys.executable} -m tools.axctl {args}; "
                     "echo exit=$?; sleep 60"))
    return made[-1]


def test_top_draws_a_frame_sorts_and_kills(ax: Mount, tmux_for: list[Tmux]) -> None:
    task = long_task(ax)
    term = in_tmux(tmux_for, ax, "top -d 0.3")
    screen = term.wait_for("PROMPT")
    lines = screen.splitlines()
    assert lines[0].startswith(f"axfs {ax.path}   policy fair")
    assert lines[1].startswith("KV  [") and "cells used" in lines[1]
    assert lines[4].split()[:4] == ["ID", "USER", "MODEL", "STATE^"]
    assert lines[5].split()[:4] == [task, "root", "tiny", "running"]
    assert "q quit" in lines[-1] or "q quit" in screen
    term.keys(">")  # sort by the next column: PRIO, highest first
    term.wait_for("PRIOv")
    term.keys("<", "k")
    term.wait_for(f"kill task {task}? y/n")
    term.keys("y")
    term.wait_for(f"killed task {task}")
    assert ax.wait_state(task, "killed") == "killed"
    term.keys("q")
    term.wait_for("exit=0")


def test_wait_shows_progress_on_a_terminal_only(ax: Mount, tmux_for: list[Tmux]) -> None:
    task = long_task(ax)
    term = in_tmux(tmux_for, ax, f"wait {task}")
    term.wait_for(f"task {task}: running, ")
    assert "generated" in term.screen()
    axctl(ax, "kill", task)
    screen = term.wait_for("exit=3")
    assert f"task {task}: running" not in screen  # the progress line is cleared at the end
    assert f"axctl: task {task} was killed" in screen
    piped = axctl(ax, "wait", task)
    assert piped.returncode == 3 and "\r" not in piped.stderr and "running" not in piped.stderr
