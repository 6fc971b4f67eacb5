"""The remote queue through the mounted tree, against real llama-server processes on
loopback (issue 14): a second user is not starved by a 64-task burst and a waiting task's
priority counts; kill and rm free the server's slot at once (its own /slots says so); a
SIGKILLed daemon, mounted again, finishes a remote task from the text it had; chat goes
as /v1/chat/completions and a fork is the next turn; quotas count remote tokens."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from axfs.journal import Journal
from tests.conftest import Mount, mounted, umount
from tests.servers import binary_or_skip, llama_server
from tests.test_multiuser import as_user
from tests.test_persist_mount import up
from tests.test_remote_driver import slots_busy
from tests.tinymodel import CHATML_TEMPLATE, write_tiny_gguf

pytestmark = [pytest.mark.mount, pytest.mark.server]
B = 1000  # a second user


def wait(condition: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def submit(ax: Mount, name: str, model: str, max_tokens: int, prompt: str = "one two three",
           extra: str = "") -> None:
    ax.sh(f"mkdir tasks/{name} && printf 'model {model}\\nmax_tokens {max_tokens}\\n"
          f"temperature 0\\n{extra}' > tasks/{name}/config && echo '{prompt}' > tasks/{name}/prompt")


def head(stream: Path, n: int) -> bytes:
    """The first ``n`` bytes of a task's stream (a read of it waits for more)."""
    data = b""
    with open(stream, "rb", buffering=0) as f:
        while len(data) < n and (piece := f.read(n - len(data))):
            data += piece
    return data


def generated(ax: Mount, name: str) -> int:
    return int(ax.status(name)["generated_tokens"])


def section(sched: str, model: str) -> str:
    """The lines of ``model``'s section of sched."""
    return next(s for s in sched.split("\n\n") if s.startswith(f"model {model}\n"))


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model like the tiny one, slow enough (a few hundred tokens a second on one
    thread) that a task is still streaming while the test looks at it."""
    return write_tiny_gguf(tmp_path_factory.mktemp("slow") / "slow.gguf", n_ctx_train=16384,
                           n_layer=4, n_embd=384)


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A base directory a second user can reach (pytest's tmp_path is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="axfs-rq-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to act as a second user")
def test_a_second_user_is_not_starved_by_a_burst_and_priority_counts(
        tiny_model: Path, slow_model: Path, shared_base: Path) -> None:
    with llama_server(slow_model, parallel=2, ctx=8192, binary=binary_or_skip()) as server, \
            mounted(shared_base, tiny_model, "--allow-other", "--remote", f"far={server.url}") as ax:
        ax.sh("for i in $(seq 0 63); do mkdir tasks/a$i && printf 'model far\\nmax_tokens 3000\\n"
              "temperature 0\\n' > tasks/a$i/config && echo 'one two three' > tasks/a$i/prompt; done",
              timeout=120)
        wait(lambda: generated(ax, "a0") >= 8 and generated(ax, "a1") >= 8, what="a0, a1")
        ax.sh("echo priority 1000 > tasks/a63/ctl")  # it waits: it goes before a2..a62
        far = section(ax.read("sched"), "far")
        assert f"endpoint {server.url} slots=2 slots_from=server running=2" in far, far
        assert "\nrunning 2\nwaiting 62\nslots 2\n" in far and "\nuser.0.waiting 62\n" in far
        # User B's short task: sent at once, in a slot one of A's tasks gives up.
        start = time.monotonic()
        as_user(ax, B, "mkdir tasks/b && printf 'model far\\nmax_tokens 8\\ntemperature 0\\n' > "
                "tasks/b/config && echo hello > tasks/b/prompt && cat tasks/b/stream > /dev/null",
                check=True)
        took = time.monotonic() - start
        assert ax.status("b")["state"] == "done" and took < 10, took
        assert sum(ax.status(f"a{i}")["state"] == "done" for i in range(64)) <= 2
        trace = ax.read("trace")
        stopped = re.search(r" (a\d+) 0 preempt model=far remote=yes endpoint=\S+ tokens=(\d+)", trace)
        assert stopped and int(stopped.group(2)) >= 4, trace[-3000:]
        assert f"preempt remote=yes endpoint={server.url}" in ax.read(f"replay/{stopped.group(1)}/timeline")
        # B's slot goes back to A: to a63 first, for its priority.
        wait(lambda: ax.status("a63")["state"] == "running", what="a63 to run")
        assert ax.status("a2")["state"] == "queued"
        far = section(ax.read("sched"), "far")
        assert "preemptions 1\n" in far, far
        b_tokens = re.search(rf"\nuser\.{B}\.tokens (\d+)\n", far)  # generated, and the prompt read
        assert b_tokens and int(b_tokens.group(1)) >= 8, far
        ax.sh("for i in $(seq 0 63); do echo kill > tasks/a$i/ctl; done")
        wait(lambda: slots_busy(server.url) == 0, timeout=5, what="the server's slots to free")


def test_kill_and_rm_free_the_servers_slot_at_once(tiny_model: Path, slow_model: Path,
                                                   tmp_path: Path) -> None:
    with llama_server(slow_model, parallel=1, ctx=8192, binary=binary_or_skip()) as server, \
            mounted(tmp_path, tiny_model, "--remote", f"far={server.url}") as ax:
        for name, how in (("k", "echo kill > tasks/k/ctl"), ("r", "rm -r tasks/r")):
            submit(ax, name, "far", 6000)
            wait(lambda: generated(ax, name) >= 10, what=f"{name} to stream")  # noqa: B023
            assert slots_busy(server.url) == 1
            ax.sh(how)
            start = time.monotonic()
            wait(lambda: slots_busy(server.url) == 0, timeout=2, what="the slot to free")
            assert time.monotonic() - start < 1
        assert ax.status("k")["state"] == "killed" and not (ax.path / "tasks/r").exists()


def test_a_sigkilled_daemon_finishes_a_remote_task_from_its_text(
        tiny_model: Path, slow_model: Path, tmp_path: Path) -> None:
    with llama_server(slow_model, parallel=1, ctx=8192, binary=binary_or_skip()) as server:
        ax, pid = up(tmp_path, tiny_model, "--remote", f"far={server.url}")
        try:
            submit(ax, "long", "far", 2000)
            before = head(ax.path / "tasks/long/stream", 300)
            wait(lambda: generated(ax, "long") >= 100, what="100 tokens")
            time.sleep(1.3)  # a journal flush with all of it
            os.kill(pid, signal.SIGKILL)
            wait(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="the daemon to die")
        except BaseException:
            umount(ax.path)
            raise
        kept = Journal(tmp_path / "state").load().tasks["long"]
        assert kept.text.startswith(before) and len(kept.tokens) >= 100
        ax, _ = up(tmp_path, tiny_model, "--remote", f"far={server.url}")  # clears the dead mount
        try:
            ax.sh("cat tasks/long/stream > /dev/null", timeout=120)
            after = (ax.path / "tasks/long/stream").read_bytes()
            status = ax.status("long")
            assert status["state"] == "done" and status["finish_reason"] == "length", status
            assert int(status["generated_tokens"]) == 2000 and after.startswith(kept.text)
            trace = ax.read("trace")
            assert f" long 0 resume tokens={len(kept.tokens)}" in trace
            assert f"admit model=far remote=yes endpoint={server.url} resumed=yes" in trace
            # The server read the prompt and the text kept: more than the prompt alone.
            done = re.search(r" long 0 done .*server_prompt_tokens=(\d+)", trace)
            assert done and int(done.group(1)) > 50, trace[-2000:]
        finally:
            umount(ax.path)


def post(url: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url + path, json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer: dict[str, Any] = json.load(r)
        return answer


def test_chat_goes_to_chat_completions_and_a_fork_is_the_next_turn(tmp_path: Path,
                                                                    tiny_model: Path) -> None:
    chatty = write_tiny_gguf(tmp_path / "chat.gguf", n_ctx_train=8192, chat_template=CHATML_TEMPLATE)
    with llama_server(chatty, parallel=1, ctx=4096, binary=binary_or_skip()) as server, \
            mounted(tmp_path, tiny_model, "--remote", f"chatty={server.url}") as ax:
        submit(ax, "c", "chatty", 12, prompt="hello", extra="chat on\\n")
        ax.sh("cat tasks/c/stream > /dev/null && echo 'and then?' > tasks/c/fork")
        fork = os.readlink(ax.path / "tasks/latest")
        ax.sh(f"cat tasks/{fork}/stream > /dev/null")
        turns = [{"role": "user", "content": "hello"}]

        def direct(messages: list[dict[str, str]]) -> str:
            answer = post(server.url, "/v1/chat/completions",
                          {"messages": messages, "max_tokens": 12, "temperature": 0})
            return str(answer["choices"][0]["message"]["content"])

        first = ax.read("tasks/c/stream")
        assert first == direct(turns)
        turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
        assert ax.read(f"tasks/{fork}/stream") == direct(turns)
        # The server read the three turns in its template: its count says so.
        prompt = post(server.url, "/apply-template", {"messages": turns})["prompt"]
        n = len(post(server.url, "/tokenize", {"content": prompt, "add_special": True})["tokens"])
        assert f"server_prompt_tokens={n} " in ax.read(f"replay/{fork}/timeline")


def test_quotas_count_remote_tokens(tiny_model: Path, tmp_path: Path) -> None:
    with llama_server(tiny_model, parallel=1, ctx=4096, binary=binary_or_skip()) as server, \
            mounted(tmp_path, tiny_model, "--remote", f"far={server.url}", "--limit",
                    "tokens_per_hour=100", "--limit", "max_tokens=500") as ax:
        done = ax.sh("mkdir tasks/big && printf 'model far\\nmax_tokens 600\\n' > tasks/big/config",
                     check=False)
        assert done.returncode != 0 and "Argument list too long" in done.stderr
        submit(ax, "q", "far", 120)
        ax.sh("cat tasks/q/stream > /dev/null")
        assert generated(ax, "q") == 120
        used = int(re.search(r"tokens_last_hour (\d+)", ax.read("users/0")).group(1))  # type: ignore[union-attr]
        assert used >= 120
        done = ax.sh("mkdir tasks/q2 && printf 'model far\\n' > tasks/q2/config && "
                     "echo more > tasks/q2/prompt", check=False)
        assert done.returncode != 0 and "Disk quota exceeded" in done.stderr
