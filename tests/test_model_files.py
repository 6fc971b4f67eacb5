"""A file a user names never blocks the tree (issue 18, part 4): a FIFO, a device, a
socket or a directory linked into models/ is refused with the reason while every other
file of the tree goes on answering; a call that hangs (a dead NFS server) is given up."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from axfs import userfiles
from axfs.errors import BadInput
from tests.conftest import Mount


def unblock(fifo: Path) -> None:
    """Open the FIFO for writing, should anything wait on it for a writer (the daemon did)."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def last_reject(ax: Mount) -> str:
    return [line for line in ax.read("trace").splitlines() if " reject " in line][-1]


@pytest.mark.mount
def test_a_fifo_linked_into_models_is_refused_while_the_tree_answers(ax: Mount,
                                                                     tmp_path: Path) -> None:
    fifo = tmp_path / "f.gguf"
    os.mkfifo(fifo)
    try:
        done = ax.sh(f"ln -s {fifo} models/ff 2> /dev/null & pid=$!; "
                     "timeout 5 cat memory > /dev/null; echo cat=$?; "
                     "timeout 5 ls tasks > /dev/null; echo ls=$?; "
                     "wait $pid; echo ln=$?", timeout=30, check=False)
    finally:
        unblock(fifo)
    assert "cat=0" in done.stdout and "ls=0" in done.stdout and "ln=1" in done.stdout, done
    assert "is a FIFO, not a regular file" in last_reject(ax)
    assert "ff" not in os.listdir(ax.path / "models")


@pytest.mark.mount
@pytest.mark.parametrize(("target", "kind"), [("/dev/zero", "a character device"),
                                              ("/dev/null", "a character device"),
                                              ("{dir}", "a directory"),
                                              ("{sock}", "a socket")])
def test_anything_but_a_regular_file_is_refused_with_what_it_is(ax: Mount, tmp_path: Path,
                                                                target: str, kind: str) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.gguf"))
    try:
        path = target.format(dir=tmp_path, sock=tmp_path / "s.gguf")
        done = ax.sh(f"ln -s {path} models/odd", check=False)
    finally:
        sock.close()
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert f"is {kind}, not a regular file" in last_reject(ax)
    assert "is empty" not in last_reject(ax)


@pytest.mark.mount
def test_a_file_of_the_tree_itself_is_read_without_deadlock(ax: Mount) -> None:
    """The daemon reading its own mount: only possible off the trio thread, which
    answers that read."""
    done = ax.sh("timeout 20 ln -s $AX/README models/self", timeout=30, check=False)
    assert done.returncode == 1 and "Invalid argument" in done.stderr
    assert "not a model file" in last_reject(ax)
    assert ax.sh("timeout 5 cat memory").returncode == 0


@pytest.mark.mount
def test_a_registered_file_replaced_by_a_fifo_does_not_block_info(ax: Mount, tiny_model: Path,
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "swap.gguf"
    shutil.copy(tiny_model, path)
    ax.sh(f"ln -s {path} models/swapped")
    assert "architecture" in ax.read("models/swapped/info")
    path.unlink()
    os.mkfifo(path)
    try:
        done = ax.sh("timeout 5 cat models/swapped/info; timeout 5 ls -l models/swapped",
                     timeout=30, check=False)
        assert done.returncode == 0, done
        assert "file_error" in done.stdout and "is a FIFO" in done.stdout
        done = ax.sh("echo load > models/swapped/ctl; sleep 0.5; timeout 5 cat models/swapped/info",
                     timeout=30, check=False)
        assert "load_error" in done.stdout and "is a FIFO" in done.stdout
    finally:
        unblock(path)
        ax.sh("rm -r models/swapped", check=False)


async def test_a_call_that_hangs_is_given_up_after_the_time_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userfiles, "TIME_LIMIT_S", 0.2)
    hung = threading.Event()

    def stat_on_dead_nfs(path: str) -> str:
        hung.wait()
        return path

    try:
        with pytest.raises(BadInput, match=r"no answer in 0\.2 s"):
            await userfiles.call(stat_on_dead_nfs, "/nfs/model.gguf")
    finally:
        hung.set()
