"""The FUSE adapter called directly (no kernel mount): errno translation and files."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pyfuse3
import pytest
import trio

from axfs.fs.operations import Operations
from axfs.kernel import Kernel
from tests.fakes import FakeDriver

pytestmark = pytest.mark.adapter


@dataclass
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = os.getpid()
    umask: int = 0o022


CTX = Ctx()


@pytest.fixture
async def ops() -> AsyncIterator[Operations]:
    k = Kernel(FakeDriver())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        yield Operations(k)
        nursery.cancel_scope.cancel()


async def path_ino(ops: Operations, path: str, ctx: Ctx = CTX) -> int:
    ino = pyfuse3.ROOT_INODE
    for part in path.split("/"):
        ino = (await ops.lookup(ino, part.encode(), ctx)).st_ino  # type: ignore[arg-type]
    return ino


async def write_file(ops: Operations, path: str, data: bytes, ctx: Ctx = CTX) -> None:
    ino = await path_ino(ops, path, ctx)
    fi = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, ctx)  # type: ignore[arg-type]
    try:
        await ops.write(fi.fh, 0, data)
        await ops.flush(fi.fh)
    finally:
        await ops.release(fi.fh)


async def read_file(ops: Operations, path: str, ctx: Ctx = CTX) -> bytes:
    ino = await path_ino(ops, path, ctx)
    fi = await ops.open(ino, os.O_RDONLY, ctx)  # type: ignore[arg-type]
    out = b""
    while chunk := await ops.read(fi.fh, len(out), 4096):
        out += chunk
    await ops.release(fi.fh)
    return out


async def errno_of(coro: object) -> int:
    with pytest.raises(pyfuse3.FUSEError) as e:
        await coro  # type: ignore[misc]
    return e.value.errno


async def test_root_lookup_attributes(ops: Operations) -> None:
    tasks = await ops.lookup(pyfuse3.ROOT_INODE, b"tasks", CTX)  # type: ignore[arg-type]
    assert stat.S_ISDIR(tasks.st_mode) and tasks.st_mode & 0o1777 == 0o1777
    readme = await ops.lookup(pyfuse3.ROOT_INODE, b"README", CTX)  # type: ignore[arg-type]
    assert stat.S_ISREG(readme.st_mode) and readme.st_size > 0
    code = await errno_of(ops.lookup(pyfuse3.ROOT_INODE, b"nope", CTX))  # type: ignore[arg-type]
    assert code == errno.ENOENT


async def test_submit_through_new_then_stream_and_latest(ops: Operations) -> None:
    await write_file(ops, "tasks/new", b"a\n")
    latest = await ops.readlink(await path_ino(ops, "tasks/latest"), CTX)  # type: ignore[arg-type]
    task = ops.kernel.get(latest.decode())
    with trio.fail_after(5):
        while not task.finished:
            await task.changed.wait()
    stream = await read_file(ops, f"tasks/{latest.decode()}/stream")
    assert stream == task.output and len(stream) == 256  # default max_tokens, a byte each


async def test_latest_is_per_user(ops: Operations) -> None:
    await write_file(ops, "tasks/new", b"a", Ctx(uid=1000, gid=1000))
    code = await errno_of(path_ino(ops, "tasks/latest", Ctx(uid=0)))
    assert code == errno.ENOENT
    attrs = await ops.lookup(await path_ino(ops, "tasks"), b"1", CTX)  # type: ignore[arg-type]
    assert (attrs.st_uid, attrs.st_gid) == (1000, 1000)


async def test_kernel_errors_become_errnos(ops: Operations) -> None:
    tasks = await path_ino(ops, "tasks")
    await ops.mkdir(tasks, b"job", 0o755, CTX)  # type: ignore[arg-type]
    assert await errno_of(ops.mkdir(tasks, b"job", 0o755, CTX)) == errno.EEXIST  # type: ignore[arg-type]
    assert await errno_of(write_file(ops, "tasks/job/config", b"bogus 1")) == errno.EINVAL
    assert await errno_of(write_file(ops, "tasks/new", b"x" * (2 << 20))) == errno.EFBIG
    status = await path_ino(ops, "tasks/job/status")
    assert await errno_of(ops.open(status, os.O_WRONLY, CTX)) == errno.EACCES  # type: ignore[arg-type]
    root = pyfuse3.ROOT_INODE
    assert await errno_of(ops.create(root, b"f", 0o644, os.O_WRONLY, CTX)) == errno.EACCES  # type: ignore[arg-type]
    assert await errno_of(ops.mkdir(root, b"d", 0o755, CTX)) == errno.EPERM  # type: ignore[arg-type]


async def test_an_unexpected_exception_is_eio_and_the_adapter_lives(ops: Operations,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(ops.kernel, "configure", boom)
    await ops.mkdir(await path_ino(ops, "tasks"), b"j", 0o755, CTX)  # type: ignore[arg-type]
    assert await errno_of(write_file(ops, "tasks/j/config", b"max_tokens 1")) == errno.EIO
    assert await read_file(ops, "README")


async def test_readdir_lists_the_tree(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []
    monkeypatch.setattr(pyfuse3, "readdir_reply",
                        lambda token, name, attrs, next_id: seen.append(name) or True)
    await write_file(ops, "tasks/new", b"a")
    for path, names in [("", {b"README", b"models", b"tasks", b"memory", b"sched", b"trace",
                              b"devices", b"replay", b"users"}),
                        ("tasks", {b"new", b"latest", b"1"}),
                        ("tasks/1", {b"prompt", b"stream", b"status", b"config", b"ctl", b"fork",
                                     b"error", b"timeline", b"schema", b"grammar", b"tokens"}),
                        ("models", {b"fake"})]:
        seen.clear()
        ino = await path_ino(ops, path) if path else pyfuse3.ROOT_INODE
        fh = await ops.opendir(ino, CTX)  # type: ignore[arg-type]
        await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
        await ops.releasedir(fh)
        assert set(seen) == names


async def test_unlink_in_a_task_succeeds_so_rm_r_reaches_rmdir(ops: Operations) -> None:
    await write_file(ops, "tasks/new", b"a")
    task_ino = await path_ino(ops, "tasks/1")
    await ops.unlink(task_ino, b"stream", CTX)  # type: ignore[arg-type]
    await ops.rmdir(await path_ino(ops, "tasks"), b"1", CTX)  # type: ignore[arg-type]
    assert "1" not in ops.kernel.tasks
    assert await errno_of(ops.getattr(task_ino, CTX)) == errno.ENOENT  # type: ignore[arg-type]
    assert await errno_of(ops.unlink(pyfuse3.ROOT_INODE, b"memory", CTX)) == errno.EPERM  # type: ignore[arg-type]


async def test_readme_has_a_line_for_everything_the_tree_lists(ops: Operations,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    seen: list[bytes] = []
    monkeypatch.setattr(pyfuse3, "readdir_reply",
                        lambda token, name, attrs, next_id: seen.append(name) or True)
    await write_file(ops, "tasks/new", b"a")
    readme = (await read_file(ops, "README")).decode()
    words = {"tasks": "ID", "replay": "ID", "models": "NAME", "users": "UID"}
    paths, found = [""], []
    while paths:
        path = paths.pop()
        seen.clear()
        fh = await ops.opendir(await path_ino(ops, path) if path else pyfuse3.ROOT_INODE, CTX)  # type: ignore[arg-type]
        await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
        await ops.releasedir(fh)
        for name in [n.decode() for n in seen]:
            full = f"{path}/{name}".lstrip("/")
            attrs = await ops.lookup(await path_ino(ops, path) if path else pyfuse3.ROOT_INODE,
                                     name.encode(), CTX)  # type: ignore[arg-type]
            parts = full.split("/")
            if len(parts) > 1 and parts[0] in words and parts[1] not in ("new", "latest"):
                parts[1] = words[parts[0]]
            shown = "/".join(parts) + ("/" if stat.S_ISDIR(attrs.st_mode) else "")
            found.append(shown)
            assert f"\n{shown} " in readme, shown
            if stat.S_ISDIR(attrs.st_mode):
                paths.append(full)
    assert "tasks/ID/timeline" in found and "models/NAME/info" in found and "users/UID" in found


async def test_a_task_removed_but_not_by_rmdir_is_forgotten_by_the_kernel(
        ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel keeps the lookup of tasks/ID (operations.KEPT): a removal that is not an
    rmdir through the tree (which drops the name in the kernel itself) must tell it to
    forget the name, or a mkdir of the same name would fail with EEXIST for a while."""
    told: list[tuple[int, bytes]] = []
    monkeypatch.setattr(pyfuse3, "invalidate_entry_async",
                        lambda ino, name, ignore_enoent=False: told.append((ino, name)))
    tasks = await path_ino(ops, "tasks")
    kept = await ops.mkdir(tasks, b"kept", 0o755, CTX)  # type: ignore[arg-type]
    assert kept.entry_timeout > 0
    ops.init()  # as pyfuse3 does once mounted
    for name, reason in (("a", "rm"), ("b", "retention"), ("c", "refused")):
        await ops.mkdir(tasks, name.encode(), 0o755, CTX)  # type: ignore[arg-type]
        ops.kernel.remove(ops.kernel.get(name), reason=reason)
    assert told == [(tasks, b"b"), (tasks, b"c")]
