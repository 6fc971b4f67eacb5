"""Shared fixtures: the tiny model, the default model, and real mounts driven by the shell."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tinymodel import write_tiny_gguf

REPO = Path(__file__).resolve().parent.parent
AXFS = [sys.executable, "-m", "mount.cli"]
TINY_CTX = 65536

# Test tiers (registered in pyproject.toml). A test's fixtures mark most of them; a test
# that mounts or starts servers itself says so with its own mark, and one with no other
# tier is a unit test.
TIERS = ("adapter", "mount", "model", "server")
MOUNT_FIXTURES = frozenset({"ax", "ax1", "shared", "tight", "mu", "pm", "fz", "gemma", "small_disk"})
MODEL_FIXTURES = frozenset({"tiny_model", "gemma_model"})
SERVER_FIXTURES = frozenset({"binary"})
HAS_FUSE = os.path.exists("/dev/fuse")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for tier, names in (("mount", MOUNT_FIXTURES), ("model", MODEL_FIXTURES),
                            ("server", SERVER_FIXTURES)):
            if fixtures & names:
                item.add_marker(tier)
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker("unit")
        if not HAS_FUSE and item.get_closest_marker("mount"):  # the one skip for /dev/fuse
            item.add_marker(pytest.mark.skip(reason="no /dev/fuse"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", n_ctx_train=TINY_CTX)


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    state = Path(os.environ.get("AXFS_TEST_STATE", "/var/lib/axfs" if os.geteuid() == 0 else
                                Path.home() / ".local/state/axfs"))
    try:
        out = subprocess.run([*AXFS, "default-model", "--state-dir", str(state)], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=300)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"the default model is not available: {e.stderr}")
    return Path(out.stdout.strip())


def sh(script: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash; the mount point is in $AX. On a timeout the whole process
    group is killed: a ``cat`` left reading the tree would keep it from unmounting."""
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and done.returncode != 0:
        raise AssertionError(f"{script!r} exited {done.returncode}: {done.stderr}")
    return done


@dataclass
class Mount:
    path: Path
    state: Path
    model: Path

    def sh(self, script: str, timeout: float = 60, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
        return sh(f"AX={self.path}; cd $AX; {script}", timeout=timeout, check=check)

    def read(self, rel: str) -> str:
        return (self.path / rel).read_text()

    def status(self, task: str) -> dict[str, str]:
        lines = self.read(f"tasks/{task}/status").splitlines()
        return dict(line.split(" ", 1) for line in lines)

    def wait_state(self, task: str, *states: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.status(task)["state"]
            if state in states:
                return state
            time.sleep(0.05)
        raise AssertionError(f"task {task} still {state}, not {states}")


def mount(path: Path, model: Path, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AXFS, "mount", str(path), "--model", str(model), "--state-dir",
                           str(state), *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def umount(path: Path) -> None:
    """Unmount; a mount still busy (a test's shell timed out with a reader in the tree)
    is retried, then detached lazily, so that no daemon outlives its test."""
    for _ in range(5):
        done = subprocess.run([*AXFS, "umount", str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=90)
        if done.returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(2)
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def mounted(base: Path, model: Path, *extra: str) -> Iterator[Mount]:
    """A tree mounted at BASE/mnt with ``model`` and the ``axfs mount`` options ``extra``."""
    done = mount(base / "mnt", model, base / "state", *extra)
    assert done.returncode == 0, done.stderr
    try:
        yield Mount(base / "mnt", base / "state", model)
    finally:
        umount(base / "mnt")


@pytest.fixture(scope="module")
def ax(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """A tree mounted with the tiny model, shared by a test module."""
    with mounted(tmp_path_factory.mktemp("ax"), tiny_model, "--ctx", str(TINY_CTX),
                 "--slots", "16") as m:
        yield m


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs, for a state directory that fills up; skipped where mount is refused."""
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    base = Path(tempfile.mkdtemp(prefix="axfs-full-"))
    disk = base / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(base)
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
