"""Nothing acknowledged is lost when the journal cannot write (issue 18, part 2): the
state directory on a full tmpfs refuses every submission it cannot record with ENOSPC,
the tree says why, and after SIGKILL and a remount every task it accepted is back."""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Mount, fill, mount, umount

pytestmark = pytest.mark.mount

PROMPT = "a prompt long enough to take room in the journal " * 20


def submit(m: Mount, i: int) -> str:
    """tasks/new as a program uses it: write, read the id back, close."""
    with open(m.path / "tasks/new", "r+b", buffering=0) as f:
        f.write(f"{i}: {PROMPT}".encode())
        return f.read().decode().strip()


def sched_journal(m: Mount) -> str:
    return next(line for line in m.read("sched").splitlines() if line.startswith("journal "))


def test_a_full_journal_refuses_what_it_cannot_record_and_loses_nothing_it_accepted(
        small_disk: Path, tiny_model: Path) -> None:
    mnt, state = small_disk.parent / "mnt", small_disk / "state"
    done = mount(mnt, tiny_model, state, "--ctx", "8192", "--slots", "4")
    assert done.returncode == 0, done.stderr
    pid = int(re.search(r"pid (\d+)", done.stdout + done.stderr).group(1))  # type: ignore[union-attr]
    m = Mount(mnt, state, tiny_model)
    accepted: dict[str, int] = {}
    refused: list[int] = []
    removed = -1
    try:
        assert sched_journal(m) == "journal ok"
        (small_disk / "room").write_bytes(b"\0" * 16384)  # room for a few submissions
        fill(small_disk)
        (small_disk / "room").unlink()
        for i in range(30):
            try:
                accepted[submit(m, i)] = i
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                refused.append(i)
        assert accepted and refused, (accepted, refused)
        assert sched_journal(m).startswith(
            "journal refusing work (journal write failed: No space left on device")
        assert "journal_error reason='journal write failed: No space left on device'" in m.read("trace")
        # The same for the other ways in: a draft's prompt, a fork, rm.
        some = next(iter(accepted))
        done = m.sh(f"mkdir tasks/d && echo '{PROMPT}' > tasks/d/prompt", check=False)
        assert done.returncode != 0 and "No space left on device" in done.stderr
        assert m.status("d")["state"] == "draft" and "No space left" in m.read("tasks/d/error")
        done = m.sh(f"echo ' {PROMPT}' > tasks/{some}/fork", check=False)
        assert done.returncode != 0 and "No space left on device" in done.stderr
        # rm's record is small: it may fit in the journal's last page. Either way what rm
        # answered holds after the crash.
        rm = m.sh(f"rm -r tasks/{some}", check=False)
        if rm.returncode == 0:
            removed = accepted.pop(some)
        else:
            assert "No space left on device" in rm.stderr and some in os.listdir(mnt / "tasks")
    finally:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        (small_disk / "filler").unlink()
        umount(mnt)  # the dead mount, should an assertion above have failed
    done = mount(mnt, tiny_model, state, "--ctx", "8192", "--slots", "4")
    assert done.returncode == 0, done.stderr
    try:
        listed = set(os.listdir(mnt / "tasks"))
        assert set(accepted) <= listed
        for task, i in accepted.items():
            assert m.read(f"tasks/{task}/prompt").startswith(f"{i}: ")
        prompts = {m.read(f"tasks/{t}/prompt").split(":")[0] for t in listed
                   if t.isdigit() and t not in accepted}
        assert not prompts & {str(i) for i in refused}  # nothing refused came back
        assert str(removed) not in prompts  # an rm that succeeded stays done
        assert sched_journal(m) == "journal ok"
        m.sh("echo again > tasks/new")
    finally:
        umount(mnt)
