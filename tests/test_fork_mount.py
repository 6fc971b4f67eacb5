"""Fork, the prefix cache and /ax/memory through the real mount and shell tools."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount, mounted

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def ax(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("fork"), tiny_model, "--ctx", "8192", "--slots", "8") as m:
        yield m


def memory(ax: Mount) -> dict[str, int]:
    rows = (line.split(":", 1) for line in ax.read("memory").splitlines())
    return {k: int(v.split()[0]) for k, v in rows if v.split()[0].isdigit()}


def ask(ax: Mount, name: str, prompt: str) -> str:
    """Submit as task ``name``, greedy and short, and wait for the end."""
    ax.sh(f"mkdir tasks/{name} && printf 'temperature 0\\nmax_tokens 16\\n' > tasks/{name}/config"
          f" && echo {prompt!r} > tasks/{name}/prompt && cat tasks/{name}/stream > /dev/null")
    return name


def test_a_conversation_by_forks(ax: Mount) -> None:
    parent = ask(ax, "talk", "conversation: hello there, how are you today?")
    out = ax.sh(f"exec 3<>tasks/{parent}/fork; echo ' And you?' >&3; read child <&3; "
                f"echo $child; cat tasks/$child/stream > /dev/null; readlink tasks/$child/parent")
    child, link = out.stdout.split()
    assert link == f"../{parent}" and os.path.realpath(ax.path / "tasks" / child / "parent") == str(
        ax.path / "tasks" / parent)
    status = ax.status(child)
    assert status["state"] == "done" and status["parent"] == parent
    assert int(status["kv_prefix_reused"]) >= int(ax.status(parent)["prompt_tokens"])
    assert ax.read(f"tasks/{child}/prompt") == " And you?"
    assert "parent" in os.listdir(ax.path / "tasks" / child)
    assert "parent" not in os.listdir(ax.path / "tasks" / parent)
    # `echo > fork` alone works too, and the child is the caller's latest task
    ax.sh(f"echo ' Again?' > tasks/{child}/fork && cat tasks/latest/stream > /dev/null")
    grandchild = os.readlink(ax.path / "tasks/latest")
    assert ax.status(grandchild)["parent"] == child
    ax.sh(f"rm -r tasks/{grandchild}")
    assert not (ax.path / "tasks" / grandchild).exists()


def test_forks_of_a_task_still_running_wait_for_it(ax: Mount) -> None:
    ax.sh("mkdir tasks/slow && printf 'max_tokens 400\\ntemperature 0\\n' > tasks/slow/config && "
          "echo 'a long answer' > tasks/slow/prompt")
    out = ax.sh("for q in one two; do exec 3<>tasks/slow/fork; echo \" $q\" >&3; read c <&3; "
                "exec 3>&-; echo $c; done")
    kids = out.stdout.split()
    ax.sh(f"cat tasks/{kids[0]}/stream tasks/{kids[1]}/stream > /dev/null", timeout=120)
    assert ax.status("slow")["state"] == "done"
    for kid in kids:
        status = ax.status(kid)
        assert status["state"] == "done" and status["parent"] == "slow", status


def test_a_fork_of_a_draft_is_refused_with_the_reason(ax: Mount) -> None:
    ax.sh("mkdir tasks/draft")
    done = ax.sh("echo more > tasks/draft/fork", check=False)
    assert done.returncode != 0 and "Device or resource busy" in done.stderr
    assert "nothing to fork" in ax.read("tasks/draft/error")


def test_memory_adds_up_and_counts_prefix_hits(ax: Mount) -> None:
    before = memory(ax)
    ask(ax, "q1", "shared system prompt: you are terse and exact. question: one")
    ask(ax, "q2", "shared system prompt: you are terse and exact. question: two")
    after = memory(ax)
    assert after["PrefixHits"] >= before["PrefixHits"] + 1
    assert after["PrefixTokensSaved"] > before["PrefixTokensSaved"]
    assert after["KVUsed"] == after["KVRunning"] + after["KVCached"]
    assert after["KVCached"] > 0 and after["SequencesCached"] >= 1
    assert after["KVFree"] == after["KVCapacity"] - after["KVUsed"] - after["KVReservedGrowth"]
    assert "SwapOuts:" in ax.read("memory") and "Evictions:" in ax.read("memory")
