"""The default model (Gemma 3 270M from PyPI), end to end through the real mount."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount, mounted
from tests.test_examples import UNSURE, classify_from_cron
from tests.test_logprobs import check_against_llama_cpp

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def gemma(gemma_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("gemma"), gemma_model) as m:
        yield m


def test_echo_hello_then_cat_prints_generated_text(gemma: Mount) -> None:
    out = gemma.sh("echo hello > tasks/new; cat tasks/latest/stream", timeout=120).stdout
    task = os.readlink(gemma.path / "tasks/latest")
    status = gemma.status(task)
    assert status["state"] == "done" and status["model"] == "gemma-3-270m-q4_k_m"
    assert int(status["generated_tokens"]) > 0
    assert out.strip() and out == (gemma.path / f"tasks/{task}/stream").read_text()


def test_greedy_continuation_is_sensible(gemma: Mount) -> None:
    gemma.sh("mkdir tasks/paris && printf 'max_tokens 8\\ntemperature 0\\n' > tasks/paris/config"
             " && echo 'The capital of France is' > tasks/paris/prompt")
    out = gemma.sh("cat tasks/paris/stream", timeout=60).stdout
    assert "Paris" in out or "capital" in out, out
    info = gemma.read("models/gemma-3-270m-q4_k_m/info")
    assert "architecture gemma3\n" in info and "Q4_K" in info


def test_format_json_output_parses_with_jq(gemma: Mount) -> None:
    # A prompt Gemma answers greedily with a closed object in deterministic mode (Q8_0 KV):
    # "Classify this log line as info, warn or error, as JSON with keys level and reason:
    # ..." runs to max_tokens in a string of zeros there (and with llama.cpp's defaults
    # too, once it shares its steps).
    gemma.sh("mkdir tasks/classify && printf 'format json\\nmax_tokens 300\\ntemperature 0\\n' "
             "> tasks/classify/config && echo 'Return a JSON object with keys \"level\" (info, "
             "warn or error) and \"reason\" for this log line: disk /dev/sda1 is 97% full' "
             "> tasks/classify/prompt")
    gemma.wait_state("classify", "done", timeout=120)
    assert gemma.status("classify")["finish_reason"] == "eos"
    out = gemma.sh("jq -c . tasks/classify/stream").stdout
    assert out.startswith("{")


def test_greedy_logprobs_agree_with_llama_cpps_own(gemma: Mount) -> None:
    gemma.sh("mkdir tasks/sure && printf 'max_tokens 12\\ntemperature 0\\nlogprobs 3\\n' "
             "> tasks/sure/config && echo 'The capital of France is' > tasks/sure/prompt")
    gemma.wait_state("sure", "done", timeout=120)
    check_against_llama_cpp(gemma, "sure", 3)  # over Gemma's 262,144 tokens
    assert float(gemma.status("sure")["min_logprob"]) < 0


def test_classify_log_example_sorts_lines_and_refuses_the_unsure(gemma: Mount,
                                                                 tmp_path: Path) -> None:
    log = tmp_path / "syslog"
    log.write_text("Nov 24 01:02:03 db1 postgres[77]: FATAL: could not write: No space left\n"
                   "Nov 24 01:04:00 db1 CRON[901]: (root) CMD (run-parts /etc/cron.hourly)\n")
    done, out = classify_from_cron(gemma, tmp_path, log, MIN_LOGPROB="-100")
    assert (done.returncode, done.stderr) == (0, "")
    levels = [line.split("\t")[0] for line in out.read_text().splitlines()]
    assert len(levels) == 2 and set(levels) <= {"info", "warn", "error"}
    assert not [t for t in os.listdir(gemma.path / "tasks") if t.startswith("classify-")]
    with log.open("a") as f:
        f.write("Nov 24 01:05:22 db1 sshd[1203]: Failed password for invalid user admin\n")
    sure, _ = classify_from_cron(gemma, tmp_path, log, MIN_LOGPROB="-0.0001")
    (refused,) = sure.stderr.splitlines()
    unsure = UNSURE.search(refused)
    assert sure.returncode == 1 and unsure is not None, refused
    task = refused.split()[1].removeprefix("tasks/").removesuffix(":")
    assert unsure[1] == gemma.status(task)["min_logprob"]
