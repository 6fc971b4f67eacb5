"""Boxes in a chain: a hub mount whose remote model is another mount's ``--http``; the
hub's tasks run on the node as tasks of the uid the hub's key maps to there."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import TINY_CTX, mounted
from tests.test_http import free_port
from tests.test_http_keys import KEY_A, write_keys
from tests.tinymodel import write_tiny_gguf

pytestmark = [pytest.mark.mount, pytest.mark.model]


def node_tasks(ax_path: Path) -> set[str]:
    return {t for t in (p.name for p in (ax_path / "tasks").iterdir()) if t.startswith("http-")}


def test_a_mount_serves_another_as_its_remote_engine(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "node").mkdir()
    (tmp_path / "hub").mkdir()
    keys = write_keys(tmp_path / "node" / "keys")
    key = tmp_path / "hub" / "key"
    key.write_text(KEY_A + "\n")
    key.chmod(0o600)
    chat_model = write_tiny_gguf(tmp_path / "chat.gguf", n_ctx_train=TINY_CTX, chat_template="chatml")
    port = free_port()
    with mounted(tmp_path / "node", chat_model, "--ctx", "16384", "--slots", "6", "--http", str(port),
                 "--http-keys", str(keys)) as node, \
            mounted(tmp_path / "hub", tiny_model, "--remote",
                    f"node=http://127.0.0.1:{port},key={key}") as hub:
        hub.sh("mkdir tasks/t && printf 'model node\\nmax_tokens 12\\ntemperature 0\\n' > tasks/t/config"
               " && echo 'one two three' > tasks/t/prompt")
        text = hub.sh("cat tasks/t/stream", timeout=60).stdout
        assert hub.status("t")["state"] == "done" and text
        # On the node, the hub's task is a task of uid 1001 (the hub's key), the same text.
        [ran] = node_tasks(node.path)
        assert node.status(ran)["uid"] == "1001" and node.status(ran)["state"] == "done"
        assert node.read(f"tasks/{ran}/stream") == text
        assert node.read(f"tasks/{ran}/prompt") == "one two three"
        assert hub.status("t")["generated_tokens"] == node.status(ran)["generated_tokens"] == "12"
        # The node said how many requests it runs at once (/props): the hub sends as many.
        info = hub.read("models/node/info")
        assert f"endpoint http://127.0.0.1:{port} up slots=6 " in info, info
        # Killed at the hub: the hub leaves the request, and the node ends its task.
        hub.sh("mkdir tasks/long && printf 'model node\\nmax_tokens 100000\\n' > tasks/long/config"
               " && echo 'go on' > tasks/long/prompt")
        deadline = time.monotonic() + 30
        while int(hub.status("long")["generated_tokens"]) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [far] = node_tasks(node.path) - {ran}
        hub.sh("echo kill > tasks/long/ctl")
        while node.status(far)["state"] != "killed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert node.read(f"tasks/{far}/error") == "the HTTP client closed the connection\n"
        # A chat through the chain: as turns, which the node puts in its model's template.
        hub.sh("mkdir tasks/c && printf 'model node\\nchat on\\nmax_tokens 4\\n' > tasks/c/config"
               " && echo hi > tasks/c/prompt", timeout=60)
        text = hub.sh("cat tasks/c/stream", timeout=60).stdout
        [chat] = node_tasks(node.path) - {ran, far}
        assert hub.status("c")["state"] == "done" and node.status(chat)["state"] == "done"
        assert node.read(f"tasks/{chat}/stream") == text
        assert "chat on" in node.read(f"tasks/{chat}/config")
        assert int(node.status(chat)["prompt_tokens"]) > 3  # the template's tokens around "hi"
