"""The daemon's life: mount, umount, signals, stale mounts, bad models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mount.cli import pid_file, process_alive
from tests.conftest import AXFS, REPO, mount, umount

pytestmark = pytest.mark.mount


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def daemon_pid(path: Path) -> int:
    return int(pid_file(path).read_text())


def test_mount_returns_once_ready_and_umount_stops_the_daemon(tiny_model: Path,
                                                             tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    done = mount(mnt, tiny_model, tmp_path / "state")
    assert done.returncode == 0, done.stderr
    assert "mounted at" in done.stdout
    assert (mnt / "README").read_text().startswith("axfs")  # answers at once
    pid = daemon_pid(mnt)
    umount(mnt)
    assert not is_mounted(mnt)
    assert not process_alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_unmount_cleanly(tiny_model: Path, tmp_path: Path, sig: signal.Signals) -> None:
    mnt = tmp_path / "mnt"
    assert mount(mnt, tiny_model, tmp_path / "state").returncode == 0
    pid = daemon_pid(mnt)
    os.kill(pid, sig)
    deadline = time.monotonic() + 15
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(mnt) and not process_alive(pid)
    log = (tmp_path / "state" / "axfs.log").read_text()
    assert "Traceback" not in log and "unmounted" in log


def test_a_stale_mount_is_cleared_at_the_next_mount(tiny_model: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    assert mount(mnt, tiny_model, tmp_path / "state").returncode == 0
    os.kill(daemon_pid(mnt), signal.SIGKILL)
    time.sleep(0.3)
    with pytest.raises(OSError, match="Transport endpoint is not connected"):
        os.listdir(mnt)
    done = mount(mnt, tiny_model, tmp_path / "state")
    assert done.returncode == 0, done.stderr
    assert "tasks" in os.listdir(mnt)
    umount(mnt)


def test_mounting_twice_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    assert mount(mnt, tiny_model, tmp_path / "state").returncode == 0
    try:
        done = mount(mnt, tiny_model, tmp_path / "state2")
        assert done.returncode == 1 and "already a mount point" in done.stderr
    finally:
        umount(mnt)


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda src, d: d / "missing.gguf", "does not exist"),
        (lambda src, d: (d / "x.gguf").write_text("hello") and d / "x.gguf", "not a GGUF file"),
        (lambda src, d: _truncated(src, d / "half.gguf"), "could not load"),
        (lambda src, d: d, "not a regular file"),
    ],
)
def test_a_bad_model_fails_the_mount_with_a_clear_message(tiny_model: Path, tmp_path: Path,
                                                          make: object, words: str) -> None:
    model = make(tiny_model, tmp_path)  # type: ignore[operator]
    mnt = tmp_path / "mnt"
    start = time.monotonic()
    done = mount(mnt, model, tmp_path / "state")
    assert done.returncode == 1
    assert words in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - start < 30
    assert not is_mounted(mnt)


def test_foreground_mount_serves_until_sigterm(tiny_model: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    proc = subprocess.Popen([*AXFS, "mount", str(mnt), "--foreground", "--model", str(tiny_model),
                             "--state-dir", str(tmp_path / "state")], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (mnt / "tasks" / "new").exists()
    proc.terminate()
    assert proc.wait(timeout=15) == 0
    assert not is_mounted(mnt)


def test_cli_help_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "mount.cli", "--help"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "mount" in out.stdout
