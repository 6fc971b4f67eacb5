"""The config file's format: parse, validate, render, round trip."""

from __future__ import annotations

import pytest

from axfs.config import TaskConfig, escape
from axfs.errors import BadInput

MODELS = {"m"}


def test_defaults_render_every_key() -> None:
    text = TaskConfig(model="m").render()
    keys = [line.split(" ", 1)[0] for line in text.splitlines()]
    assert keys == ["model", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
                    "priority", "chat", "format", "deadline"]


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
