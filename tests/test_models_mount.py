"""models/ through a real mount and the shell: registering by ln -s and by cp, removing,
load/unload/default, two models serving at once, idle unload and reload, chat templates."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers import chat
from drivers.llamacpp import LlamaCppDriver
from tests.conftest import TINY_CTX, Mount, mounted
from tests.tinymodel import CHATML_TEMPLATE, write_tiny_gguf

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {
        "second": write_tiny_gguf(base / "second.gguf", seed=1, n_ctx_train=TINY_CTX),
        "chat": write_tiny_gguf(base / "chat.gguf", seed=2, n_ctx_train=TINY_CTX,
                                chat_template=CHATML_TEMPLATE),
    }


@pytest.fixture(scope="module")
def ax(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("ax"), tiny_model, "--ctx", "4096", "--slots", "8",
                 "--idle-unload", "1") as m:
        yield m


def info(ax: Mount, name: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in ax.read(f"models/{name}/info").splitlines())


def wait_for(check: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def run_task(ax: Mount, name: str, model: str, max_tokens: int = 8, extra: str = "") -> None:
    ax.sh(f"mkdir tasks/{name} && printf 'model {model}\\nmax_tokens {max_tokens}\\n"
          f"temperature 0\\n{extra}' > tasks/{name}/config && echo 'one two three' > "
          f"tasks/{name}/prompt")


def test_symlink_registers_a_model_and_a_task_runs_on_it(ax: Mount, models: dict[str, Path]
                                                          ) -> None:
    ax.sh(f"ln -s {models['second']} models/second")
    listing = ax.sh("ls models").stdout.split()
    assert "second" in listing and Path(ax.model).stem in listing
    assert ax.sh("readlink models/second/file").stdout.strip() == str(models["second"])
    before = info(ax, "second")
    assert before["kind"] == "local" and before["architecture"] == "llama"
    assert before["loaded"] == "no" and before["default"] == "no"
    assert int(before["parameters"]) > 0 and before["quantisation"] == "F32"
    run_task(ax, "on-second", "second")
    ax.sh("cat tasks/on-second/stream > /dev/null")
    assert ax.status("on-second")["state"] == "done"
    assert ax.status("on-second")["model"] == "second"
    assert "model_load model=second" in ax.read("trace")


def test_bad_registrations_fail_with_the_reason(ax: Mount, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    done = ax.sh(f"ln -s {junk} models/junk", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    done = ax.sh(f"cp {junk} models/", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert "junk" not in ax.sh("ls models").stdout
    assert not list((ax.state / "models").glob("junk*"))
    trace = ax.read("trace")
    assert "reject model=junk" in trace and "not a model file" in trace
    assert ax.sh("ln -s relative/path.gguf models/rel", check=False).returncode != 0
    done = ax.sh(f"ln -s {junk} models/new", check=False)  # a name is checked first
    assert done.returncode != 0


def test_cp_copies_into_the_state_directory(ax: Mount, tiny_model: Path) -> None:
    ax.sh(f"cp {tiny_model} models/copied.gguf")
    assert "copied" in ax.sh("ls models").stdout.split()
    got = info(ax, "copied")
    assert got["copied"] == "yes" and got["path"] == str(ax.state / "models/copied.gguf")
    assert (ax.state / "models/copied.gguf").read_bytes() == tiny_model.read_bytes()
    assert "model_copy model=copied" in ax.read("trace")
    run_task(ax, "on-copy", "copied")
    ax.sh("cat tasks/on-copy/stream > /dev/null")
    assert ax.status("on-copy")["state"] == "done"
    ax.sh("rm -r models/copied")
    assert not (ax.state / "models/copied.gguf").exists()  # axfs's own copy goes with it


def test_rm_is_refused_while_a_task_uses_the_model(ax: Mount, models: dict[str, Path]) -> None:
    ax.sh(f"ln -s {models['second']} models/busy")
    run_task(ax, "long", "busy", max_tokens=100000)
    ax.wait_state("long", "running")
    done = ax.sh("rm -r models/busy", check=False)
    assert done.returncode != 0 and "Device or resource busy" in done.stderr
    assert "busy" in ax.sh("ls models").stdout.split()
    assert "unfinished tasks" in ax.read("trace")
    ax.sh("echo kill > tasks/long/ctl")
    ax.sh("rm -r models/busy")
    assert "busy" not in ax.sh("ls models").stdout.split()
    assert models["second"].exists()  # a linked file is the user's: it stays
    run_fail = ax.sh("mkdir tasks/gone && echo 'model busy' > tasks/gone/config", check=False)
    assert run_fail.returncode != 0 and "Invalid argument" in run_fail.stderr


def test_two_models_serve_at_once(ax: Mount, models: dict[str, Path]) -> None:
    if "second" not in ax.sh("ls models").stdout.split():
        ax.sh(f"ln -s {models['second']} models/second")
    run_task(ax, "both-a", Path(ax.model).stem, max_tokens=100000)
    run_task(ax, "both-b", "second", max_tokens=100000)
    ax.wait_state("both-a", "running")
    ax.wait_state("both-b", "running")
    sched = ax.read("sched")
    assert f"model {Path(ax.model).stem}\n" in sched and "model second\n" in sched
    memory = ax.read("memory")
    assert memory.count("Model:") == 2
    before = [int(ax.status(t)["generated_tokens"]) for t in ("both-a", "both-b")]
    time.sleep(0.5)
    after = [int(ax.status(t)["generated_tokens"]) for t in ("both-a", "both-b")]
    assert ax.status("both-a")["state"] == ax.status("both-b")["state"] == "running"
    assert after[0] > before[0] and after[1] > before[1]  # both generate, each in its engine
    ax.sh("echo kill > tasks/both-a/ctl; echo kill > tasks/both-b/ctl")


def test_idle_model_is_unloaded_and_loaded_again(ax: Mount, models: dict[str, Path]) -> None:
    if "second" not in ax.sh("ls models").stdout.split():
        ax.sh(f"ln -s {models['second']} models/second")
    run_task(ax, "idle-1", "second")
    ax.sh("cat tasks/idle-1/stream > /dev/null")
    wait_for(lambda: info(ax, "second")["loaded"] == "no")
    assert "model_unload model=second reason=idle" in ax.read("trace")
    assert info(ax, Path(ax.model).stem)["loaded"] == "yes"  # the default stays
    run_task(ax, "idle-2", "second")
    ax.sh("cat tasks/idle-2/stream > /dev/null")
    assert ax.status("idle-2")["state"] == "done"


def test_ctl_load_unload_default(ax: Mount, models: dict[str, Path]) -> None:
    if "second" not in ax.sh("ls models").stdout.split():
        ax.sh(f"ln -s {models['second']} models/second")
    ax.sh("echo load > models/second/ctl")
    wait_for(lambda: info(ax, "second")["loaded"] == "yes")
    ax.sh("echo unload > models/second/ctl")
    assert info(ax, "second")["loaded"] == "no"
    default = Path(ax.model).stem
    ax.sh("echo default > models/second/ctl")
    try:
        assert info(ax, "second")["default"] == "yes" and info(ax, default)["default"] == "no"
        ax.sh("echo 'one two' > tasks/new && cat tasks/latest/stream > /dev/null")
        task = ax.sh("readlink tasks/latest").stdout.strip()
        assert ax.status(task)["model"] == "second"
    finally:
        ax.sh(f"echo default > models/{default}/ctl")
    done = ax.sh("echo explode > models/second/ctl", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert "cannot parse 'explode'" in ax.read("trace")


def test_chat_template_applies_to_prompts_and_forks(ax: Mount, models: dict[str, Path]) -> None:
    ax.sh(f"ln -s {models['chat']} models/chat")
    assert info(ax, "chat")["chat_template"] == "yes"
    run_task(ax, "chat-1", "chat", max_tokens=6, extra="chat on\\n")
    ax.sh("cat tasks/chat-1/stream > /dev/null")
    ax.sh("echo 'and then' > tasks/chat-1/fork && cat tasks/latest/stream > /dev/null")
    child = ax.sh("readlink tasks/latest").stdout.strip()
    driver = LlamaCppDriver(models["chat"], n_ctx=256, n_seq_max=1)
    try:
        want = driver.tokenize(chat.render(CHATML_TEMPLATE, [("user", "one two three")]),
                               special=True)
        assert int(ax.status("chat-1")["prompt_tokens"]) == len(want)
        out = ax.read("tasks/chat-1/stream")
        turn = chat.follow_up(CHATML_TEMPLATE, "one two three", out, "and then")
        added = driver.tokenize(turn, bos=False, special=True)
        assert turn.startswith("<|im_end|>") and "<|im_start|>user\nand then" in turn
    finally:
        driver.close()
    status = ax.status(child)
    assert status["state"] == "done"
    generated = int(ax.status("chat-1")["generated_tokens"])
    eos = ax.status("chat-1")["finish_reason"] == "eos"
    assert int(status["prompt_tokens"]) == len(want) + generated - eos + len(added)
    # A model with no template: chat on is refused at submission (at close, which the
    # shell does not report), with the reason in the error file; nothing runs.
    ax.sh(f"ln -s {models['second']} models/plain")
    ax.sh("mkdir tasks/nochat && printf 'model plain\\nchat on\\n' > tasks/nochat/config"
          " && echo hi > tasks/nochat/prompt")
    assert "model plain has no chat template" in ax.read("tasks/nochat/error")
    assert ax.status("nochat")["state"] == "draft"


def test_registry_survives_a_remount(tiny_model: Path, models: dict[str, Path],
                                     tmp_path: Path) -> None:
    with mounted(tmp_path, tiny_model) as m:
        m.sh(f"ln -s {models['second']} models/kept && echo default > models/kept/ctl")
    with mounted(tmp_path, tiny_model) as m:
        assert "kept" in m.sh("ls models").stdout.split()
        assert info(m, "kept")["default"] == "no"  # --model names this mount's default
        assert info(m, tiny_model.stem)["default"] == "yes"


def test_a_model_that_cannot_load_fails_its_task_with_the_reason(ax: Mount, tiny_model: Path,
                                                                 tmp_path: Path) -> None:
    doomed = tmp_path / "doomed.gguf"
    doomed.write_bytes(tiny_model.read_bytes())
    ax.sh(f"ln -s {doomed} models/doomed")
    doomed.unlink()
    ax.sh("mkdir tasks/orphan && echo 'model doomed' > tasks/orphan/config"
          " && echo hello > tasks/orphan/prompt")
    error = ax.read("tasks/orphan/error")
    assert "model doomed cannot be loaded" in error, error
    assert "load_error model doomed cannot be loaded" in ax.read("models/doomed/info")
    ax.sh("rm -r models/doomed")
