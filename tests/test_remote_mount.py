"""A remote model through the mounted tree: tasks stream from real llama-server processes
on loopback, spread over two endpoints, and a task moves when its endpoint dies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import mounted
from tests.servers import binary_or_skip, llama_server

pytestmark = [pytest.mark.mount, pytest.mark.server]


def test_remote_model_streams_spreads_and_fails_over(tiny_model: Path, tmp_path: Path) -> None:
    binary = binary_or_skip()
    with llama_server(tiny_model, parallel=2, ctx=8192, binary=binary) as a, \
            llama_server(tiny_model, parallel=2, ctx=8192, binary=binary) as b, \
            mounted(tmp_path, tiny_model, "--remote", f"far={a.url},{b.url}") as ax:
        info = ax.read("models/far/info")
        assert "kind remote" in info and a.url in info and b.url in info
        # Four tasks at once: both endpoints serve, each task streams to its end.
        for i in range(4):
            ax.sh(f"mkdir tasks/r{i} && printf 'model far\\nmax_tokens 16\\ntemperature 0\\n'"
                  f" > tasks/r{i}/config && echo 'one two three' > tasks/r{i}/prompt")
        for i in range(4):
            text = ax.sh(f"cat tasks/r{i}/stream", timeout=60).stdout
            status = ax.status(f"r{i}")
            assert status["state"] == "done", status
            assert text and int(status["generated_tokens"]) > 0
        served = [line for line in ax.read("models/far/info").splitlines()
                  if line.startswith("endpoint ")]
        assert len(served) == 2 and all("served=0" not in line for line in served), served
        # A long task; its endpoint dies in the middle; it finishes on the other one.
        ax.sh("mkdir tasks/long && printf 'model far\\nmax_tokens 4000\\ntemperature 0\\n"
              "stop\\n' > tasks/long/config && echo 'one two three' > tasks/long/prompt")
        deadline = time.monotonic() + 30
        while int(ax.status("long")["generated_tokens"]) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        serving = a if f"{a.url} up slots=2 inflight=1" in ax.read("models/far/info") else b
        serving.kill()
        ax.sh("cat tasks/long/stream > /dev/null", timeout=60)
        status = ax.status("long")
        assert status["state"] == "done" and status["finish_reason"] in ("length", "stop"), status
        trace = ax.read("trace")
        assert "endpoint_down model=far" in trace and "move model=far" in trace
        assert "moves=1" in trace
        # Its timeline: where it was sent, where it moved, and the server's counts.
        alive = b if serving is a else a
        timeline = ax.read("replay/long/timeline")
        assert f"admit remote=yes endpoint={serving.url} resumed=no" in timeline, timeline
        assert f"move from={serving.url} to={alive.url} tokens=" in timeline, timeline
        assert f"endpoint={alive.url} moves=1 server_prompt_tokens=" in timeline, timeline
        assert "down" in ax.read("models/far/info")


def test_remote_model_by_mkdir_and_ctl(tiny_model: Path, tmp_path: Path) -> None:
    binary = binary_or_skip()
    with llama_server(tiny_model, parallel=1, ctx=4096, binary=binary) as server, \
            mounted(tmp_path, tiny_model) as ax:
        ax.sh(f"mkdir models/srv && echo 'endpoints {server.url}' > models/srv/ctl")
        done = ax.sh("echo 'endpoints ftp://nowhere' > models/srv/ctl", check=False)
        assert done.returncode != 0 and "Invalid argument" in done.stderr
        ax.sh("mkdir tasks/t && printf 'model srv\\nmax_tokens 8\\n' > tasks/t/config"
              " && echo hello > tasks/t/prompt && cat tasks/t/stream > /dev/null", timeout=60)
        assert ax.status("t")["state"] == "done"
        # Nothing answers: the task fails with the reason rather than hanging forever.
        ax.sh("mkdir models/dead && echo 'endpoints http://127.0.0.1:9' > models/dead/ctl")
        assert (tmp_path / "state/models.json").read_text().count("127.0.0.1:9") == 1
