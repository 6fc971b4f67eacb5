"""The real mount with the tiny model, driven by real shell tools."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import Mount

pytestmark = pytest.mark.mount


def new_task(ax: Mount, prompt: str = "hello world", **config: object) -> str:
    """mkdir a task, write its config, then its prompt; returns its id."""
    name = f"t{time.monotonic_ns()}"
    lines = "\\n".join(f"{k} {v}" for k, v in config.items())
    ax.sh(f"mkdir tasks/{name} && printf '{lines}\\n' > tasks/{name}/config && "
          f"echo {prompt!r} > tasks/{name}/prompt")
    return name


def test_echo_then_cat_streams_the_answer_and_ends(ax: Mount) -> None:
    out = ax.sh('echo "The cat sat on the" > tasks/new; cat tasks/latest/stream').stdout
    task = os.readlink(ax.path / "tasks/latest")
    status = ax.status(task)
    assert status["state"] == "done"
    assert out == (ax.path / f"tasks/{task}/stream").read_text()  # both with universal newlines
    assert len(out) > 0 and int(status["generated_tokens"]) > 0
    assert ax.read(f"tasks/{task}/prompt") == "The cat sat on the"


def test_reading_new_on_the_same_open_file_gives_the_id(ax: Mount) -> None:
    out = ax.sh("exec 3<>tasks/new; printf 'Once upon' >&3; read -r id <&3; echo $id").stdout
    task = out.strip()
    assert task.isdigit()
    assert ax.read(f"tasks/{task}/prompt") == "Once upon"
    with open(ax.path / "tasks/new", "r+b", buffering=0) as f:
        f.write(b"another prompt")
        second = f.read().decode().strip()
    assert int(second) > int(task)
    assert os.readlink(ax.path / "tasks/latest") == second


def test_config_through_mkdir_sets_the_task_parameters(ax: Mount) -> None:
    task = new_task(ax, max_tokens=7, temperature=0, seed=5)
    ax.sh(f"cat tasks/{task}/stream > /dev/null")
    status = ax.status(task)
    assert (status["state"], status["generated_tokens"], status["finish_reason"]) == (
        "done", "7", "length")
    config = ax.read(f"tasks/{task}/config")
    assert "max_tokens 7\n" in config and "temperature 0\n" in config and "seed 5\n" in config


def test_greedy_output_is_the_same_twice(ax: Mount) -> None:
    a = new_task(ax, "same prompt", max_tokens=20, temperature=0)
    b = new_task(ax, "same prompt", max_tokens=20, temperature=0)
    ax.sh(f"cat tasks/{a}/stream tasks/{b}/stream > /dev/null")
    first = (ax.path / f"tasks/{a}/stream").read_bytes()
    assert first and first == (ax.path / f"tasks/{b}/stream").read_bytes()


def test_a_bad_config_write_fails_with_einval_and_says_why(ax: Mount) -> None:
    ax.sh("mkdir tasks/badcfg")
    done = ax.sh("echo 'colour red' > tasks/badcfg/config", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert "unknown key 'colour'" in ax.read("tasks/badcfg/error")
    assert "reject" in ax.read("trace") and "colour" in ax.read("trace")
    done = ax.sh("echo 'max_tokens -3' > tasks/badcfg/config", check=False)
    assert done.returncode != 0 and "outside" in ax.read("tasks/badcfg/error")
    assert "max_tokens 256\n" in ax.read("tasks/badcfg/config")


def test_bad_prompt_and_ctl_writes_fail_with_an_errno(ax: Mount) -> None:
    done = ax.sh("printf 'a\\0b' > tasks/new", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    task = new_task(ax, max_tokens=3)
    done = ax.sh(f"echo explode > tasks/{task}/ctl", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert "cannot parse 'explode'" in ax.read(f"tasks/{task}/error")
    done = ax.sh(f"echo x > tasks/{task}/status", check=False)
    assert done.returncode != 0 and "Permission denied" in done.stderr
    done = ax.sh(f"echo x > tasks/{task}/prompt", check=False)
    assert done.returncode != 0 and "Permission denied" in done.stderr


def test_config_is_refused_once_the_task_runs(ax: Mount) -> None:
    task = new_task(ax, max_tokens=30000)
    ax.wait_state(task, "running")
    done = ax.sh(f"echo 'max_tokens 1' > tasks/{task}/config", check=False)
    assert done.returncode != 0 and "busy" in done.stderr.lower()
    assert "writable until the task starts" in ax.read(f"tasks/{task}/error")
    ax.sh(f"echo kill > tasks/{task}/ctl")


def test_many_readers_each_get_the_whole_text(ax: Mount) -> None:
    task = new_task(ax, max_tokens=400)
    readers = [subprocess.Popen(["cat", f"{ax.path}/tasks/{task}/stream"],
                                stdout=subprocess.PIPE) for _ in range(6)]
    outs = [r.communicate(timeout=60)[0] for r in readers]
    full = (ax.path / f"tasks/{task}/stream").read_bytes()
    assert all(o == full for o in outs) and len(full) > 0
    full.decode("utf-8")  # the stream is whole UTF-8 characters


def test_tail_f_follows_a_stream(ax: Mount) -> None:
    task = new_task(ax, max_tokens=3000)
    tail = subprocess.Popen(["tail", "-c", "+1", "-f", f"{ax.path}/tasks/{task}/stream"],
                            stdout=subprocess.PIPE)
    ax.wait_state(task, "done", timeout=60)
    time.sleep(1.5)  # tail -f polls a FUSE file about once a second
    tail.terminate()
    out = tail.communicate(timeout=10)[0]
    assert out == (ax.path / f"tasks/{task}/stream").read_bytes()


def test_tail_f_follows_the_trace(ax: Mount) -> None:
    tail = subprocess.Popen(["tail", "-n", "0", "-f", f"{ax.path}/trace"], stdout=subprocess.PIPE)
    time.sleep(0.5)
    task = new_task(ax, max_tokens=3)
    ax.wait_state(task, "done")
    time.sleep(1.5)
    tail.terminate()
    out = tail.communicate(timeout=10)[0].decode()
    events = [line.split()[3] for line in out.splitlines() if line.split()[1] == task]
    assert events[:2] == ["config", "submit"] and "admit" in events and events[-1] == "done"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_blocked_reader_dies_promptly(ax: Mount, sig: signal.Signals) -> None:
    task = new_task(ax, max_tokens=1, temperature=0)
    ax.wait_state(task, "done")
    blocker = new_task(ax, max_tokens=30000)
    ax.wait_state(blocker, "running")
    # A reader past what exists blocks: this one waits for a task that is still running.
    reader = subprocess.Popen(["bash", "-c", f"exec tail -c +100000000 -f "
                               f"{ax.path}/tasks/{blocker}/stream > /dev/null"])
    reader2 = subprocess.Popen(["cat", f"{ax.path}/tasks/{blocker}/stream"],
                               stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        assert reader.poll() is None and reader2.poll() is None
        for r in (reader, reader2):  # one waits in a blocked read, one reads a live stream
            start = time.monotonic()
            r.send_signal(sig)
            r.wait(timeout=5)
            assert time.monotonic() - start < 1.0
    finally:
        for r in (reader, reader2):
            r.kill()
            r.wait(timeout=5)
    ax.sh(f"echo kill > tasks/{blocker}/ctl")


def test_200_blocked_readers_do_not_stop_the_tree(ax: Mount) -> None:
    blocker = new_task(ax, max_tokens=30000)
    ax.wait_state(blocker, "running")
    readers = [subprocess.Popen(["cat", f"{ax.path}/tasks/{blocker}/stream"],
                                stdout=subprocess.DEVNULL) for _ in range(200)]
    try:
        time.sleep(1.0)
        assert sum(r.poll() is None for r in readers) == 200
        start = time.monotonic()
        listing = ax.sh("ls -l tasks", timeout=20).stdout
        assert blocker in listing
        assert "state running" in ax.sh(f"cat tasks/{blocker}/status", timeout=20).stdout
        out = ax.sh("mkdir tasks/during && echo 'max_tokens 5' > tasks/during/config && "
                    "echo hi > tasks/during/prompt && cat tasks/during/stream", timeout=20)
        assert out.returncode == 0
        assert time.monotonic() - start < 15
    finally:
        ax.sh(f"echo kill > tasks/{blocker}/ctl")
        for r in readers:
            r.wait(timeout=30)
    assert all(r.returncode == 0 for r in readers)  # the kill ended their streams: EOF


def test_kill_ends_a_running_task_and_its_readers(ax: Mount) -> None:
    task = new_task(ax, max_tokens=30000)
    reader = subprocess.Popen(["cat", f"{ax.path}/tasks/{task}/stream"], stdout=subprocess.PIPE)
    ax.wait_state(task, "running")
    ax.sh(f"echo kill > tasks/{task}/ctl")
    out = reader.communicate(timeout=10)[0]
    status = ax.status(task)
    assert status["state"] == "killed"
    assert out == (ax.path / f"tasks/{task}/stream").read_bytes()


def test_rm_r_removes_a_task_killing_it_first(ax: Mount) -> None:
    task = new_task(ax, max_tokens=30000)
    ax.wait_state(task, "running")
    ax.sh(f"rm -r tasks/{task}")
    assert task not in os.listdir(ax.path / "tasks")
    assert f"{task} 0 kill" in ax.read("trace")


def test_a_task_name_is_free_again_as_soon_as_it_is_removed(ax: Mount) -> None:
    """The kernel keeps the lookup of tasks/NAME for a while (axfs/fs/operations.py,
    KEPT): rm -r must free the name at once, and a stat of it must say it is gone."""
    ax.sh("mkdir tasks/again && echo max_tokens 2 > tasks/again/config && echo hi > tasks/again/prompt")
    ax.wait_state("again", "done")
    ax.sh("cat tasks/again/stream > /dev/null && rm -r tasks/again")
    assert ax.sh("test -e tasks/again; echo $?").stdout.strip() == "1"
    ax.sh("mkdir tasks/again && echo max_tokens 1 > tasks/again/config && echo hi > tasks/again/prompt")
    ax.wait_state("again", "done")
    assert ax.status("again")["generated_tokens"] == "1"


def test_ls_lr_and_grep_r_start_no_work(ax: Mount) -> None:
    new_task(ax, max_tokens=2)
    ax.sh("mkdir tasks/draft-only")
    before = ax.read("trace").count(" submit ")
    tasks_before = set(os.listdir(ax.path / "tasks"))
    ax.sh("ls -lR . > /dev/null", timeout=30)
    ax.sh("grep -r something . > /dev/null || true", timeout=60)
    assert ax.read("trace").count(" submit ") == before
    assert set(os.listdir(ax.path / "tasks")) == tasks_before
    assert ax.status("draft-only")["state"] == "draft"


def test_memory_devices_and_model_info(ax: Mount) -> None:
    memory = ax.read("memory")
    assert "KVCapacity:" in memory and "65536 cells" in memory and "KVUsedBytes:" in memory
    assert "cpu0.cores:" in ax.read("devices")
    assert os.listdir(ax.path / "models") == ["tiny"]
    info = dict(line.split(" ", 1) for line in ax.read("models/tiny/info").splitlines())
    assert info["architecture"] == "llama" and info["loaded"] == "yes"
    assert int(info["context_length"]) == 65536


def test_timeline_says_what_happened_to_the_task(ax: Mount) -> None:
    task = new_task(ax, max_tokens=3, temperature=0)
    ax.sh(f"cat tasks/{task}/stream > /dev/null")
    ax.wait_state(task, "done")
    assert "timeline" in ax.sh(f"ls tasks/{task}").stdout.split()
    timeline = ax.read(f"tasks/{task}/timeline")
    assert timeline.startswith(f"task {task}\n") and "done reason=length" in timeline
    assert " submit" in timeline and " first_token" in timeline
    assert timeline == ax.read(f"replay/{task}/timeline")
    assert os.stat(ax.path / f"tasks/{task}/timeline").st_size == len(timeline.encode())
    done = ax.sh(f"echo x > tasks/{task}/timeline", check=False)
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert "tasks/ID/timeline" in ax.read("README")


def test_status_shows_kv_use_while_running(ax: Mount) -> None:
    task = new_task(ax, max_tokens=30000)
    ax.wait_state(task, "running")
    ax.sh(f"head -c 1 tasks/{task}/stream > /dev/null")  # its prompt is in the cache
    status = ax.status(task)
    assert int(status["kv_cells"]) > 0 and int(status["kv_bytes"]) > 0, status
    assert "Sequences:" in ax.read("memory")
    ax.sh(f"echo kill > tasks/{task}/ctl")
    assert ax.status(task)["kv_cells"] == "0"
