"""Random sequences of file operations over the whole mounted tree (hypothesis).

Every answer must be data or an errno from the list a caller may expect; EIO (a bug
in axfs), ENOTCONN (the daemon died) and anything else fail the test. Afterwards the
tree must be whole: the same root, every task directory with its files and a state
that parses, the engine still running tasks, nothing in the daemon's log. Bounded:
at most MAX_EXAMPLES sequences or BUDGET_S seconds, whichever comes first.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Mount, mounted

pytestmark = pytest.mark.mount

BUDGET_S = 30.0
MAX_EXAMPLES = 2000
READ_TIMEOUT_S = 2.0  # a read of a stream still being written may wait; this long at most

EXPECTED = frozenset({
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL, errno.EBUSY, errno.EEXIST,
    errno.EFBIG, errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EBADF, errno.E2BIG,
    errno.EDQUOT, errno.ENOSPC, errno.ENAMETOOLONG, errno.EXDEV, errno.ELOOP, errno.EINTR,
})
ROOT = {"README", "models", "tasks", "memory", "sched", "trace", "devices", "replay", "users"}
TASK_FILES = {"prompt", "stream", "status", "config", "ctl", "fork", "error", "timeline",
              "schema", "grammar"}
STATES = {"draft", "queued", "running", "preempted", "done", "failed", "killed"}

_names = st.sampled_from(["new", "latest", "f1", "f2", "1", "2", "3", "10", "bad name", "..",
                          ".", "x" * 300, "README", "prompt"])
_files = st.sampled_from([*sorted(TASK_FILES), "parent", "nope", "..", "timeline", "result"])
PATHS = st.one_of(
    st.sampled_from(["", *sorted(ROOT), "models/tiny", "models/tiny/info", "models/none",
                     "users/0", "users/1", "replay/1", "replay/1/ctl", "replay/1/timeline",
                     "nonexistent", "tasks/new/x"]),
    _names.map(lambda n: f"tasks/{n}"),
    st.tuples(_names, _files).map(lambda t: f"tasks/{t[0]}/{t[1]}"),
    st.tuples(_names, _files).map(lambda t: f"replay/{t[0]}/{t[1]}"),
)
DATA = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"kill", b"priority 3\n", b"max_tokens 5\n", b"temperature 0\nseed 1\n",
                     b"hello world\n", b"run\n", b"\xff\xfe", b"a\0b", b"max_tokens 99999\n",
                     b"stop \\n\n", b"colour red", b"", b"\n", "caf\u00e9 \u65e5\u672c".encode()]),
)
FLAGS = st.tuples(
    st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR]),
    st.sets(st.sampled_from([os.O_CREAT, os.O_TRUNC, os.O_APPEND, os.O_EXCL, os.O_NONBLOCK,
                             os.O_DIRECTORY, os.O_NOFOLLOW])),
).map(lambda t: t[0] | sum(t[1]))
OFFSETS = st.one_of(st.integers(0, 64), st.integers(0, 1 << 40))


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple[Any, ...]

    def __repr__(self) -> str:
        return f"{self.name}{self.args!r}"


IO = st.one_of(
    st.tuples(st.just("read"), OFFSETS, st.integers(0, 1 << 17)),
    st.tuples(st.just("write"), OFFSETS, DATA),
    st.tuples(st.just("ftruncate"), OFFSETS, st.none()),
)
OPS = st.one_of(
    st.builds(lambda p, f, io: Op("open", (p, f, tuple(io))), PATHS, FLAGS, st.lists(IO, max_size=4)),
    st.builds(lambda p, n: Op("truncate", (p, n)), PATHS, OFFSETS),
    st.builds(lambda a, b: Op("rename", (a, b)), PATHS, PATHS),
    st.builds(lambda a, b: Op("link", (a, b)), PATHS, PATHS),
    st.builds(lambda a, b: Op("symlink", (a, b)), PATHS, PATHS),
    st.builds(lambda p, m: Op("chmod", (p, m)), PATHS, st.integers(0, 0o7777)),
    st.builds(lambda p: Op("unlink", (p,)), PATHS),
    st.builds(lambda p: Op("rmdir", (p,)), PATHS),
    st.builds(lambda p: Op("mkdir", (p,)), PATHS),
    st.builds(lambda p: Op("listdir", (p,)), PATHS),
    st.builds(lambda p: Op("stat", (p,)), PATHS),
    st.builds(lambda p: Op("readlink", (p,)), PATHS),
)


class Blocked(Exception):
    """A read waited longer than READ_TIMEOUT_S (a stream whose task still runs)."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Blocked


@pytest.fixture(scope="module")
def fz(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    # max_tokens at most 64: whatever the fuzzer submits ends quickly.
    with mounted(tmp_path_factory.mktemp("fuzz"), tiny_model, "--ctx", "16384", "--slots", "8",
                 "--limit", "max_tokens=64") as m:
        m.sh("mkdir tasks/f1 tasks/f2 && echo 'max_tokens 8' > tasks/f2/config && "
             "echo seed > tasks/f2/prompt && echo hello > tasks/new && echo hi > tasks/new")
        old = signal.signal(signal.SIGALRM, _on_alarm)
        try:
            yield m
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def answer(call: Callable[[], object], op: Op) -> tuple[bool, object]:
    """Run one operation: (True, its result), or (False, its errno) if that errno is one a
    caller may expect (or "blocked" for a read that waited)."""
    signal.setitimer(signal.ITIMER_REAL, READ_TIMEOUT_S)
    try:
        return True, call()
    except Blocked:
        return False, "blocked"
    except OSError as e:
        assert e.errno in EXPECTED, f"{op}: unexpected {errno.errorcode.get(e.errno or 0)}: {e}"
        return False, e.errno
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def run_op(root: Path, op: Op) -> None:
    p = [root / a if isinstance(a, str) else a for a in op.args]
    if op.name == "open":
        path, flags, io = op.args
        opened, fd = answer(lambda: os.open(root / path, flags, 0o644), op)
        if not opened or not isinstance(fd, int):
            return
        try:
            for kind, off, arg in io:
                if kind == "read":
                    answer(partial(os.pread, fd, arg, off), op)
                elif kind == "write":
                    answer(partial(os.pwrite, fd, arg, off), op)
                else:
                    answer(partial(os.ftruncate, fd, off), op)
        finally:
            answer(lambda: os.close(fd), op)
        return
    calls: dict[str, Callable[[], object]] = {
        "truncate": lambda: os.truncate(p[0], p[1]),
        "rename": lambda: os.rename(p[0], p[1]),
        "link": lambda: os.link(p[0], p[1]),
        "symlink": lambda: os.symlink(op.args[0], p[1]),
        "chmod": lambda: os.chmod(p[0], p[1]),
        "unlink": lambda: os.unlink(p[0]),
        "rmdir": lambda: os.rmdir(p[0]),
        "mkdir": lambda: os.mkdir(p[0]),
        "listdir": lambda: os.listdir(p[0]),
        "stat": lambda: os.stat(p[0]),
        "readlink": lambda: os.readlink(p[0]),
    }
    answer(calls[op.name], op)


def check_tree(m: Mount) -> None:
    """The tree's invariants."""
    root = m.path
    assert set(os.listdir(root)) == ROOT
    assert (root / "README").read_text().startswith("axfs")
    for name in os.listdir(root / "tasks"):
        d = root / "tasks" / name
        if name == "new":
            assert stat.S_ISREG(os.lstat(d).st_mode)
            continue
        if name == "latest":
            assert (root / "tasks" / os.readlink(d)).is_dir()
            continue
        files = set(os.listdir(d))
        assert files - {"parent"} == TASK_FILES, (name, files)
        status = dict(line.split(" ", 1) for line in (d / "status").read_text().splitlines())
        assert status["state"] in STATES
        assert int(status["generated_tokens"]) <= 64
    for line in (root / "sched").read_text().splitlines():
        assert " " in line
    assert "KVCapacity:" in (root / "memory").read_text()
    os.statvfs(root)


def test_random_file_operations_never_break_the_tree(fz: Mount) -> None:
    start = time.monotonic()
    ran = [0]

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(OPS, min_size=1, max_size=12))
    def sequence(ops: list[Op]) -> None:
        if time.monotonic() - start > BUDGET_S:
            return
        ran[0] += 1
        for op in ops:
            run_op(fz.path, op)
        check_tree(fz)

    sequence()
    assert ran[0] >= 20, f"only {ran[0]} sequences ran in {BUDGET_S} s"
    events = [line.split()[3] for line in fz.read("trace").splitlines()]
    # The sequences reached the kernel: prompts were taken and bad writes refused.
    assert events.count("submit") >= 1 and events.count("reject") >= 3, set(events)
    # The engine still works: everything submitted ends, and a new task runs to the end.
    deadline = time.monotonic() + 60
    while int(dict(line.split(" ", 1) for line in fz.read("sched").splitlines())["runnable"]):
        assert time.monotonic() < deadline, fz.read("sched")
        time.sleep(0.1)
    fz.sh("mkdir tasks/after && echo 'max_tokens 4' > tasks/after/config && "
          "echo finally > tasks/after/prompt && cat tasks/after/stream > /dev/null")
    assert fz.status("after")["state"] == "done"
    check_tree(fz)
    log = (fz.state / "axfs.log").read_text()
    assert "Traceback" not in log and "axfs.fs.operations ERROR" not in log
