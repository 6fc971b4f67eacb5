"""The config file's format: parse, validate, render, round trip."""

from __future__ import annotations

import pytest

from axfs.config import TaskConfig, escape
from axfs.errors import BadInput
from axfs.task import Task

MODELS = {"m"}


def test_defaults_render_every_key() -> None:
    text = TaskConfig(model="m").render()
    keys = [line.split(" ", 1)[0] for line in text.splitlines()]
    assert keys == ["model", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
                    "priority", "chat", "format", "deadline", "min_p", "repeat_penalty",
                    "repeat_last_n", "presence_penalty", "frequency_penalty", "logprobs"]


def test_sampler_settings_have_llama_servers_defaults_and_reach_sampling() -> None:
    c = TaskConfig(model="m")
    assert (c.min_p, c.repeat_penalty, c.repeat_last_n, c.presence_penalty,
            c.frequency_penalty, c.logprobs) == (0.05, 1.0, 64, 0.0, 0.0, 0)
    assert not c.sampling().penalized
    text = ("min_p 0.1\nrepeat_penalty 1.3\nrepeat_last_n 100000\npresence_penalty -0.5\n"
            "frequency_penalty 2\nlogprobs 20\n")
    c = c.updated(text, MODELS)
    s = c.sampling()
    assert (s.min_p, s.repeat_penalty, s.repeat_last_n, s.presence_penalty,
            s.frequency_penalty, s.logprobs) == (0.1, 1.3, 100000, -0.5, 2.0, 20)
    assert s.penalized and TaskConfig(model="m").updated(c.render(), MODELS) == c
    assert not c.updated("repeat_last_n 0", MODELS).sampling().penalized


def test_a_tasks_sampling_counts_its_recent_tokens_for_the_penalties() -> None:
    task = Task("1", 0, 0, TaskConfig(model="m").updated("repeat_last_n 3\n", MODELS))
    task.prompt_tokens, task.output_tokens = [1, 2, 3, 4], [5]
    assert task.sampling().recent == ()  # no penalty: nothing to count
    task.config.repeat_penalty = 1.1
    assert task.sampling().recent == (3, 4, 5)
    task.config.repeat_last_n = 99
    assert task.sampling().recent == (1, 2, 3, 4, 5)


def test_format_and_deadline_parse_and_round_trip() -> None:
    c = TaskConfig(model="m").updated("format json\ndeadline 2.5\n", MODELS)
    assert c.format == "json" and c.deadline == 2.5 and c.sampling().grammar
    assert TaskConfig(model="m").updated(c.render(), MODELS) == c
    assert not TaskConfig(model="m").sampling().grammar
    for bad in ("format yaml", "deadline -1", "deadline soon"):
        with pytest.raises(BadInput):
            TaskConfig(model="m").updated(bad, MODELS)


def test_update_sets_named_keys_only() -> None:
    c = TaskConfig(model="m").updated("max_tokens 5\ntemperature 0\n", MODELS)
    assert (c.max_tokens, c.temperature, c.top_k) == (5, 0.0, 40)


def test_render_round_trips_through_updated() -> None:
    c = TaskConfig(model="m", stop=["\n\n", " end", "a\\b\tc"], seed=7, top_p=0.5)
    again = TaskConfig(model="m").updated(c.render(), MODELS)
    assert again == c


def test_stop_lines_accumulate_within_a_write_and_replace_across_writes() -> None:
    c = TaskConfig(model="m").updated("stop x\nstop \\n\n", MODELS)
    assert c.stop == ["x", "\n"]
    assert c.updated("stop y", MODELS).stop == ["y"]
    assert c.updated("stop", MODELS).stop == []


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("colour red", "unknown key 'colour'"),
        ("max_tokens ten", "not an integer"),
        ("max_tokens 0", "outside 1..1000000"),
        ("max_tokens 99999999999999999999", "outside"),
        ("temperature nan", "outside"),
        ("top_p 1.5", "outside 0.0..1.0"),
        ("model other", "no model named 'other'"),
        ("stop \\q", "unknown escape"),
        ("logprobs 21", "outside 0..20"),
        ("logprobs -1", "outside 0..20"),
        ("min_p 1.5", "outside 0.0..1.0"),
        ("repeat_penalty 0", "not above 0"),
        ("repeat_penalty -1", "not above 0"),
        ("repeat_penalty inf", "not a finite number"),
        ("presence_penalty nan", "not a finite number"),
        ("frequency_penalty 1e39", "not a finite number"),
        ("frequency_penalty x", "not a finite number"),
        ("repeat_last_n -1", "outside 0..2147483647"),
    ],
)
def test_bad_lines_are_refused_with_the_reason(text: str, words: str) -> None:
    with pytest.raises(BadInput, match=words):
        TaskConfig(model="m").updated(f"max_tokens 3\n{text}\n", MODELS)


def test_a_bad_line_changes_nothing() -> None:
    c = TaskConfig(model="m")
    with pytest.raises(BadInput):
        c.updated("max_tokens 3\nbogus 1", MODELS)
    assert c.max_tokens == 256


def test_escape_keeps_edge_spaces_visible() -> None:
    assert escape(" end ") == "\\send\\s"
    assert escape("  ") == "\\s\\s"
