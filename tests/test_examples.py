"""Each script of tools/examples run against a real mount with the tiny model, as a person would."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, Mount

pytestmark = pytest.mark.mount

EXAMPLES = REPO / "tools" / "examples"


def run(ax: Mount, script: str, *args: str, stdin: str = "", env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXAMPLES / script), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "AXFS_ROOT": str(ax.path), **(env or {})})


def tasks_named(ax: Mount, prefix: str) -> list[str]:
    return sorted(t for t in os.listdir(ax.path / "tasks") if t.startswith(prefix))


def test_ask_prints_the_answer_and_exits_0(ax: Mount) -> None:
    done = run(ax, "ask.sh", "The capital of France is")
    assert done.returncode == 0, done.stderr
    task = os.readlink(ax.path / "tasks/latest")
    assert ax.read(f"tasks/{task}/prompt") == "The capital of France is"
    assert done.stdout == ax.read(f"tasks/{task}/stream") + "\n"
    assert ax.status(task)["state"] == "done"
    piped = run(ax, "ask.sh", stdin="From stdin:\n")
    assert piped.returncode == 0
    assert ax.read(f"tasks/{os.readlink(ax.path / 'tasks/latest')}/prompt") == "From stdin:"


def test_nightly_summary_runs_from_its_crontab_line(ax: Mount, tmp_path: Path) -> None:
    script = (EXAMPLES / "nightly-summary.sh").read_text()
    cron = re.search(r"^#   (\S+ \S+ \S+ \S+ \S+)\s+(AXFS_ROOT=.*)$", script, re.M)
    assert cron is not None, "no crontab line in the script's header"
    log = tmp_path / "syslog"
    log.write_text("".join(f"Nov 23 03:{i:02d} host sshd[1]: line {i}\n" for i in range(300)))
    command = (cron.group(2).replace("AXFS_ROOT=/ax", f"AXFS_ROOT={ax.path}")
               .replace("/opt/axfs/tools/examples/nightly-summary.sh", str(EXAMPLES / "nightly-summary.sh"))
               .replace("/var/log/syslog", str(log)).replace("/var/tmp", str(tmp_path)))
    # As cron runs it: /bin/sh, a bare PATH, MAX_TOKENS kept small for the test.
    env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "HOME": str(tmp_path), "MAX_TOKENS": "16"}
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""  # cron mails any output: none when all is well
    summary = tmp_path / f"summary-{time.strftime('%F')}.txt"
    (task,) = tasks_named(ax, "summary-")
    assert summary.read_text() == ax.read(f"tasks/{task}/stream")
    prompt = ax.read(f"tasks/{task}/prompt")
    assert "line 299\n" in prompt and "line 250\n" in prompt and "line 249\n" not in prompt  # the last 50
    assert prompt.rstrip().endswith("anything that needs attention:")
    assert ax.status(task)["generated_tokens"] == "16"
    missing = subprocess.run(["/bin/sh", "-c", command.replace(str(log), str(tmp_path / "nolog"))],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_fanout_asks_each_model_and_compares(ax: Mount) -> None:
    done = run(ax, "fanout.sh", "Why is the sky blue?", "tiny", "tiny", env={"MAX_TOKENS": "8"})
    assert done.returncode == 0, done.stderr
    heads = [line for line in done.stdout.splitlines() if line.startswith("== ")]
    assert len(heads) == 2
    assert all(h.startswith("== tiny: done (length), 8 tokens, ") and "tok/s" in h for h in heads)
    tasks = tasks_named(ax, "fanout-")[-2:]
    for task in tasks:
        assert ax.read(f"tasks/{task}/config").startswith("model tiny\nmax_tokens 8\ntemperature 0\n")
        assert ax.read(f"tasks/{task}/stream") in done.stdout
    every = run(ax, "fanout.sh", "Hello", env={"MAX_TOKENS": "2"})  # no models named: all of models/
    assert every.returncode == 0
    assert [line.split(":")[0] for line in every.stdout.splitlines() if line.startswith("== ")] == [
        f"== {m}" for m in sorted(os.listdir(ax.path / "models"))]


def test_chat_forks_each_turn_from_the_last(ax: Mount) -> None:
    probe = f"p{time.monotonic_ns()}"
    ax.sh(f"mkdir tasks/{probe}")
    if not (ax.path / f"tasks/{probe}/fork").exists():
        pytest.skip("this tree has no tasks/ID/fork yet")
    done = run(ax, "chat.sh", stdin="Hello there\nHow are you?\n", env={"MAX_TOKENS": "6"})
    assert done.returncode == 0, done.stderr
    (first,) = tasks_named(ax, "chat-")
    second = os.readlink(ax.path / "tasks/latest")
    assert os.readlink(ax.path / f"tasks/{second}/parent").rstrip("/").endswith(first)
    assert ax.read(f"tasks/{first}/prompt").endswith("User: Hello there\nAssistant:")
    assert ax.read(f"tasks/{second}/prompt") == "\nUser: How are you?\nAssistant:"
    assert done.stdout == ax.read(f"tasks/{first}/stream") + "\n" + ax.read(f"tasks/{second}/stream") + "\n"
    assert ax.status(second)["state"] == "done"


def test_watch_errors_alerts_on_a_refused_write(ax: Mount, tmp_path: Path) -> None:
    alerts = tmp_path / "alerts"
    watcher = subprocess.Popen([str(EXAMPLES / "watch-errors.sh")], start_new_session=True,
                               env={**os.environ, "AXFS_ROOT": str(ax.path),
                                    "ALERT": f"cat >> {shlex.quote(str(alerts))}"})
    try:
        time.sleep(1.5)  # tail -F reads the end of the trace before it follows
        task = f"w{time.monotonic_ns()}"
        ax.sh(f"mkdir tasks/{task}")
        assert ax.sh(f"echo 'colour red' > tasks/{task}/config", check=False).returncode != 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (alerts.exists() and alerts.read_text()):
            time.sleep(0.1)
        lines = alerts.read_text().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("axfs alert: ") and f" {task} 0 reject " in lines[0]
        assert "unknown key 'colour'" in lines[0]
        assert watcher.poll() is None  # it goes on watching
    finally:
        os.killpg(watcher.pid, signal.SIGTERM)
        watcher.wait(timeout=10)
