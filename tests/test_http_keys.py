"""API keys on a real mount: each key's requests are its uid's tasks, with that uid's
share and limits; a request without a known key is refused; the keys show nowhere."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Mount, mount, mounted
from tests.test_http import client, free_port

pytestmark = [pytest.mark.mount, pytest.mark.model]

KEY_A = "key-of-uid-1001-aaaaaaaaaaaaaaaa"
KEY_B = "key-of-uid-1002-bbbbbbbbbbbbbbbb"
LONG = {"prompt": "go on", "max_tokens": 100000, "stream": True}


def write_keys(path: Path, mode: int = 0o600) -> Path:
    path.write_text(f"# test keys\n{KEY_A} 1001\n{KEY_B} 1002\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def keyed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, str]]:
    base = tmp_path_factory.mktemp("keyed")
    keys = write_keys(base / "keys")
    port = free_port()
    with mounted(base, tiny_model, "--ctx", "16384", "--slots", "2", "--http", str(port),
                 "--http-keys", str(keys), "--limit", "1002:tasks=2") as m:
        yield m, f"http://127.0.0.1:{port}"


def sched_users(ax: Mount) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in ax.read("sched").splitlines() if line.startswith("user."))


def test_no_key_or_a_wrong_key_gets_401(keyed: tuple[Mount, str]) -> None:
    ax, url = keyed
    with pytest.raises(openai.AuthenticationError, match="not one this server knows"):
        client(url, "wrong-key-wrong-key-wrong").completions.create(model="tiny", prompt="hi")
    answer = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer KEY" in answer.json()["error"]["message"]
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    whole = client(url, KEY_A).completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert ax.status(whole.id)["uid"] == "1001"


def test_two_keys_share_the_model_fairly_and_limits_apply(keyed: tuple[Mount, str]) -> None:
    """Two slots; uid 1001 asks for three long answers, then uid 1002 for one: under the
    fair policy each uid has half the model (one slot each), not first come first served."""
    ax, url = keyed
    with httpx.Client(timeout=60) as http, contextlib.ExitStack() as streams:
        def ask(key: str) -> str:
            answer = streams.enter_context(http.stream(
                "POST", url + "/v1/completions", json=LONG, headers={"Authorization": f"Bearer {key}"}))
            assert answer.status_code == 200
            return answer.headers["x-axfs-task"]

        a = [ask(KEY_A) for _ in range(3)]
        deadline = time.monotonic() + 30
        while sched_users(ax).get("user.1001.running") != "2":
            assert time.monotonic() < deadline, ax.read("sched")
            time.sleep(0.05)
        b = ask(KEY_B)
        while (users := sched_users(ax)).get("user.1002.running") != "1" \
                or users.get("user.1001.running") != "1":
            assert time.monotonic() < deadline, ax.read("sched")
            time.sleep(0.05)
        assert users["user.1001.share"] == users["user.1002.share"] == "0.500"
        assert ax.status(b)["uid"] == "1002" and {ax.status(t)["uid"] for t in a} == {"1001"}
        # uid 1002 may have two tasks at once: a third is refused (429) with the reason.
        ask(KEY_B)
        with pytest.raises(openai.RateLimitError, match=r"uid 1002 has 2 tasks queued or running "
                           r"\(limit tasks 2\)"):
            client(url, KEY_B).completions.create(model="tiny", prompt="one more")
    # The keys are nowhere: not in the tree, the trace, the journal or the log.
    seen = [ax.read("trace"), ax.read("users/1001"), ax.read("users/1002"), ax.read("sched"),
            *(p.read_text(errors="replace") for p in ax.state.iterdir() if p.is_file())]
    for key in (KEY_A, KEY_B):
        assert not any(key in text for text in seen)


def test_a_keys_file_others_can_read_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", 0o644)
    done = mount(tmp_path / "mnt", tiny_model, tmp_path / "state", "--http", str(free_port()),
                 "--http-keys", str(keys))
    assert done.returncode != 0
    assert f"--http-keys {keys}: keys file {keys} is mode 0644" in done.stderr
    assert KEY_A not in done.stderr
    assert not os.path.ismount(tmp_path / "mnt")
