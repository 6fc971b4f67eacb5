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


def test_sampler_settings_and_logprobs_become_config_lines() -> None:
    ask = parse({"prompt": "x", "min_p": 0.1, "repeat_penalty": 1.2, "repeat_last_n": 32,
                 "presence_penalty": 0.5, "frequency_penalty": -0.25, "logprobs": 3},
                chat=False, models=MODELS)
    config = config_of(ask.config)
    assert (config.min_p, config.repeat_penalty, config.repeat_last_n, config.presence_penalty,
            config.frequency_penalty) == (0.1, 1.2, 32, 0.5, -0.25)
    assert ask.logprobs == 3 and config.logprobs == 3
    # The tree's 0 is off: an answer that shows no alternatives still keeps one.
    assert parse({"prompt": "x", "logprobs": 0}, chat=False, models=MODELS).logprobs == 0
    assert config_of(parse({"prompt": "x", "logprobs": 0}, chat=False, models=MODELS).config).logprobs == 1
    plain = parse({"prompt": "x", "logprobs": None}, chat=False, models=MODELS)
    assert plain.logprobs is None and "logprobs" not in plain.config
    said = [{"role": "user", "content": "Hi"}]
    chat = parse({"messages": said, "logprobs": True, "top_logprobs": 5}, chat=True, models=MODELS)
    assert chat.logprobs == 5 and config_of(chat.config).logprobs == 5
    assert parse({"messages": said, "logprobs": True}, chat=True, models=MODELS).logprobs == 0
    assert parse({"messages": said, "logprobs": False, "top_logprobs": 0}, chat=True,
                 models=MODELS).logprobs is None
    with pytest.raises(BadInput, match="top_logprobs: needs logprobs true"):
        parse({"messages": said, "top_logprobs": 2}, chat=True, models=MODELS)
    with pytest.raises(BadInput, match="logprobs: expected true or false"):
        parse({"messages": said, "logprobs": 2}, chat=True, models=MODELS)


@pytest.mark.parametrize(("body", "words"), [
    ({"repeat_penalty": 0}, "'repeat_penalty 0'.*is not above 0"),
    ({"min_p": 2}, "'min_p 2'.*outside"),
    ({"presence_penalty": float("inf")}, "'inf' is not a finite number"),
    ({"repeat_last_n": -1}, "'repeat_last_n -1'.*outside"),
    ({"logprobs": 21}, "'logprobs 21'.*outside 0..20"),
])
def test_out_of_range_settings_are_the_trees_to_refuse(body: dict[str, object], words: str) -> None:
    ask = parse({"prompt": "x", **body}, chat=False, models=MODELS)
    with pytest.raises(BadInput, match=words):
        config_of(ask.config)


@pytest.mark.parametrize(("body", "error", "words"), [
    ({"model": "gpt-4", "prompt": "x"}, NotFound, "no model named 'gpt-4' (models: big, tiny)"),
    ([], BadInput, "a JSON object"),
    ({"prompt": [1, 2]}, BadInput, "token ids are not taken"),
    ({"prompt": "x", "n": 3}, BadInput, "axfs does not support n 3"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, BadInput, "does not support logit_bias"),
    ({"prompt": "x", "logprobs": True}, BadInput, "logprobs: expected an integer"),
    ({"prompt": "x", "top_logprobs": 2}, BadInput, "a chat's parameter"),
    ({"prompt": "x", "repeat_last_n": 0.5}, BadInput, "repeat_last_n: expected an integer"),
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
