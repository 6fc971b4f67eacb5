"""Nothing lost, through real mounts: restart, SIGKILL, a torn journal, replay."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Mount, mount, umount
from tests.tinymodel import write_tiny_gguf

pytestmark = pytest.mark.mount


def up(base: Path, model: Path, *extra: str) -> tuple[Mount, int]:
    done = mount(base / "mnt", model, base / "state", "--ctx", "16384", "--slots", "16", *extra)
    assert done.returncode == 0, done.stderr
    found = re.search(r"pid (\d+)", done.stdout + done.stderr)
    assert found, done.stdout
    return Mount(base / "mnt", base / "state", model), int(found.group(1))


def submit(ax: Mount, name: str, prompt: str, max_tokens: int, **config: object) -> None:
    lines = "".join(f"{k} {v}\\n" for k, v in {"max_tokens": max_tokens, "temperature": 0,
                                               **config}.items())
    ax.sh(f"mkdir tasks/{name} && printf '{lines}' > tasks/{name}/config && "
          f"echo {prompt!r} > tasks/{name}/prompt")


def texts(ax: Mount, names: list[str]) -> dict[str, str]:
    ax.sh(" ".join(f"cat tasks/{n}/stream > /dev/null;" for n in names), timeout=300)
    return {n: ax.read(f"tasks/{n}/stream") for n in names}


ALONE = ("--policy", "fifo", "--slots", "1")
PROMPTS = [f"story {i}: once upon a time there was a" for i in range(16)]


def test_restart_keeps_every_task_and_runs_on_the_unfinished(tiny_model: Path, tmp_path: Path) -> None:
    ax, _ = up(tmp_path, tiny_model)
    try:
        submit(ax, "short", "hello there", 20)
        texts(ax, ["short"])
        ax.sh("echo 'plain submit' > tasks/new")
        submit(ax, "long", "a long one", 20000)
        ax.sh("head -c 100 tasks/long/stream > /dev/null")
        before = {n: ax.read(f"tasks/{n}/stream") for n in ("short", "1")}
        status = ax.status("short")
    finally:
        umount(ax.path)
    ax, _ = up(tmp_path, tiny_model)
    try:
        assert {"short", "1", "long", "latest", "new"} <= set(os.listdir(ax.path / "tasks"))
        for name, text in before.items():
            ax.sh(f"cat tasks/{name}/stream > /dev/null")
            assert ax.read(f"tasks/{name}/stream") == text
        again = ax.status("short")
        for key in ("state", "finish_reason", "prompt_tokens", "generated_tokens", "submitted",
                    "first_token_ms", "elapsed_ms"):
            assert again[key] == status[key], key
        assert ax.status("long")["state"] in ("queued", "running")
        assert int(ax.status("long")["generated_tokens"]) > 0
        assert os.readlink(ax.path / "tasks/latest") == "long"
        ax.sh("echo kill > tasks/long/ctl")
        assert " journal_load tasks=3 " in ax.read("trace")
        assert ax.read("replay/short/timeline").count("decode") == 1
    finally:
        umount(ax.path)


def test_sigkill_loses_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """16 tasks, one at a time (fifo, one slot), so that each is decoded alone both ways:
    decoded in a batch, a sequence's last bits can differ from decoded alone (docs/design.md, Replay)."""
    names = [f"s{i}" for i in range(16)]
    ref, _ = up(tmp_path / "ref", tiny_model, *ALONE)
    try:
        for name, prompt in zip(names, PROMPTS, strict=True):
            submit(ref, name, prompt, 600)
        expected = texts(ref, names)
    finally:
        umount(ref.path)
    ax, pid = up(tmp_path / "crash", tiny_model, *ALONE)
    for name, prompt in zip(names, PROMPTS, strict=True):
        submit(ax, name, prompt, 600)
    ax.sh("head -c 300 tasks/s5/stream > /dev/null")
    time.sleep(1.2)  # a journal flush with tokens of every task
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    ax, _ = up(tmp_path / "crash", tiny_model, *ALONE)  # clears the dead mount
    try:
        assert " resume " in ax.read("trace")
        got = texts(ax, names)
        for name in names:
            assert ax.status(name)["state"] == "done"
        assert got == expected
    finally:
        umount(ax.path)


def test_a_torn_journal_loads_what_is_before_the_tear(tiny_model: Path, tmp_path: Path) -> None:
    ax, _ = up(tmp_path, tiny_model)
    try:
        submit(ax, "kept", "hello", 10)
        text = texts(ax, ["kept"])["kept"]
    finally:
        umount(ax.path)
    with open(tmp_path / "state" / "journal.msgpack", "ab") as f:
        f.write(b"\x87\xa1t\xa4task\xa2id\xa4torn\xa6prompt\xda\x01\x00xx")  # cut mid-record
    ax, _ = up(tmp_path, tiny_model)
    try:
        assert ax.read("tasks/kept/stream") == text
        assert " journal_torn offset=" in ax.read("trace")
    finally:
        umount(ax.path)


def replay(ax: Mount, name: str) -> str:
    ax.sh(f"echo run > replay/{name}/ctl")
    deadline = time.monotonic() + 60
    while (result := ax.read(f"replay/{name}/result")) in ("", "running\n"):
        assert time.monotonic() < deadline, "the replay did not end"
        time.sleep(0.05)
    return result


def test_replays_match_and_a_changed_model_is_a_mismatch(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    shutil.copy(tiny_model, model)
    ax, _ = up(tmp_path, model)
    try:
        # A replay runs alone: so does the seeded task here. Even so its logits are not
        # bit-identical to the replay's: they depend on where the sequence sits in the KV
        # cache (the tiny model's by up to 0.04 when another sequence's cells come first).
        # With min_p's default 0.05 that moved the seeded draw of "the first word" at token
        # 135 (195 when the two ran together); this prompt's draw happens not to move. The
        # test is deterministic; that a seeded replay matches is luck (docs/design.md, Replay).
        submit(ax, "greedy", "the first word", 200)
        texts(ax, ["greedy"])
        submit(ax, "seeded", "another word", 200, temperature=0.9, seed=42)
        texts(ax, ["seeded"])
        assert replay(ax, "greedy") == "match 200 tokens\n"
        assert replay(ax, "seeded") == "match 200 tokens\n"
        timeline = ax.read("replay/greedy/timeline")
        assert "submit" in timeline and "first_token" in timeline and "done reason=length" in timeline
        done = ax.sh("echo rerun > replay/greedy/ctl", check=False)
        assert done.returncode != 0 and "Invalid argument" in done.stderr
    finally:
        umount(ax.path)
    write_tiny_gguf(model, n_ctx_train=65536, seed=7)  # another model in the same file
    ax, _ = up(tmp_path, model)
    try:
        result = replay(ax, "greedy")
        assert result.startswith("mismatch model: task greedy ran on a model file with sha256 ")
    finally:
        umount(ax.path)
