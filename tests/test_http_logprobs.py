"""A task's token records as OpenAI's logprobs (axfs/http/logprobs.py), alone: a task fed
tokens as the engine feeds them, without a model."""

from __future__ import annotations

from axfs.config import TaskConfig
from axfs.http.logprobs import Logprobs
from axfs.task import State, Task
from axfs.timeline import Finish
from drivers import logprobs

# "€" is e2 82 ac: token 3 ends with its first byte, token 4 has the rest.
PIECES = {1: b"Hel", 2: b"lo", 3: b" \xe2", 4: b"\x82\xac", 5: b" E", 6: b"ND", 8: b"x", 9: b""}
EOS = 9


def piece(token: int) -> bytes:
    return PIECES[token]


def fed(tokens: list[int], stop: list[str]) -> tuple[Task, list[int]]:
    """A task given ``tokens`` (the last ends it: eos, a stop string or max_tokens), each
    with a record (logprob -token/4, alternatives the token and 8), and the length of its
    answer after each token."""
    task = Task("t", 0, 0, TaskConfig(logprobs=2, stop=stop, max_tokens=len(tokens)))
    published = []
    for token in tokens:
        task.records += logprobs.record(-token / 4, 1.0, [token, 8], [-token / 4, -2.0])
        task.add_token(token, piece(token), token == EOS, False)
        published.append(len(task.output))
    return task, published


def test_a_completion_has_the_tokens_of_its_text_up_to_a_stop_string() -> None:
    task, _ = fed([1, 2, 3, 4, 5, 6], stop=["END"])
    assert task.output.decode() == "Hello € " and task.finish_reason is Finish.STOP
    answer = Logprobs(task, chat=False, top=1).take(len(task.output), piece)
    # Token 5 (" E") begins in the answer; 6 ("ND", the rest of the stop string) does not.
    assert answer["tokens"] == ["Hel", "lo", " \\xe2", "\\x82\\xac", " E"]
    assert answer["token_logprobs"] == [-t / 4 for t in (1, 2, 3, 4, 5)]
    assert answer["text_offset"] == [0, 3, 5, 6, 7]
    # The one alternative asked, and the sampled token, with their logprobs.
    assert answer["top_logprobs"][0] == {"Hel": -0.25}
    assert len(answer["top_logprobs"]) == 5


def test_a_chat_has_bytes_and_alternatives_and_no_eos() -> None:
    task, _ = fed([1, 2, EOS], stop=[])
    assert task.state is State.DONE and task.finish_reason is Finish.EOS
    answer = Logprobs(task, chat=True, top=2).take(len(task.output), piece)
    assert answer == {"content": [
        {"token": "Hel", "logprob": -0.25, "bytes": list(b"Hel"), "top_logprobs": [
            {"token": "Hel", "logprob": -0.25, "bytes": list(b"Hel")},
            {"token": "x", "logprob": -2.0, "bytes": [120]}]},
        {"token": "lo", "logprob": -0.5, "bytes": list(b"lo"), "top_logprobs": [
            {"token": "lo", "logprob": -0.5, "bytes": list(b"lo")},
            {"token": "x", "logprob": -2.0, "bytes": [120]}]}]}


def test_streamed_chunks_carry_each_token_once_as_its_text_comes() -> None:
    """Taken after each token, as a stream takes them, the tokens are those of the whole
    answer, each in the chunk where its text begins (a half character waits for the rest)."""
    task, published = fed([1, 2, 3, 4, 5, 6], stop=["END"])
    stream = Logprobs(task, chat=False, top=1)
    chunks = [stream.take(n, piece)["tokens"] for n in published]
    assert published == [3, 5, 6, 9, 10, 10]
    assert chunks == [["Hel"], ["lo"], [" \\xe2"], ["\\x82\\xac"], [" E"], []]
    whole = Logprobs(task, chat=False, top=1).take(len(task.output), piece)
    assert [t for chunk in chunks for t in chunk] == whole["tokens"]


def test_no_model_no_logprobs() -> None:
    task, _ = fed([1, 2], stop=[])
    assert Logprobs(task, chat=True, top=1).take(len(task.output), None) == {"content": []}
