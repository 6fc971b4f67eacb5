"""What one user sees of another's work on a --multi-user tree (docs/tree.md, "Many users").

Root and uid 1001 each write a secret into every field a user can write (a task name,
the prompt, every config value, stop strings, fork text, refused config, ctl, mkdir and
replay lines; root also refused models/ changes, which only root may make). Then each
walks the whole tree with real tools: every file read, every link read, the trace read
whole, at its end and followed. 1001 finds none of root's secrets and all of its own;
root finds everything."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY_CTX, Mount, mounted
from tests.test_multiuser import as_user, needs_users

pytestmark = pytest.mark.mount

USER = 1001
# Numbers written as config values: root's and the user's (distinct from each other
# and unlikely to be a count).
NUMBERS = {
    0: {"max_tokens": "31337", "temperature": "1.2345", "top_k": "7919", "top_p": "0.8642",
        "seed": "918273645", "priority": "4271"},
    USER: {"max_tokens": "27183", "temperature": "2.7182", "top_k": "6007", "top_p": "0.7531",
           "seed": "827364519", "priority": "3119"},
}
TAGS = {0: "rootsec", USER: "usersec"}
TEXTS = ("Task", "-stop-one", "-stop-two", "-refused-config", "-prompt", "-refused-ctl",
         "-fork-text", "-new-prompt", "-bad-name", "-refused-replay")
ROOT_ONLY = ("-refused-template", "-model-path", "-refused-model")


def secrets(uid: int) -> list[str]:
    tag = TAGS[uid]
    return [tag + s for s in TEXTS + (ROOT_ONLY if uid == 0 else ())]


def found(number: str, text: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", text) is not None


@pytest.fixture(scope="module")
def pm(tiny_model: Path) -> Iterator[Mount]:
    base = Path(tempfile.mkdtemp(prefix="axfs-privacy-"))
    base.chmod(0o755)  # the other user must reach the mount point
    try:
        with mounted(base, tiny_model, "--ctx", str(TINY_CTX), "--slots", "8",
                     "--multi-user") as m:
            for uid in (0, USER):
                plant(m, uid)
            yield m
    finally:
        shutil.rmtree(base, ignore_errors=True)


def plant(m: Mount, uid: int) -> None:
    """Every field ``uid`` can write, each with its own secret."""
    tag, n = TAGS[uid], NUMBERS[uid]
    name = f"{tag}Task"
    config = "".join(f"{k} {v}\\n" for k, v in n.items()) + f"stop {tag}-stop-one\\nstop {tag}-stop-two\\n"
    run = lambda script, check=True: as_user(m, uid, script, check=check)  # noqa: E731
    run(f"mkdir tasks/{name} && printf '{config}' > tasks/{name}/config")
    assert run(f"echo 'temperature {tag}-refused-config' > tasks/{name}/config", False).returncode
    run(f"echo {tag}-prompt > tasks/{name}/prompt && echo kill > tasks/{name}/ctl")
    assert run(f"echo '{tag}-refused-ctl' > tasks/{name}/ctl", False).returncode
    # A fork of the killed task (it inherits max_tokens 31337: killed too)
    child = run(f"exec 3<>tasks/{name}/fork; echo ' {tag}-fork-text' >&3; read c <&3; echo $c; "
                f"echo kill > tasks/$c/ctl").stdout.strip()
    new = run(f"echo {tag}-new-prompt > tasks/new; readlink tasks/latest").stdout.strip()
    run(f"echo kill > tasks/{new}/ctl")  # ended, as a replay needs, without waiting
    m.wait_state(child, "killed", "done")
    assert run(f"mkdir 'tasks/{tag}-bad-name x'", False).returncode
    assert run(f"echo '{tag}-refused-replay' > replay/{new}/ctl", False).returncode
    if uid == 0:
        model = next(p.name for p in (m.path / "models").iterdir())
        assert run(f"echo 'template {tag}-refused-template' > models/{model}/ctl", False).returncode
        assert run(f"ln -s /nonexistent/{tag}-model-path models/x", False).returncode
        assert run(f"mkdir 'models/{tag}-refused-model x'", False).returncode


WALK = r"""
ls -laR .
find . -printf '%p %y %s %u %m %l\n'
find . -type l -exec readlink {} \;
grep -r -a -H . .
cat trace
tail -c 333 trace
tail -n 7 trace
head -c 777 trace
dd if=trace bs=100 skip=3 count=5 status=none
stat -c '%n %s %U' trace sched memory devices README users/* models/*/*
"""


def walk(m: Mount, uid: int) -> str:
    """Everything ``uid`` can read of the tree, errors included."""
    done = as_user(m, uid, WALK)
    return done.stdout + done.stderr


@needs_users
def test_another_user_finds_none_of_roots_secrets_and_all_of_their_own(pm: Mount) -> None:
    seen = walk(pm, USER)
    assert "Permission denied" in seen  # the walk did try users/0
    leaked = [s for s in secrets(0) if s in seen]
    leaked += [f"{k} {v}" for k, v in NUMBERS[0].items() if found(v, seen)]
    assert not leaked, leaked
    missing = [s for s in secrets(USER) if s not in seen]
    missing += [f"{k} {v}" for k, v in NUMBERS[USER].items() if not found(v, seen)]
    assert not missing, missing
    # Root's work is there as counts: root's lines are in the user's trace, named
    # tasks as *.
    trace = as_user(pm, USER, "cat trace", check=True).stdout
    assert re.search(r" \* 0 submit prompt_tokens=\d+\n", trace)
    assert re.search(r" \d+ 0 kill state=\w+ tokens=\d+\n", trace)


@needs_users
def test_the_state_directory_is_roots_only(pm: Mount) -> None:
    """The journal, swap files and log hold every prompt: not readable by others."""
    done = as_user(pm, USER, f"grep -r -a -l {TAGS[0]} {pm.state}")
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert TAGS[0] not in done.stdout
    assert TAGS[0].encode() in (pm.state / "journal.msgpack").read_bytes()  # it is there


@needs_users
def test_root_finds_every_secret(pm: Mount) -> None:
    seen = walk(pm, 0)
    missing = [s for uid in (0, USER) for s in secrets(uid) if s not in seen]
    missing += [f"{k} {v}" for uid in (0, USER) for k, v in NUMBERS[uid].items()
                if not found(v, seen)]
    assert not missing, missing


@needs_users
def test_listings_show_a_user_their_own_tasks_and_root_all(pm: Mount) -> None:
    mine = as_user(pm, USER, "ls tasks replay", check=True).stdout
    assert f"{TAGS[USER]}Task" in mine and f"{TAGS[0]}Task" not in mine
    every = pm.sh("ls tasks replay").stdout
    assert f"{TAGS[USER]}Task" in every and f"{TAGS[0]}Task" in every
    # A name known is still a directory that is not theirs (EACCES, not ENOENT).
    done = as_user(pm, USER, f"ls tasks/{TAGS[0]}Task")
    assert done.returncode != 0 and "Permission denied" in done.stderr


@needs_users
def test_each_view_of_the_trace_has_the_same_lines(pm: Mount) -> None:
    """Nothing runs now: root's and the user's reads are of the same lines, the user's
    shorter where a line is not theirs; sizes agree with what is read."""
    root = pm.read("trace").splitlines()
    user = as_user(pm, USER, "cat trace", check=True).stdout.splitlines()
    assert len(root) == len(user)
    for full, short in zip(root, user, strict=True):
        f, s = full.split(" "), short.split(" ")
        assert (f[0], f[2], f[3]) == (s[0], s[2], s[3])
        if f[2] == str(USER):
            assert full == short
    size = int(as_user(pm, USER, "stat -c %s trace", check=True).stdout)
    assert size == len(as_user(pm, USER, "cat trace", check=True).stdout.encode())
    end = as_user(pm, USER, "tail -c 200 trace", check=True).stdout
    assert "\n".join(user).endswith(end.rstrip("\n"))


@needs_users
def test_tail_f_follows_the_users_view(pm: Mount) -> None:
    """tail -f as the user, while root writes more secrets: what tail printed is the
    user's view, line for line, with no truncation notice and no secret of root's."""
    out = pm.path.parent / "tail.out"
    err = pm.path.parent / "tail.err"
    with out.open("wb") as o, err.open("wb") as e:
        tail = subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                                 "tail", "-n", "+1", "-s", "0.1", "-f", str(pm.path / "trace")],
                                stdout=o, stderr=e)
    try:
        for i in range(3):
            pm.sh(f"mkdir tasks/later{i} && echo 'stop rootsec-later-{i}' > tasks/later{i}/config"
                  f" && echo 'seed rootsec-late-{i}' > tasks/later{i}/config", check=False)
            as_user(pm, USER, f"echo 'usersec-marker-{i}' > tasks/{TAGS[USER]}Task/ctl")
        deadline = time.monotonic() + 30
        while b"usersec-marker-2" not in out.read_bytes():
            assert time.monotonic() < deadline and tail.poll() is None, err.read_text()
            time.sleep(0.1)
    finally:
        tail.terminate()
        tail.wait(timeout=10)
    printed = out.read_text()
    assert err.read_text() == ""
    assert "rootsec" not in printed
    view = as_user(pm, USER, "cat trace", check=True).stdout
    assert view.startswith(printed) and printed.endswith("\n")
    assert "usersec-marker-0" in printed and "rootsec-later-0" in pm.read("trace")
