"""A config written by a shell is one change: all of it at close, or none of it and the
shell sees the refusal (issue 19); and the smaller promises of config, ctl and error."""

from __future__ import annotations

import errno
import time

import pytest

from tests.conftest import Mount
from tests.test_mount import new_task

pytestmark = pytest.mark.mount


def draft(ax: Mount) -> str:
    name = f"j{time.monotonic_ns()}"
    ax.sh(f"mkdir tasks/{name}")
    return name


def config(ax: Mount, name: str) -> dict[str, str]:
    return dict(line.split(" ", 1) if " " in line else (line, "")
                for line in ax.read(f"tasks/{name}/config").splitlines())


def test_printf_with_a_bad_first_line_exits_non_zero_and_changes_nothing(ax: Mount) -> None:
    name = draft(ax)
    before = ax.read(f"tasks/{name}/config")
    done = ax.sh(f"printf 'format yaml\\ntemperature 1\\nseed %s\\nmax_tokens 96\\n' 3 "
                 f"> tasks/{name}/config; echo \"exit $?\"", check=False)
    assert "exit 1" in done.stdout and "Invalid argument" in done.stderr
    assert ax.read(f"tasks/{name}/config") == before
    assert "config line 1 ('format yaml'): 'yaml' is not text or json" in ax.read(f"tasks/{name}/error")


def test_a_bad_line_after_good_ones_fails_that_write_and_every_later_one(ax: Mount) -> None:
    name = draft(ax)
    before = ax.read(f"tasks/{name}/config")
    with open(ax.path / f"tasks/{name}/config", "wb", buffering=0) as f:
        f.write(b"max_tokens 5\n")
        with pytest.raises(OSError) as bad:
            f.write(b"top_p 7\n")
        assert bad.value.errno == errno.EINVAL
        with pytest.raises(OSError) as later:
            f.write(b"seed 4\n")
        assert later.value.errno == errno.EINVAL
        with pytest.raises(OSError) as closed:  # close says it too: nothing was applied
            f.close()
        assert closed.value.errno == errno.EINVAL
    assert ax.read(f"tasks/{name}/config") == before
    assert "config line 2 ('top_p 7'): 7 is outside 0.0..1.0" in ax.read(f"tasks/{name}/error")


def test_a_here_document_with_one_bad_line_changes_nothing(ax: Mount) -> None:
    name = draft(ax)
    before = ax.read(f"tasks/{name}/config")
    done = ax.sh(f"cat > tasks/{name}/config <<'EOF'\nmax_tokens 5\nseed 4\ncolour red\n"
                 f"temperature 0\nEOF\necho \"exit $?\"", check=False)
    assert "exit 1" in done.stdout
    assert ax.read(f"tasks/{name}/config") == before
    done = ax.sh(f"printf 'seed 4\\n' | tee tasks/{name}/config; echo 'max_tokens x' "
                 f"| tee -a tasks/{name}/config; echo \"exit $?\"", check=False)
    assert "exit 1" in done.stdout  # tee sees the refusal
    assert config(ax, name)["seed"] == "4" and config(ax, name)["max_tokens"] == "256"


def test_a_good_multi_line_printf_applies_every_line(ax: Mount) -> None:
    name = draft(ax)
    ax.sh(f"printf 'max_tokens 96\\ntemperature 1\\nseed %s\\nstop a\\nstop b\\n' 3 "
          f"> tasks/{name}/config")
    got = config(ax, name)
    assert (got["max_tokens"], got["temperature"], got["seed"]) == ("96", "1", "3")
    assert ax.read(f"tasks/{name}/config").count("stop ") == 2


def test_append_adds_to_the_settings_and_truncate_resets_the_others(ax: Mount) -> None:
    name = draft(ax)
    ax.sh(f"printf 'max_tokens 7\\ntemperature 0\\ntop_k 5\\n' > tasks/{name}/config")
    ax.sh(f"echo 'seed 9' >> tasks/{name}/config")
    got = config(ax, name)
    assert (got["max_tokens"], got["temperature"], got["top_k"], got["seed"]) == ("7", "0", "5", "9")
    ax.sh(f"printf 'max_tokens 12\\nseed 4\\n' > tasks/{name}/config")
    got = config(ax, name)
    assert (got["max_tokens"], got["seed"]) == ("12", "4")
    assert (got["temperature"], got["top_k"], got["top_p"]) == ("0.8", "40", "0.95")
    ax.sh(f"echo 'top_k 3' >> tasks/{name}/config; : > tasks/{name}/config")
    deadline = time.monotonic() + 10  # `: >` writes nothing: the reset comes with release
    while config(ax, name)["max_tokens"] != "256" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (config(ax, name)["max_tokens"], config(ax, name)["top_k"]) == ("256", "40")


def test_a_line_split_across_writes_is_one_line(ax: Mount) -> None:
    name = draft(ax)
    with open(ax.path / f"tasks/{name}/config", "ab", buffering=0) as f:
        f.write(b"max_tokens 1" + b" " * 5000 + b"\ntemper")  # a full buffer cuts a line
        f.write(b"ature 0.5\n")
    assert (config(ax, name)["max_tokens"], config(ax, name)["temperature"]) == ("1", "0.5")


@pytest.mark.parametrize(("line", "key", "value"), [("max_tokens\t17", "max_tokens", "17"),
                                                    ("seed \t 5", "seed", "5")])
def test_any_white_space_separates_a_key_from_its_value(ax: Mount, line: str, key: str,
                                                        value: str) -> None:
    name = draft(ax)
    ax.sh(f"printf '{line}\\n' > tasks/{name}/config")
    assert config(ax, name)[key] == value


@pytest.mark.parametrize("line", ["max_tokens 1_000", "seed ٣", "temperature 1_0", "top_k +-3"])
def test_numbers_are_plain_digits(ax: Mount, line: str) -> None:
    name = draft(ax)
    done = ax.sh(f"echo '{line}' > tasks/{name}/config", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert "is not a" in ax.read(f"tasks/{name}/error")


def test_a_later_write_that_succeeds_clears_the_refusal_from_error(ax: Mount) -> None:
    name = draft(ax)
    ax.sh(f"echo 'colour red' > tasks/{name}/config", check=False)
    assert "unknown key 'colour'" in ax.read(f"tasks/{name}/error")
    ax.sh(f"echo 'max_tokens 3' > tasks/{name}/config")
    assert ax.read(f"tasks/{name}/error") == ""
    ax.sh(f"echo 'priority x' > tasks/{name}/ctl", check=False)
    error = ax.read(f"tasks/{name}/error")
    assert error.startswith(f"tasks/{name}/ctl 'priority x': 'x' is not an integer")
    assert "config" not in error
    ax.sh(f"echo 'priority 9' > tasks/{name}/ctl")
    assert ax.read(f"tasks/{name}/error") == ""


def test_a_refused_write_to_a_replay_file_is_not_the_tasks_error(ax: Mount) -> None:
    task = new_task(ax, max_tokens=2)
    ax.wait_state(task, "done")
    for script in (f"echo x > replay/{task}/result", f"echo explode > replay/{task}/ctl"):
        done = ax.sh(script, check=False)
        assert done.returncode != 0
    assert ax.read(f"tasks/{task}/error") == ""
    trace = ax.read("trace")
    assert f"reject task={task}" in trace or f" {task} " in trace
    refusals = ax.read("users/0")
    assert "result of task" in refusals and f"replay/{task}/ctl: cannot parse 'explode'" in refusals


def test_a_config_of_a_running_task_is_refused_whole(ax: Mount) -> None:
    task = new_task(ax, max_tokens=100000)
    ax.wait_state(task, "running", "done")
    done = ax.sh(f"printf 'seed 3\\ntemperature 0\\n' > tasks/{task}/config; echo \"exit $?\"",
                 check=False)
    assert "exit 1" in done.stdout and "Device or resource busy" in done.stderr
    ax.sh(f"echo kill > tasks/{task}/ctl")
