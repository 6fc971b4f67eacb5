"""mount/: the systemd units and the fstab helper, as far as a machine without systemd running allows.

The units are checked by ``systemd-analyze verify``; their ExecStart is run the way
systemd runs it (start, a crash and a restart, a stop by SIGTERM); the helper is run
as mount(8) runs it, and through ``mount -t fuse.axfs`` in a private mount namespace.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mount.cli import pid_file, process_alive
from tests.conftest import AXFS, REPO, TINY_CTX, umount

pytestmark = pytest.mark.mount

UNITS = REPO / "mount"
HELPER = REPO / "mount" / "mount.fuse.axfs"
INSTALLED = "/usr/local/bin/axfs"  # where the units expect axfs (docs/tree.md, "systemd": .venv/bin/axfs)


def unit_values(unit: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith(f"{key}=")]


def mounted_at(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit,name", [("axfs.service", "axfs.service"), ("axfs@.service", "axfs@ax.service"),
                                       ("axfs@.service", "axfs@srv-llm.service")])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, unit: str, name: str) -> None:
    axfs = Path(sys.executable).parent / "axfs"
    if not axfs.exists():
        pytest.skip("axfs is not installed in this environment")
    text = (UNITS / unit).read_text()
    assert f"ExecStart={INSTALLED} mount " in text
    (tmp_path / unit).write_text(text.replace(INSTALLED, str(axfs)))
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "axfs" not in done.stderr, done.stderr  # no warning about our unit (unknown keys only warn)


@pytest.mark.skipif(os.geteuid() != 0, reason="the units run as root")
def test_the_units_pid_file_is_the_one_the_daemon_writes() -> None:
    (pid,) = unit_values(UNITS / "axfs.service", "PIDFile")
    assert pid.replace("%%", "%") == str(pid_file(Path("/ax")))


def test_the_template_unit_starts_restarts_and_stops_as_systemd_runs_it(tiny_model: Path, tmp_path: Path
                                                                        ) -> None:
    (exec_start,) = unit_values(UNITS / "axfs@.service", "ExecStart")
    mnt = tmp_path / "srv" / "llm"
    opts = ["--model", str(tiny_model), "--state-dir", str(tmp_path / "state"), "--ctx", str(TINY_CTX),
            "--slots", "4"]
    words = {INSTALLED: AXFS, "$AXFS_OPTS": opts}
    argv = [w for word in shlex.split(exec_start) for w in words.get(word, [word.replace("%f", str(mnt))])]
    assert argv[len(AXFS):len(AXFS) + 2] == ["mount", str(mnt)]

    def start() -> int:
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        # Type=forking: when ExecStart returns the tree answers and one daemon is left.
        assert (mnt / "tasks/new").exists()
        pid = int(pid_file(mnt).read_text())
        assert process_alive(pid)
        return pid

    try:
        pid = start()
        os.kill(pid, signal.SIGKILL)  # a crash: Restart=on-failure runs ExecStart again
        wait_until(lambda: not process_alive(pid))
        with pytest.raises(OSError) as stale:
            os.stat(mnt / "tasks")
        assert stale.value.errno == errno.ENOTCONN
        pid = start()  # the restart clears the stale mount
        assert "tiny" in os.listdir(mnt / "models")
        os.kill(pid, signal.SIGTERM)  # systemctl stop
        wait_until(lambda: not process_alive(pid), timeout=60)  # TimeoutStopSec
        assert not mounted_at(mnt)
    finally:
        if mounted_at(mnt):
            umount(mnt)


def test_the_fstab_helper_mounts_with_the_options_mount_passes(tiny_model: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    done = subprocess.run([str(HELPER), str(tiny_model), str(mnt), "-o",
                           f"rw,nofail,_netdev,x-systemd.automount,ctx=4096,slots=4,state_dir={tmp_path}/state,"
                           "policy=fifo"], capture_output=True, text=True, timeout=120)
    try:
        assert done.returncode == 0, done.stderr
        memory = (mnt / "memory").read_text()
        assert "KVCapacity:" in memory and " 4096 cells" in memory.split("\n", 1)[0]
        assert " of 4\n" in memory
        assert "\npolicy fifo\n" in (mnt / "sched").read_text()
        assert (tmp_path / "state/axfs.log").exists()
    finally:
        umount(mnt)
    assert not mounted_at(mnt)
    bad = subprocess.run([str(HELPER), str(tiny_model), str(mnt), "-o", "ctx=4096,colour=red"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "unknown option 'colour=red'" in bad.stderr
    fake = subprocess.run([str(HELPER), str(tiny_model), str(mnt), "-f", "-o", "ctx=4096"],
                          capture_output=True, text=True, timeout=30)
    assert fake.returncode == 0 and not mounted_at(mnt)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_mount_t_fuse_axfs_finds_the_helper(tiny_model: Path, tmp_path: Path) -> None:
    # mount(8) looks for /sbin/mount.fuse.axfs: in a mount namespace of its own, a folder
    # holding only the helper stands in for /sbin, so nothing is installed on the machine.
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / "mount.fuse.axfs").symlink_to(HELPER)
    mnt = tmp_path / "mnt"
    script = f"""
        set -e
        mount --bind {sbin} /sbin
        trap 'umount {mnt}' EXIT
        mount -t fuse.axfs {tiny_model} {mnt} -o ctx=4096,slots=2,state_dir={tmp_path}/state
        grep " {mnt} fuse.axfs " /proc/mounts
        cat {mnt}/models/tiny/info
    """
    try:
        done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0 and "unshare failed" in done.stderr:
            pytest.skip(f"no mount namespaces here: {done.stderr.strip()}")
        assert done.returncode == 0, done.stderr
        assert f" {mnt} fuse.axfs " in done.stdout and "name tiny\n" in done.stdout
    finally:
        try:
            pid = int(pid_file(mnt).read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and process_alive(pid):  # the mount lives in the namespace: its daemon unmounts it
            os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid or not process_alive(pid))
