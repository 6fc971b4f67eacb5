"""The network face (axfs/http/) on a real mount with the tiny model: the official
``openai`` package and ``curl -N`` as clients, each request a task of the tree."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from axfs.tokens import escape
from tests.conftest import REPO, TINY_CTX, Mount, mounted
from tests.tinymodel import write_tiny_gguf

pytestmark = [pytest.mark.mount, pytest.mark.model]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "chat.gguf", n_ctx_train=TINY_CTX,
                           chat_template="chatml")


@pytest.fixture(scope="module")
def web(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, str]]:
    """A tree served over HTTP on loopback too, without keys: every request is root's."""
    port = free_port()
    with mounted(tmp_path_factory.mktemp("web"), chat_model, "--ctx", "16384", "--slots", "8",
                 "--http", str(port)) as m:
        yield m, f"http://127.0.0.1:{port}"


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def wait_for(check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_openai_package_completions_and_chat(web: tuple[Mount, str]) -> None:
    ax, url = web
    ai = client(url)
    assert [m.id for m in ai.models.list()] == ["chat"]
    whole = ai.completions.create(model="chat", prompt="The capital of France is", max_tokens=8,
                                  temperature=0, seed=7)
    assert whole.id.startswith("http-") and whole.choices[0].finish_reason == "length"
    status = ax.status(whole.id)
    assert status["state"] == "done" and status["uid"] == "0"
    assert whole.usage is not None and whole.usage.completion_tokens == 8 == int(status["generated_tokens"])
    assert ax.read(f"tasks/{whole.id}/stream") == whole.choices[0].text
    assert ax.read(f"tasks/{whole.id}/prompt") == "The capital of France is"
    config = ax.read(f"tasks/{whole.id}/config")
    assert "max_tokens 8\n" in config and "temperature 0\n" in config and "seed 7\n" in config
    # The same parameters and seed streamed give the same text, in pieces.
    pieces = [c.choices[0].text for c in ai.completions.create(
        model="chat", prompt="The capital of France is", max_tokens=8, temperature=0, seed=7,
        stream=True) if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == whole.choices[0].text
    # Chat: the conversation in the model's template, streamed with its usage at the end.
    messages: list[dict[str, str]] = [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"}]
    reply = ai.chat.completions.create(model="chat", messages=messages, max_tokens=6)  # type: ignore[arg-type]
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert ax.read(f"tasks/{reply.id}/prompt") == "system: Be brief.\n\nuser: Hi"
    assert "chat on" in ax.read(f"tasks/{reply.id}/config")
    chunks = list(ai.chat.completions.create(model="chat", messages=messages, max_tokens=6,  # type: ignore[arg-type]
                                             stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    # Each request went through the kernel's submission path: in the trace as tasks.
    trace = ax.read("trace")
    assert f"{reply.id} 0 submit prompt_tokens=" in trace and f"{chunks[0].id} 0 done " in trace


def test_output_format_and_schema(web: tuple[Mount, str]) -> None:
    ax, url = web
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    reply = client(url).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a number"}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert isinstance(json.loads(reply.choices[0].message.content or "")["n"], int)
    assert json.loads(ax.read(f"tasks/{reply.id}/schema")) == schema


def test_curl_reads_the_event_stream(web: tuple[Mount, str]) -> None:
    _, url = web
    body = json.dumps({"prompt": "one two", "max_tokens": 5, "stream": True})
    out = subprocess.run(["curl", "-sN", url + "/v1/completions", "-d", body], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    health = subprocess.run(["curl", "-s", url + "/health"], capture_output=True, text=True, timeout=30)
    assert json.loads(health.stdout) == {"status": "ok"}


def test_refusals_are_statuses_with_the_reason(web: tuple[Mount, str]) -> None:
    ax, url = web
    ai = client(url)
    before = set(ax.sh("ls tasks").stdout.split())
    with pytest.raises(openai.NotFoundError, match="no model named 'gpt-4'"):
        ai.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match=r"temperature 500.* is outside"):
        ai.completions.create(model="chat", prompt="hi", temperature=500)
    with pytest.raises(openai.BadRequestError, match="axfs does not support n 2"):
        ai.completions.create(model="chat", prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        ai.completions.create(model="chat", prompt="")
    assert set(ax.sh("ls tasks").stdout.split()) == before  # no draft left behind
    assert "temperature 500" in ax.read("users/0")  # recorded as a refused write is
    answer = httpx.post(url + "/v1/completions", content=b"{not json", timeout=30)
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing", timeout=30).status_code == 404


def token_rows(ax: Mount, task: str) -> list[tuple[float, list[float], str]]:
    """``tasks/ID/tokens`` of a task run with logprobs: each token's logprob, its
    alternatives' and its text (escaped: axfs.tokens)."""
    rows = []
    for line in ax.read(f"tasks/{task}/tokens").splitlines():
        _, _, logprob, _, alternatives, text = line.split("\t")
        rows.append((float(logprob), [float(a.split(":")[1]) for a in alternatives.split(",")], text))
    return rows


def answered(rows: list[tuple[float, list[float], str]], finish: str | None) -> \
        list[tuple[float, list[float], str]]:
    """The rows of the answer's tokens: not the end-of-generation token (no stop strings
    here: ``stop`` is the model's end)."""
    return rows[:-1] if finish == "stop" else rows


def close(a: float, b: float) -> bool:
    return abs(a - b) < 1e-4  # the tree writes 4 decimals


def test_completion_logprobs_are_the_tasks_token_records(web: tuple[Mount, str]) -> None:
    ax, url = web
    ai = client(url)
    prompt = "The capital of France is"
    whole = ai.completions.create(model="chat", prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    choice = whole.choices[0]
    assert "logprobs 3\n" in ax.read(f"tasks/{whole.id}/config")
    rows = answered(token_rows(ax, whole.id), choice.finish_reason)
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(rows) > 0
    for (logprob, alternatives, _), got, top in zip(rows, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert close(got, logprob)
        # The three likeliest (the greedy token first among them), by their texts.
        assert all(any(close(v, a) for a in alternatives) for v in top.values()) and len(top) <= 3
    offsets = lp.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(choice.text)
    # Streamed: the same tokens, each in the chunk whose text it begins, offsets running on.
    stream = list(ai.completions.create(model="chat", prompt=prompt, max_tokens=12, temperature=0,
                                       logprobs=3, stream=True))
    chunks = [c.choices[0] for c in stream if c.choices]
    streamed = [c.logprobs for c in chunks if c.logprobs is not None]
    assert len(streamed) > 2 and "".join(c.text for c in chunks) == choice.text
    assert [t for c in streamed for t in c.tokens or []] == lp.tokens
    assert [o for c in streamed for o in c.text_offset or []] == offsets
    rows = answered(token_rows(ax, stream[0].id), chunks[-1].finish_reason)
    values = [v for c in streamed for v in c.token_logprobs or []]
    assert all(close(a, b) for a, b in zip(values, [r[0] for r in rows], strict=True))


def test_chat_logprobs_are_the_tasks_token_records(web: tuple[Mount, str]) -> None:
    ax, url = web
    ai = client(url)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name a colour."}]
    reply = ai.chat.completions.create(model="chat", messages=messages, max_tokens=12,
                                       logprobs=True, top_logprobs=2)
    choice = reply.choices[0]
    assert "logprobs 2\n" in ax.read(f"tasks/{reply.id}/config")
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    rows = answered(token_rows(ax, reply.id), choice.finish_reason)
    assert len(content) == len(rows)
    for token, (logprob, alternatives, text) in zip(content, rows, strict=True):
        assert token.bytes is not None and escape(bytes(token.bytes)) == text
        assert close(token.logprob, logprob) and len(token.top_logprobs) == 2
        assert all(close(t.logprob, a) for t, a in zip(token.top_logprobs, alternatives, strict=True))
    said = b"".join(bytes(t.bytes or []) for t in content).decode("utf-8", "replace")
    assert said == choice.message.content
    # Streamed, without alternatives (top_logprobs 0: the tree keeps one).
    chunks = list(ai.chat.completions.create(model="chat", messages=messages, max_tokens=12,
                                             logprobs=True, stream=True))
    task = chunks[0].id
    assert "logprobs 1\n" in ax.read(f"tasks/{task}/config")
    content = [t for c in chunks if c.choices and c.choices[0].logprobs
               for t in c.choices[0].logprobs.content or []]
    rows = answered(token_rows(ax, task), chunks[-1].choices[0].finish_reason)
    assert len(content) == len(rows) > 0 and all(t.top_logprobs == [] for t in content)
    assert all(close(t.logprob, r[0]) for t, r in zip(content, rows, strict=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert b"".join(bytes(t.bytes or []) for t in content).decode("utf-8", "replace") == text


def test_sampler_settings_reach_the_tasks_config(web: tuple[Mount, str]) -> None:
    ax, url = web
    ai = client(url)
    reply = ai.completions.create(model="chat", prompt="one two", max_tokens=4, presence_penalty=0.5,
                                  frequency_penalty=0.25, extra_body={
                                      "min_p": 0.1, "repeat_penalty": 1.3, "repeat_last_n": 16})
    config = ax.read(f"tasks/{reply.id}/config")
    for line in ("min_p 0.1", "repeat_penalty 1.3", "repeat_last_n 16", "presence_penalty 0.5",
                 "frequency_penalty 0.25"):
        assert f"{line}\n" in config
    assert ax.status(reply.id)["state"] == "done"
    with pytest.raises(openai.BadRequestError, match=r"'repeat_penalty 0'\): 0 is not above 0"):
        ai.completions.create(model="chat", prompt="hi", extra_body={"repeat_penalty": 0})
    with pytest.raises(openai.BadRequestError, match=r"'logprobs 21'\): 21 is outside 0..20"):
        ai.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                   logprobs=True, top_logprobs=21)
    # A remote model has no logprobs to give (axfs computes them from llama.cpp's logits).
    ax.sh("mkdir models/far && echo 'endpoints http://127.0.0.1:9' > models/far/ctl")
    try:
        with pytest.raises(openai.BadRequestError, match="logprobs: model far is remote"):
            ai.completions.create(model="far", prompt="hi", logprobs=1)
    finally:
        ax.sh("rm -r models/far")


def test_a_killed_task_ends_its_stream_with_the_reason(web: tuple[Mount, str]) -> None:
    ax, url = web
    stream = client(url).completions.create(model="chat", prompt="go on", max_tokens=100000, stream=True)
    first = next(iter(stream))
    ax.sh(f"echo kill > tasks/{first.id}/ctl")
    with pytest.raises(openai.APIError, match=f"task {first.id} was killed"):
        for _ in stream:
            pass
    assert ax.status(first.id)["state"] == "killed"


def test_a_client_that_leaves_ends_its_task(web: tuple[Mount, str]) -> None:
    ax, url = web
    body = {"prompt": "go on", "max_tokens": 100000, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as answer:
        task = answer.headers["x-axfs-task"]
        lines = answer.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        assert ax.status(task)["state"] == "running"
        # axctl top, from the tree, shows it running among the others.
        top = subprocess.run([sys.executable, "-m", "tools.axctl", "--root", str(ax.path), "top",
                              "--once"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert any(line.startswith(task) and "running" in line for line in top.stdout.splitlines())
    wait_for(lambda: ax.status(task)["state"] == "killed")
    assert ax.read(f"tasks/{task}/error") == "the HTTP client closed the connection\n"
    assert "reason='the HTTP client closed the connection'" in ax.read("trace")
    # Not streamed: the same, while it waits for the whole answer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=1.5)
    task = sorted(ax.sh("ls tasks").stdout.split(), key=lambda t: int(t[5:]) if t[5:].isdigit() else 0)[-1]
    wait_for(lambda: ax.status(task)["state"] == "killed")


def test_an_unmount_ends_the_tasks_it_was_answering(tiny_model: Path, tmp_path: Path) -> None:
    """Nobody will read their answers: they end killed, and are not run again at the next
    mount (the journal keeps them so)."""
    port = free_port()
    with mounted(tmp_path, tiny_model, "--http", str(port)) as ax, httpx.Client(timeout=30) as http, \
            http.stream("POST", f"http://127.0.0.1:{port}/v1/completions",
                        json={"prompt": "go on", "max_tokens": 100000, "stream": True}) as answer:
        task = answer.headers["x-axfs-task"]
        lines = answer.iter_lines()
        next(lines)
        subprocess.run([sys.executable, "-m", "mount.cli", "umount", str(ax.path)], cwd=REPO,
                       check=True, timeout=90)
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    with mounted(tmp_path, tiny_model) as again:
        assert again.status(task)["state"] == "killed"
        assert again.read(f"tasks/{task}/error") == \
            "the HTTP server stopped (the tree was unmounted) while it ran\n"
