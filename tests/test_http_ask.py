"""An OpenAI request's body as the tree's parameters (axfs/http/ask.py), alone."""

from __future__ import annotations

import json

import pytest

from axfs.config import TaskConfig
from axfs.errors import BadInput, NotFound
from axfs.http.ask import parse

MODELS = {"tiny", "big"}


def config_of(text: str) -> TaskConfig:
    return TaskConfig().updated(text, MODELS)


def test_a_completion_becomes_config_lines() -> None:
    ask = parse({"model": "big", "prompt": ["Hello\n"], "max_tokens": 12, "temperature": 0,
                 "top_p": 0.5, "top_k": 3, "seed": 9, "stop": ["\n\n", " end "], "user": "x",
                 "presence_penalty": 0, "n": 1, "stream": True,
                 "stream_options": {"include_usage": True}}, chat=False, models=MODELS)
    assert ask.prompt == "Hello\n" and ask.stream and ask.include_usage and not ask.turns
    config = config_of(ask.config)
    assert (config.model, config.max_tokens, config.temperature, config.top_p, config.top_k,
            config.seed, config.chat) == ("big", 12, 0.0, 0.5, 3, 9, False)
    assert config.stop == ["\n\n", " end "]


def test_a_chat_becomes_turns() -> None:
    ask = parse({"messages": [{"role": "developer", "content": "Be brief."},
                              {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                 "max_completion_tokens": 4}, chat=True, models=MODELS)
    assert ask.turns == [("system", "Be brief."), ("user", "Hi")]
    assert ask.prompt == "system: Be brief.\n\nuser: Hi" and ask.model == ""
    config = config_of(ask.config)
    assert config.chat and config.max_tokens == 4
    single = parse({"messages": [{"role": "user", "content": "Hi"}]}, chat=True, models=MODELS)
    assert single.prompt == "Hi"


def test_a_reply_begun_is_continued_only_when_asked() -> None:
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    with pytest.raises(BadInput, match="set continue_final_message"):
        parse({"messages": turns}, chat=True, models=MODELS)
    ask = parse({"messages": turns, "continue_final_message": True, "add_generation_prompt": False},
                chat=True, models=MODELS)
    assert ask.turns[-1] == ("assistant", "Hel")


def test_output_formats() -> None:
    schema = {"type": "object"}
    assert "format json" in parse({"prompt": "x", "response_format": {"type": "json_object"}},
                                  chat=False, models=MODELS).config
    ask = parse({"prompt": "x", "response_format": {"type": "json_schema",
                                                    "json_schema": {"name": "s", "schema": schema}}},
                chat=False, models=MODELS)
    assert json.loads(ask.schema) == schema and "format" not in ask.config
    assert parse({"prompt": "x", "grammar": "root ::= \"a\""}, chat=False, models=MODELS).grammar
    with pytest.raises(BadInput, match="not both"):
        parse({"prompt": "x", "grammar": "root ::= \"a\"", "json_schema": schema}, chat=False,
              models=MODELS)


@pytest.mark.parametrize(("body", "error", "words"), [
    ({"model": "gpt-4", "prompt": "x"}, NotFound, "no model named 'gpt-4' (models: big, tiny)"),
    ([], BadInput, "a JSON object"),
    ({"prompt": [1, 2]}, BadInput, "token ids are not taken"),
    ({"prompt": "x", "n": 3}, BadInput, "axfs does not support n 3"),
    ({"prompt": "x", "frequency_penalty": 0.5}, BadInput, "does not support frequency_penalty"),
    ({"prompt": "x", "logprobs": 2}, BadInput, "does not support logprobs"),
    ({"prompt": "x", "max_tokens": 1.5}, BadInput, "max_tokens: expected an integer"),
    ({"prompt": "x", "temperature": "hot"}, BadInput, "temperature: expected a number"),
    ({"prompt": "x", "stop": [1]}, BadInput, "stop: expected a string"),
    ({"prompt": "x", "stream": "yes"}, BadInput, "stream: expected true or false"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, BadInput, "response_format"),
])
def test_bad_requests_say_why(body: object, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse(body, chat=False, models=MODELS)


@pytest.mark.parametrize(("messages", "words"), [
    ([], "a list"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\]: expected a role"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\].content: expected text"),
])
def test_bad_conversations_say_why(messages: object, words: str) -> None:
    with pytest.raises(BadInput, match=words):
        parse({"messages": messages}, chat=True, models=MODELS)
