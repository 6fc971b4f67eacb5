"""Bad input, one test each: prompts, config lines, writes where nothing may be written,
file operations that make no sense here, readers killed midway, bad models, a driver
failing mid-generation, a full state directory. Through a real mount unless the case
needs a fake driver."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from axfs.fs.operations import Operations
from axfs.kernel import Kernel
from axfs.task import State
from tests.conftest import TINY_CTX, Mount, fill, mount, mounted, umount
from tests.fakes import FakeDriver
from tests.test_mount import new_task
from tests.test_operations import path_ino, read_file, write_file


def tasks(ax: Mount) -> set[str]:
    return set(os.listdir(ax.path / "tasks"))


def submits(ax: Mount) -> int:
    return ax.read("trace").count(" submit ")


def last_reject(ax: Mount) -> str:
    return [line for line in ax.read("trace").splitlines() if " reject " in line][-1]


# -- prompts ------------------------------------------------------------------------


@pytest.mark.mount
def test_a_zero_byte_prompt_submits_nothing(ax: Mount) -> None:
    before, names = submits(ax), tasks(ax)
    ax.sh(": > tasks/new")  # opened, truncated, closed: nothing was written
    ax.sh("mkdir tasks/zero && : > tasks/zero/prompt")
    assert submits(ax) == before and tasks(ax) == names | {"zero"}
    assert ax.status("zero")["state"] == "draft"


@pytest.mark.mount
def test_an_empty_prompt_is_refused_at_close_with_the_reason(ax: Mount) -> None:
    before = submits(ax)
    # A program that checks close() is told.
    with pytest.raises(OSError) as e, open(ax.path / "tasks/new", "wb") as f:
        f.write(b" \n")
    assert e.value.errno == errno.EINVAL
    ax.sh("echo > tasks/new")  # the shell does not check close(); the reason is kept
    assert submits(ax) == before
    assert "reason='prompt is empty'" in last_reject(ax)
    assert "prompt is empty" in ax.read("users/0").splitlines()[-1]


@pytest.mark.mount
def test_a_10_mb_prompt_fails_with_efbig_and_nothing_is_queued(ax: Mount) -> None:
    before, names = submits(ax), tasks(ax)
    done = ax.sh("head -c 10M /dev/zero | tr '\\0' a > tasks/new", check=False)
    assert done.returncode != 0 and "File too large" in done.stderr
    assert "prompt is over 1048576 bytes" in last_reject(ax)
    ax.sh("mkdir tasks/huge")
    done = ax.sh("head -c 10M /dev/zero | tr '\\0' a > tasks/huge/prompt", check=False)
    assert done.returncode != 0 and "File too large" in done.stderr
    assert "prompt is over 1048576 bytes" in ax.read("tasks/huge/error")
    assert submits(ax) == before and tasks(ax) == names | {"huge"}
    assert ax.status("huge")["state"] == "draft"
    ax.sh("echo 'max_tokens 2' > tasks/huge/config && echo small > tasks/huge/prompt")
    ax.wait_state("huge", "done")  # the same draft takes a good prompt afterwards


@pytest.mark.mount
@pytest.mark.parametrize(("data", "words"), [
    (b"ab\xffcd", "invalid start byte at byte 2"),
    (b"caf\xc3(", "invalid continuation byte at byte 3"),
    (b"\xed\xa0\x80", "at byte 0"),  # a UTF-16 surrogate encoded as UTF-8
])
def test_invalid_utf8_fails_the_write_with_einval(ax: Mount, data: bytes, words: str) -> None:
    before = submits(ax)
    with pytest.raises(OSError) as e, open(ax.path / "tasks/new", "wb", buffering=0) as f:
        f.write(data)
    assert e.value.errno == errno.EINVAL
    assert "not valid UTF-8" in last_reject(ax) and words in last_reject(ax)
    name = f"u{time.monotonic_ns()}"
    ax.sh(f"mkdir tasks/{name}")
    escaped = "".join(f"\\x{b:02x}" for b in data)
    done = ax.sh(f"printf '{escaped}' > tasks/{name}/prompt", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert "not valid UTF-8" in ax.read(f"tasks/{name}/error")
    assert submits(ax) == before


@pytest.mark.mount
def test_utf8_split_across_writes_is_whole_and_a_cut_one_is_refused_at_close(ax: Mount) -> None:
    with open(ax.path / "tasks/new", "r+b", buffering=0) as f:
        f.write(b"x\xe2")
        f.write(b"\x82\xacy")  # the euro sign's other two bytes
        task = f.read().decode().strip()
    assert ax.read(f"tasks/{task}/prompt") == "x\u20acy"
    with pytest.raises(OSError) as e, open(ax.path / "tasks/new", "wb", buffering=0) as f:
        f.write(b"ends in half a character \xe2\x82")
    assert e.value.errno == errno.EINVAL
    assert "not valid UTF-8" in last_reject(ax)


@pytest.mark.mount
def test_a_nul_byte_fails_the_write_with_einval(ax: Mount) -> None:
    before = submits(ax)
    done = ax.sh("printf 'a\\0b' > tasks/new", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    ax.sh("mkdir tasks/nul")
    done = ax.sh("printf 'x\\0' > tasks/nul/prompt", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert "NUL byte" in ax.read("tasks/nul/error") and submits(ax) == before


# -- config -------------------------------------------------------------------------


@pytest.mark.mount
@pytest.mark.parametrize(("line", "words"), [
    ("colour red", "unknown key 'colour'"),
    ("=5", "unknown key '=5'"),
    ("max_tokens ten", "'ten' is not an integer"),
    ("max_tokens 5 6", "'5 6' is not an integer"),
    ("max_tokens", "'' is not an integer"),
    ("top_k 1.5", "'1.5' is not an integer"),
    ("priority 0x10", "'0x10' is not an integer"),
    ("temperature hot", "'hot' is not a number"),
    ("max_tokens 0", "outside 1..1000000"),
    ("max_tokens -3", "outside 1..1000000"),
    ("top_p 1.5", "outside 0.0..1.0"),
    ("seed -2", "outside -1..4294967295"),
    ("priority 10001", "outside 1..10000"),
    ("max_tokens 99999999999999999999999999999999", "outside 1..1000000"),
    ("seed 18446744073709551616", "outside -1..4294967295"),
    ("temperature 1e400", "outside 0.0..100.0"),
    ("temperature nan", "outside 0.0..100.0"),
    ("temperature -inf", "outside 0.0..100.0"),
    ("model nosuch", "no model named 'nosuch'"),
    ("stop \\q", "unknown escape"),
    ("stop " + "x" * 300, "at most 256 characters"),
    ("stop a\nstop b\nstop c\nstop d\nstop e\nstop f\nstop g\nstop h\nstop i", "at most 8 stop"),
])
def test_a_bad_config_line_fails_with_einval_and_changes_nothing(ax: Mount, line: str,
                                                                 words: str) -> None:
    name = f"c{time.monotonic_ns()}"
    ax.sh(f"mkdir tasks/{name}")
    before = ax.read(f"tasks/{name}/config")
    with pytest.raises(OSError) as e, open(ax.path / f"tasks/{name}/config", "wb",
                                           buffering=0) as f:
        f.write(f"max_tokens 7\n{line}\n".encode())
    assert e.value.errno == errno.EINVAL
    assert words in ax.read(f"tasks/{name}/error")
    assert ax.read(f"tasks/{name}/config") == before  # the good first line is not applied
    assert words.replace("'", "") in last_reject(ax).replace("'", "").replace('"', "")


@pytest.mark.mount
def test_config_that_is_not_utf8_fails_with_einval(ax: Mount) -> None:
    ax.sh("mkdir tasks/cfgbytes")
    done = ax.sh("printf 'max_tokens \\xff\\n' > tasks/cfgbytes/config", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert "not UTF-8" in ax.read("tasks/cfgbytes/error")


# -- writes and operations that make no sense --------------------------------------------


@pytest.mark.mount
@pytest.mark.parametrize("path", ["README", "memory", "sched", "trace", "devices",
                                  "models/tiny/info", "users/0", "tasks/{t}/status",
                                  "tasks/{t}/stream", "tasks/{t}/error", "tasks/{t}/prompt"])
def test_writing_a_read_only_file_fails_with_eacces(ax: Mount, path: str) -> None:
    task = new_task(ax, max_tokens=2)
    ax.wait_state(task, "done")
    target = path.format(t=task)
    before = (ax.path / target).read_bytes() if "{t}" in path else None
    for script in (f"echo x > {target}", f"echo x >> {target}"):
        done = ax.sh(script, check=False)
        assert done.returncode != 0 and "Permission denied" in done.stderr, script
    if target.endswith("/error"):  # the refusal is the task's latest error
        assert ax.read(target) == f"error of task {task} is read-only\n"
    elif before is not None:
        assert (ax.path / target).read_bytes() == before
    if "{t}" in path:
        assert "is read-only" in last_reject(ax)


@pytest.mark.mount
@pytest.mark.parametrize(("script", "message"), [
    ("mv tasks/{t} tasks/{t}x", "Operation not permitted"),
    ("mv tasks/{t}/config tasks/{t}/c2", "Operation not permitted"),
    ("mv README tasks/{t}/readme", "Operation not permitted"),
    ("ln tasks/{t}/config tasks/{t}/hard", "Operation not permitted"),
    ("ln README tasks/hard", "Operation not permitted"),
    ("ln -s README tasks/soft", "Operation not permitted"),
    ("ln -s x tasks/{t}/soft", "Operation not permitted"),
    ("chmod 600 tasks/{t}/config", "Operation not permitted"),
    ("chmod 700 tasks/{t}", "Operation not permitted"),
    ("chmod 777 README", "Operation not permitted"),
    ("chown 1000 tasks/{t}/status", "Operation not permitted"),
    ("truncate -s 5 tasks/{t}/config", "Operation not permitted"),
    ("truncate -s 0 tasks/{t}/status", "Permission denied"),
    ("truncate -s 0 memory", "Permission denied"),
    ("touch tasks/{t}/newfile", "Permission denied"),
    ("touch newfile", "Permission denied"),
    ("mkdir tasks/{t}/sub", "Operation not permitted"),
    ("mkdir models/a/b", "No such file or directory"),
    ("mknod tasks/{t}/fifo p", "Operation not permitted"),
    ("rm README", "Operation not permitted"),
    ("rm tasks/new", "Operation not permitted"),
    ("rmdir tasks", "Operation not permitted"),
    ("rmdir models/tiny", "Device or resource busy"),
    ("rmdir tasks/{t}/status", "Not a directory"),
    ("cat tasks", "Is a directory"),
    ("ls tasks/{t}/status/x", "Not a directory"),
])
def test_renames_links_chmod_and_truncate_that_make_no_sense_fail(ax: Mount, script: str,
                                                                  message: str) -> None:
    task = new_task(ax, max_tokens=2)
    ax.wait_state(task, "done")
    stream = (ax.path / f"tasks/{task}/stream").read_bytes()
    done = ax.sh(script.format(t=task), check=False)
    assert done.returncode != 0 and message in done.stderr, done
    assert sorted(os.listdir(ax.path / f"tasks/{task}")) == [
        "config", "ctl", "error", "fork", "grammar", "prompt", "schema", "status", "stream",
        "timeline"]
    assert (ax.path / f"tasks/{task}/stream").read_bytes() == stream
    assert ax.status(task)["state"] == "done"
    assert not {"hard", "soft", "newfile"} & tasks(ax)


@pytest.mark.mount
def test_truncating_a_control_file_to_zero_is_harmless(ax: Mount) -> None:
    task = new_task(ax, max_tokens=2)
    ax.wait_state(task, "done")
    config = ax.read(f"tasks/{task}/config")
    ax.sh(f"truncate -s 0 tasks/{task}/config tasks/{task}/ctl")
    assert ax.read(f"tasks/{task}/config") == config


# -- readers killed midway ---------------------------------------------------------------


@pytest.mark.mount
@pytest.mark.parametrize("how", ["sigkill", "sigpipe"])
def test_a_cat_killed_midway_leaves_the_task_and_other_readers_alone(ax: Mount, how: str) -> None:
    task = new_task(ax, max_tokens=4000, temperature=0)
    whole = subprocess.Popen(["cat", f"{ax.path}/tasks/{task}/stream"], stdout=subprocess.PIPE)
    if how == "sigpipe":  # head exits after 20 bytes; cat dies of SIGPIPE at its next write
        done = ax.sh(f"cat tasks/{task}/stream | head -c 20", timeout=60)
        assert len(done.stdout.encode()) <= 20
    else:
        cat = subprocess.Popen(["cat", f"{ax.path}/tasks/{task}/stream"], stdout=subprocess.PIPE)
        assert cat.stdout is not None
        assert cat.stdout.read(10)  # it has read some of the text
        cat.send_signal(signal.SIGKILL)
        assert cat.wait(timeout=5) == -signal.SIGKILL
    out = whole.communicate(timeout=120)[0]
    assert ax.status(task)["state"] == "done"
    assert out == (ax.path / f"tasks/{task}/stream").read_bytes() and len(out) > 20
    assert "Traceback" not in (ax.state / "axfs.log").read_text()


# -- bad models ------------------------------------------------------------------------


def _not_gguf(d: Path) -> Path:
    (d / "text.gguf").write_text("this is not a model\n")
    return d / "text.gguf"


def _truncated(d: Path, model: Path) -> Path:
    (d / "half.gguf").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return d / "half.gguf"


@pytest.mark.mount
@pytest.mark.parametrize(("kind", "words"), [("missing", "does not exist"),
                                             ("not-gguf", "not a GGUF file"),
                                             ("truncated", "could not load")])
def test_a_bad_model_fails_its_mount_and_the_tree_keeps_working(ax: Mount, tmp_path: Path,
                                                                 kind: str, words: str) -> None:
    model = {"missing": lambda: tmp_path / "missing.gguf", "not-gguf": lambda: _not_gguf(tmp_path),
             "truncated": lambda: _truncated(tmp_path, ax.model)}[kind]()
    done = mount(tmp_path / "mnt", model, tmp_path / "state")
    assert done.returncode == 1 and words in done.stderr and "Traceback" not in done.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    task = new_task(ax, "still here", max_tokens=3)  # the working tree, its model, unharmed
    ax.sh(f"cat tasks/{task}/stream > /dev/null")
    assert ax.status(task)["state"] == "done"


# -- a driver error in the middle of a generation -------------------------------------------


async def test_a_driver_error_mid_generation_fails_that_task_and_the_rest_go_on() -> None:
    driver = FakeDriver(n_seq_max=1)
    driver.step_delay = 0.002
    kernel = Kernel(driver, policy="fifo")
    ops = Operations(kernel)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kernel.run)
        await write_file(ops, "tasks/new", b"a")
        await write_file(ops, "tasks/new", b"b")  # waits: one sequence slot
        first, second = kernel.get("1"), kernel.get("2")
        with trio.fail_after(10):
            while first.num_generated < 5:
                await first.changed.wait()
        driver.fail_next = "GGML error: out of device memory"
        with trio.fail_after(10):
            while not first.finished:
                await first.changed.wait()
        assert (first.state, first.finish_reason) == (State.FAILED, "error")
        error = (await read_file(ops, "tasks/1/error")).decode()
        assert error == "model error: GGML error: out of device memory\n"
        stream = await read_file(ops, "tasks/1/stream")  # what it had made, then EOF
        assert 5 <= len(stream) < 256 and stream == first.output
        with trio.fail_after(20):
            while not second.finished:
                await second.changed.wait()
        assert (second.state, second.num_generated) == (State.DONE, 256)
        await write_file(ops, "tasks/new", b"c")
        third = kernel.get("3")
        with trio.fail_after(20):
            while not third.finished:
                await third.changed.wait()
        assert third.state is State.DONE
        trace = kernel.trace.read(0, 1 << 20)[0].decode()
        assert " 1 0 error reason='GGML error: out of device memory'" in trace
        assert await path_ino(ops, "tasks/3/stream")
        nursery.cancel_scope.cancel()


# -- the state directory's disk full -----------------------------------------------------------


def test_a_full_state_dir_does_not_stop_tasks_and_the_error_is_reported(
        small_disk: Path, tiny_model: Path) -> None:
    # One slot and no swap memory: two long tasks take turns, and each turn the one set
    # aside has its KV written to STATE_DIR/swap/, which cannot be written. The journal is
    # off: with it on, a full disk refuses new submissions (tests/test_full_journal.py).
    mnt, state = small_disk.parent / "mnt", small_disk / "state"
    done = mount(mnt, tiny_model, state, "--slots", "1", "--swap-mem", "0", "--ctx", "4096",
                 "--journal", "off")
    assert done.returncode == 0, done.stderr
    m = Mount(mnt, state, tiny_model)
    try:
        fill(small_disk)
        a = new_task(m, "first", max_tokens=400, temperature=0)
        b = new_task(m, "second", max_tokens=400, temperature=0)
        m.sh(f"cat tasks/{a}/stream tasks/{b}/stream > /dev/null", timeout=120)
        assert m.status(a)["state"] == m.status(b)["state"] == "done"
        assert int(m.status(a)["preemptions"]) + int(m.status(b)["preemptions"]) > 0
        memory = dict(line.split(":", 1) for line in m.read("memory").splitlines())
        assert int(memory["SwapErrors"]) > 0 and int(memory["SwappedDiskTasks"]) == 0
        trace = m.read("trace")
        assert "cannot write swap file" in trace and "No space left on device" in trace
        (small_disk / "filler").unlink()
        c = new_task(m, "after", max_tokens=5)
        m.wait_state(c, "done")
    finally:
        umount(mnt)
    assert not os.path.ismount(mnt)


@pytest.fixture(scope="module")
def ax(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("bad"), tiny_model, "--ctx", str(TINY_CTX),
                 "--slots", "16") as m:
        yield m
