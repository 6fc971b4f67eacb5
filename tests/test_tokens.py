"""Token records without a model: their arithmetic (drivers.logprobs), the tokens file and
status lines (axfs.tokens), and the kernel keeping them, through the journal too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from axfs import tokens
from axfs.config import TaskConfig
from axfs.fs import views
from axfs.task import State, Task
from drivers import logprobs
from tests.fakes import FakeDriver, fake_record, local
from tests.test_journal import kernel, run
from tests.test_sched import run_until, start


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    m = row.max()
    return row - m - np.log(np.exp(row - m).sum())


def test_records_are_the_log_softmax_of_the_raw_logits() -> None:
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((3, 5000)) * 4).astype(np.float32)
    logits[1, :100] = -np.inf  # masked tokens count for nothing and make no NaN
    sampled = [int(logits[0].argmax()), 17 + 100, 4999]
    made = logprobs.records(logits, sampled, [5, 1, 20])
    for i, (row, token, n) in enumerate(zip(logits, sampled, [5, 1, 20], strict=True)):
        (rec,) = logprobs.read(made[i], n)
        ref = log_softmax(row)
        assert rec["logprob"] == pytest.approx(ref[token], abs=1e-4)
        p = np.exp(ref)
        entropy = -(p[p > 0] * ref[p > 0]).sum()
        assert rec["entropy"] == pytest.approx(entropy, abs=1e-4)
        assert list(rec["ids"]) == list(np.argsort(-ref, kind="stable")[:n])
        assert rec["logprobs"] == pytest.approx(np.sort(ref)[::-1][:n], abs=1e-4)
        assert len(made[i]) == logprobs.row_size(n)


def test_escape_keeps_a_token_on_one_tab_free_line() -> None:
    assert tokens.escape(b"plain caf\xc3\xa9") == "plain café"
    assert tokens.escape(b"a\tb\nc\\d\re") == "a\\tb\\nc\\\\d\\re"
    assert tokens.escape(b"\x00\x1b\x7f") == "\\x00\\x1b\\x7f"
    assert tokens.escape(b"\xe6\x97") == "\\xe6\\x97"  # half of a UTF-8 character
    assert tokens.escape("x\u2028y\u0085".encode()) == "x\\u2028y\\u0085"


def finished(config: str, output: list[int], records: bytes = b"") -> Task:
    task = Task("7", 0, 0, TaskConfig(model="m").updated(config, {"m"}))
    task.output_tokens, task.records = output, bytearray(records)
    return task


def test_the_tokens_file_and_status_of_a_task_with_logprobs() -> None:
    task = finished("logprobs 2\n", [104, 9], fake_record(104, 2) + fake_record(9, 2))
    lines = tokens.render(task, lambda t: {104: b"h", 9: b"\t"}[t]).splitlines()
    assert lines == ["0\t104\t-0.1040\t0.5000\t104:-0.1040,105:-1.1040\th",
                     "1\t9\t-0.0090\t0.5000\t9:-0.0090,10:-1.0090\t\\t"]
    assert [line.split("\t")[2] for line in lines] == ["-0.1040", "-0.0090"]  # cut -f3
    status = views.status(task, 0)
    assert "mean_logprob -0.0565\nmin_logprob -0.1040\nmean_entropy 0.5000\n" in status
    assert tokens.render(task, None).splitlines()[0].endswith("\t")  # model not loaded: no text


def test_a_task_without_logprobs_lists_index_id_and_text() -> None:
    task = finished("", [104, 105])
    assert tokens.render(task, lambda t: chr(t).encode()) == "0\t104\th\n1\t105\ti\n"
    assert "logprob" not in views.status(task, 0)
    assert tokens.stats(finished("logprobs 3\n", [])) == [
        ("mean_logprob", "-"), ("min_logprob", "-"), ("mean_entropy", "-")]


async def test_the_kernel_keeps_a_record_a_token_and_the_journal_keeps_them(tmp_path: Path) -> None:
    k = kernel(tmp_path)
    k.restore()
    asked = await start(k, 1, "hello", max_tokens=6, temperature=0, logprobs=3)
    plain = await start(k, 1, "hello", max_tokens=6, temperature=0)
    await run(k, [asked, plain])
    assert len(asked.records) == 6 * logprobs.row_size(3) and not plain.records
    assert bytes(asked.records) == b"".join(fake_record(t, 3) for t in asked.output_tokens)
    k2 = kernel(tmp_path)
    k2.restore()
    assert k2.get(asked.id).records == asked.records and not k2.get(plain.id).records


async def test_an_unfinished_task_resumes_with_the_records_of_its_tokens(tmp_path: Path) -> None:
    k = kernel(tmp_path)
    k.restore()
    assert isinstance(local(k).driver, FakeDriver)
    local(k).driver.step_delay = 0.002
    long = await start(k, 1, "a", max_tokens=200, temperature=0, logprobs=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.run)
        await run_until(k, lambda: long.num_generated >= 20)
        await trio.sleep(0.2)  # a journal flush
        nursery.cancel_scope.cancel()
    k.close()  # as after a crash
    k2 = kernel(tmp_path)
    k2.restore()
    again = k2.get(long.id)
    kept = len(again.output_tokens)
    assert again.state is State.QUEUED and kept >= 1
    assert len(again.records) == kept * logprobs.row_size(1)
    await run(k2, [again])
    assert again.num_generated == 200
    assert bytes(again.records) == b"".join(fake_record(t, 1) for t in again.output_tokens)
