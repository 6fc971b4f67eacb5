"""Multi-user mode and per-user limits: real second and third uids (through setpriv)
against a tree mounted with --multi-user; the limits' accounting alone."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from axfs.config import TaskConfig
from axfs.errors import ParameterTooLarge, QuotaExceeded, TooLarge
from axfs.quota import Limits, Quota, parse_limits
from axfs.task import State, Task
from tests.conftest import AXFS, REPO, TINY_CTX, Mount, mounted, sh

B, C, D = 1000, 1001, 1002  # unprivileged users; root is another
LIMITS = ["--limit", f"{B}:max_tokens=50000", "--limit", f"{C}:tasks=1",
          "--limit", f"{C}:tokens_per_hour=40", "--limit", f"{D}:prompt_bytes=100"]

needs_users = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs /dev/fuse, root and setpriv to act as other uids")


@pytest.fixture(scope="module")
def mu(tiny_model: Path) -> Iterator[Mount]:
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, and the other users
    # must reach the mount point (and the tiny model need not be readable by them).
    base = Path(tempfile.mkdtemp(prefix="axfs-mu-"))
    base.chmod(0o755)
    try:
        with mounted(base, tiny_model, "--ctx", str(TINY_CTX), "--slots", "8", "--multi-user",
                     *LIMITS) as m:
            yield m
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_user(mount: Mount, uid: int, script: str, check: bool = False
            ) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash as ``uid`` (no groups), in the mount point."""
    return sh(f"cd {mount.path} && exec setpriv --reuid={uid} --regid={uid} --clear-groups "
              f"bash -c {_quote(script)}", check=check)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def submit_as(mount: Mount, uid: int, name: str, prompt: str = "hello", **config: object) -> None:
    lines = "".join(f"{k} {v}\\n" for k, v in config.items())
    as_user(mount, uid, f"mkdir tasks/{name} && printf '{lines}' > tasks/{name}/config && "
            f"echo {prompt} > tasks/{name}/prompt", check=True)


# -- permissions --------------------------------------------------------------------


@needs_users
def test_a_task_is_its_owners_only(mu: Mount) -> None:
    submit_as(mu, B, "bsecret", "the secret prompt", max_tokens=8, temperature=0)
    mu.wait_state("bsecret", "done")
    d = mu.path / "tasks/bsecret"
    st = d.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (B, 0o700)
    modes = {f: stat.S_IMODE((d / f).stat().st_mode) for f in os.listdir(d)}
    assert modes == {"prompt": 0o400, "stream": 0o400, "status": 0o400, "error": 0o400,
                     "timeline": 0o400, "schema": 0o400, "grammar": 0o400,  # drafts only: 0o600
                     "config": 0o600, "ctl": 0o600, "fork": 0o600}
    assert all((d / f).stat().st_uid == B for f in modes)
    # The owner reads everything.
    assert as_user(mu, B, "cat tasks/bsecret/prompt", check=True).stdout == "the secret prompt"
    stream = (d / "stream").read_bytes()
    assert as_user(mu, B, "cat tasks/bsecret/stream", check=True).stdout.encode() == stream


@needs_users
@pytest.mark.parametrize("script", [
    "cat tasks/bsecret/prompt",
    "cat tasks/bsecret/stream",
    "cat tasks/bsecret/status",
    "cat tasks/bsecret/error",
    "cat tasks/bsecret/config",
    "ls tasks/bsecret",
    "echo kill > tasks/bsecret/ctl",
    "echo 'priority 9' > tasks/bsecret/ctl",
    "echo 'max_tokens 1' > tasks/bsecret/config",
    "echo 'and then' > tasks/bsecret/fork",
    "echo x > tasks/bsecret/prompt",
    "rm -r tasks/bsecret",
    "rmdir tasks/bsecret",
    "mv tasks/bsecret tasks/mine",
    "chmod 777 tasks/bsecret",
    "grep -r secret tasks/bsecret",
])
def test_another_user_can_neither_read_write_kill_nor_list_a_task(mu: Mount, script: str) -> None:
    if "bsecret" not in os.listdir(mu.path / "tasks"):
        submit_as(mu, B, "bsecret", "the secret prompt", max_tokens=8, temperature=0)
    mu.wait_state("bsecret", "done")
    before = (mu.path / "tasks/bsecret/stream").read_bytes()
    done = as_user(mu, C, script)
    assert done.returncode != 0, done
    assert "Permission denied" in done.stderr or "Operation not permitted" in done.stderr, done
    assert "secret" not in done.stdout
    # Nothing changed: the task is there, done, with its text, config and no kill.
    assert mu.status("bsecret")["state"] == "done"
    assert (mu.path / "tasks/bsecret/stream").read_bytes() == before
    assert "max_tokens 8\n" in mu.read("tasks/bsecret/config")
    assert not [line for line in mu.read("trace").splitlines()
                if " bsecret " in line and line.split()[3] in ("kill", "priority", "fork", "remove")]


@needs_users
def test_a_running_task_cannot_be_killed_by_another_user_and_root_can(mu: Mount) -> None:
    submit_as(mu, B, "blong", "go on", max_tokens=30000)
    mu.wait_state("blong", "running")
    done = as_user(mu, C, "echo kill > tasks/blong/ctl")
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert mu.status("blong")["state"] == "running"
    mu.sh("echo kill > tasks/blong/ctl")  # root controls every task
    assert mu.status("blong")["state"] == "killed"
    assert as_user(mu, B, "cat tasks/blong/prompt", check=True).stdout == "go on"


@needs_users
def test_root_sees_and_controls_all(mu: Mount) -> None:
    submit_as(mu, B, "broot", "seen by root", max_tokens=4)
    mu.wait_state("broot", "done")
    assert mu.read("tasks/broot/prompt") == "seen by root"
    assert "state done" in mu.read("tasks/broot/status")
    mu.sh("echo 'priority 7' > tasks/broot/ctl")
    assert mu.read("tasks/broot/ctl") == "priority 7\n"
    mu.sh("rm -r tasks/broot")
    assert "broot" not in os.listdir(mu.path / "tasks")


@needs_users
def test_latest_is_per_user(mu: Mount) -> None:
    as_user(mu, B, "echo 'from b' > tasks/new", check=True)
    b_latest = as_user(mu, B, "readlink tasks/latest", check=True).stdout.strip()
    mu.sh("echo 'from root' > tasks/new")
    root_latest = os.readlink(mu.path / "tasks/latest")
    assert b_latest != root_latest
    assert as_user(mu, B, "readlink tasks/latest", check=True).stdout.strip() == b_latest
    assert as_user(mu, B, "cat tasks/latest/prompt", check=True).stdout == "from b"
    assert mu.read("tasks/latest/prompt") == "from root"
    # D has made nothing yet: no latest for D, whatever others did.
    assert "latest" not in as_user(mu, D, "ls tasks", check=True).stdout.split()


@needs_users
def test_each_user_reads_only_their_own_users_file(mu: Mount) -> None:
    as_user(mu, B, "echo hi > tasks/new", check=True)
    assert stat.S_IMODE((mu.path / f"users/{B}").stat().st_mode) == 0o400
    assert (mu.path / f"users/{B}").stat().st_uid == B
    mine = as_user(mu, B, f"cat users/{B}", check=True).stdout
    assert f"uid {B}\n" in mine and "max_tokens_limit 50000\n" in mine
    done = as_user(mu, C, f"cat users/{B}")
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert f"uid {B}" in mu.read(f"users/{B}")  # root reads every user's


# -- limits through the mount ----------------------------------------------------------


def refusals(mount: Mount, uid: int) -> list[str]:
    return [line for line in mount.read(f"users/{uid}").splitlines() if line.startswith("refused ")]


@needs_users
def test_max_tokens_over_the_limit_fails_the_config_write_with_e2big(mu: Mount) -> None:
    as_user(mu, B, "mkdir tasks/bbig", check=True)
    done = as_user(mu, B, "echo 'max_tokens 50001' > tasks/bbig/config")
    assert done.returncode != 0 and "Argument list too long" in done.stderr
    reason = "max_tokens 50001 is over 50000 (limit max_tokens of uid 1000)"
    assert reason in mu.read("tasks/bbig/error")
    assert reason in refusals(mu, B)[-1]
    assert f"reject reason='{reason}" in mu.read("trace")
    assert "max_tokens 256\n" in mu.read("tasks/bbig/config")
    as_user(mu, B, "echo 'max_tokens 50000' > tasks/bbig/config", check=True)


@needs_users
def test_tasks_over_the_limit_fail_at_the_write_with_edquot(mu: Mount) -> None:
    submit_as(mu, C, "chold", "hold", max_tokens=30000)
    mu.wait_state("chold", "queued", "running")
    try:
        done = as_user(mu, C, "echo another > tasks/new")
        assert done.returncode != 0 and "Disk quota exceeded" in done.stderr
        assert f"uid {C} has 1 tasks queued or running (limit tasks 1)" in refusals(mu, C)[-1]
        as_user(mu, C, "mkdir tasks/cdraft", check=True)  # drafts are not counted
        done = as_user(mu, C, "echo x > tasks/cdraft/prompt")
        assert done.returncode != 0 and "Disk quota exceeded" in done.stderr
        assert "limit tasks 1" in mu.read("tasks/cdraft/error")
        assert mu.status("cdraft")["state"] == "draft"
        trace = mu.read("trace")
        assert f" {C} reject reason='uid {C} has 1 tasks queued or running" in trace
    finally:
        mu.sh("echo kill > tasks/chold/ctl")


@needs_users
def test_a_prompt_over_the_limit_fails_with_efbig(mu: Mount) -> None:
    as_user(mu, D, "head -c 100 /dev/zero | tr '\\0' a > tasks/new", check=True)
    done = as_user(mu, D, "head -c 101 /dev/zero | tr '\\0' a > tasks/new")
    assert done.returncode != 0 and "File too large" in done.stderr
    assert "prompt is over 100 bytes (limit prompt_bytes of uid 1002)" in refusals(mu, D)[-1]


@needs_users
def test_tokens_per_hour_over_the_limit_fail_with_edquot(mu: Mount) -> None:
    c_tasks = [t for t in os.listdir(mu.path / "tasks") if t.startswith("ctok")]
    name = f"ctok{len(c_tasks)}"
    used = int(dict(line.split(" ", 1) for line in mu.read(f"users/{C}").splitlines())
               ["tokens_last_hour"])
    if used < 40:
        submit_as(mu, C, name, "count", max_tokens=60, temperature=0)
        mu.wait_state(name, "done")
    info = dict(line.split(" ", 1) for line in mu.read(f"users/{C}").splitlines())
    assert int(info["tokens_last_hour"]) >= 40 and info["tokens_per_hour_limit"] == "40"
    done = as_user(mu, C, "echo more > tasks/new")
    assert done.returncode != 0 and "Disk quota exceeded" in done.stderr
    assert "tokens in the last hour (limit tokens_per_hour 40)" in refusals(mu, C)[-1]
    # Others are not limited by C's use.
    as_user(mu, B, "echo fine > tasks/new", check=True)


# -- the accounting alone -------------------------------------------------------------


def test_parse_limits_everyone_and_one_uid() -> None:
    base, own = parse_limits(["tasks=10", "1000:max_tokens=5", "1000:tasks=2", "prompt_bytes=64"])
    assert base == Limits(tasks=10, prompt_bytes=64)
    assert own == {1000: Limits(tasks=2, prompt_bytes=64, max_tokens=5)}
    assert parse_limits([]) == (Limits(), {})


@pytest.mark.parametrize(("spec", "words"), [
    ("tasks", "expected KEY=N"),
    ("colour=3", "unknown key 'colour'"),
    ("tasks=ten", "not an integer"),
    ("tasks=0", "outside 1..1000000"),
    ("tasks=99999999999999999999", "outside"),
    ("bob:tasks=3", "not a uid"),
])
def test_parse_limits_refuses_bad_specs(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_limits([spec])


def test_a_bad_limit_fails_the_mount_command(tmp_path: Path) -> None:
    done = subprocess.run([*AXFS, "mount", str(tmp_path / "m"), "--model", "/nonexistent",
                           "--limit", "tasks=-1"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "outside 1..1000000" in done.stderr


class Clock:
    def __init__(self) -> None:
        self.now = 3_600_000.0  # on a minute

    def __call__(self) -> float:
        return self.now


def test_quota_counts_active_tasks_and_checks_each_limit() -> None:
    q = Quota(Limits(tasks=2, prompt_bytes=10, max_tokens=100))
    tasks = [Task(str(i), 5, 5, TaskConfig(model="m")) for i in range(3)]
    for t in tasks:
        q.track(t)
    assert tasks[0].config.max_tokens == 100  # the default 256 lowered to the limit
    q.check_submit(5, None)
    tasks[0].submit("p", [1])
    tasks[1].submit("p", [1])
    with pytest.raises(QuotaExceeded, match="2 tasks queued or running"):
        q.check_submit(5, None)
    q.check_submit(6, None)  # another user
    tasks[1].finish(State.DONE, "eos")
    q.check_submit(5, None)
    with pytest.raises(TooLarge):
        q.check_prompt_bytes(5, 11)
    with pytest.raises(ParameterTooLarge):
        q.check_config(5, TaskConfig(model="m", max_tokens=101))
    for i in range(7):  # the kernel tells every refusal; the last 5 are kept
        q.refused(5, "-", f"reason {i}")
    text = q.render(5)
    assert "refusals 7\n" in text and text.count("\nrefused ") == 5
    assert text.endswith("task=- reason 6\n") and "reason 1" not in text


def test_tokens_per_hour_is_a_sliding_hour() -> None:
    clock, used = Clock(), {7: 0}
    q = Quota(Limits(tokens_per_hour=1000), clock=clock)
    q.usage = lambda uid: used.get(uid, 0)
    q.check_submit(7, None)
    used[7] = 600
    clock.now += 30 * 60  # 600 tokens spread over minutes 0-29, 20 a minute
    assert q.tokens_last_hour(7) == 600
    used[7] = 1100
    clock.now += 60  # 500 in minute 30
    with pytest.raises(QuotaExceeded, match="used 1100 tokens in the last hour"):
        q.check_submit(7, None)
    clock.now += 44 * 60  # minute 75: minutes 15-30 are the last hour's
    assert q.tokens_last_hour(7) == 15 * 20 + 500
    q.check_submit(7, None)
    clock.now += 16 * 60  # minute 91: all of it is older than an hour
    assert q.tokens_last_hour(7) == 0


def test_a_long_unsampled_gap_is_spread_not_charged_to_now() -> None:
    clock, used = Clock(), {7: 0}
    q = Quota(clock=clock)
    q.usage = lambda uid: used[uid]
    q.tokens_last_hour(7)
    used[7] = 3000
    clock.now += 3 * 3600  # 3000 tokens over three hours: about 1000 in the last one
    assert 990 <= q.tokens_last_hour(7) <= 1010
