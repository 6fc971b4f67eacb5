"""Output that parses (issue 15): ``format json``, ``tasks/ID/schema`` and ``tasks/ID/grammar``
through a real mount with the tiny model, whose weights are random: only the grammar
sampler makes its text JSON."""

from __future__ import annotations

import errno
import json
import time

import pytest

from drivers import grammar
from tests.conftest import Mount

pytestmark = pytest.mark.mount

SCHEMA = {
    "type": "object",
    "properties": {
        "level": {"enum": ["info", "warn", "error"]},
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["level", "count", "ok", "tags"],
    "additionalProperties": False,
}


def valid(value: object) -> None:
    """``value`` validates against SCHEMA (jsonschema is not among the test dependencies)."""
    assert isinstance(value, dict) and set(value) == {"level", "count", "ok", "tags"}, value
    assert value["level"] in ("info", "warn", "error")
    assert isinstance(value["count"], int) and isinstance(value["ok"], bool)
    tags = value["tags"]
    assert isinstance(tags, list) and len(tags) <= 3
    assert all(isinstance(t, str) and len(t) <= 5 for t in tags)


def draft(ax: Mount, config: str) -> str:
    name = f"f{time.monotonic_ns()}"
    ax.sh(f"mkdir tasks/{name} && printf '{config}' > tasks/{name}/config")
    return name


def submit(ax: Mount, name: str) -> None:
    ax.sh(f"echo 'The log line says' > tasks/{name}/prompt")


def result(ax: Mount, name: str, timeout: float = 120) -> str:
    state = ax.wait_state(name, "done", "failed", timeout=timeout)
    assert state == "done", ax.read(f"tasks/{name}/error")
    return ax.read(f"tasks/{name}/stream")


def run(ax: Mount, name: str) -> str:
    submit(ax, name)
    return result(ax, name)


def test_format_json_output_parses_with_jq(ax: Mount) -> None:
    # The grammar lets the model end (eos) only once the object is whole. Random weights
    # can wander in a string past max_tokens (seed 1 took 549 tokens on the driver alone):
    # such a task ends by length, a prefix of JSON; most end within a few tokens.
    names = [draft(ax, f"format json\\ntemperature 1\\nseed {i}\\nmax_tokens 300\\n")
             for i in range(20)]
    for name in names:
        submit(ax, name)
    ended = 0
    for name in names:
        text = result(ax, name, timeout=300)
        if ax.status(name)["finish_reason"] == "length":
            continue
        assert ax.status(name)["finish_reason"] == "eos", text
        ended += 1
        parsed = ax.sh(f"jq -c . tasks/{name}/stream")
        assert isinstance(json.loads(parsed.stdout), dict)
    assert ended >= 15
    assert "format json" in ax.read(f"tasks/{names[0]}/config")


def test_a_schema_is_kept_and_its_output_validates(ax: Mount) -> None:
    for seed in range(10):
        name = draft(ax, f"temperature 1\\nseed {seed}\\nmax_tokens 400\\n")
        (ax.path / f"tasks/{name}/schema").write_text(json.dumps(SCHEMA))
        assert json.loads(ax.read(f"tasks/{name}/schema")) == SCHEMA
        assert "level-kv" in ax.read(f"tasks/{name}/grammar")  # the schema, converted
        valid(json.loads(run(ax, name)))


def test_a_grammar_is_matched_as_written(ax: Mount) -> None:
    name = draft(ax, "temperature 1\\nmax_tokens 50\\n")
    ax.sh(f"echo 'root ::= (\"yes\" | \"no\") \".\"' > tasks/{name}/grammar")
    assert run(ax, name) in ("yes.", "no.")


def test_a_fork_keeps_its_parents_constraint(ax: Mount) -> None:
    name = draft(ax, "temperature 1\\nmax_tokens 50\\n")
    ax.sh(f"echo 'root ::= [0-9] [0-9] \"!\"' > tasks/{name}/grammar")
    assert run(ax, name)[-1] == "!"
    child = ax.sh(f"exec 3<>tasks/{name}/fork; echo again >&3; cat <&3").stdout.strip()
    assert ax.wait_state(child, "done", "failed") == "done"
    text = ax.read(f"tasks/{child}/stream")
    assert len(text) == 3 and text[:2].isdigit() and text[2] == "!"


@pytest.mark.parametrize("file,text,reason", [
    ("grammar", "root ::= missing\n", "Undefined rule identifier 'missing'"),
    ("grammar", "start ::= \"a\"\n", "grammar does not compile"),
    ("schema", "{\"type\": \"object\",\n", "schema: not JSON"),
    ("schema", "{\"type\": \"nosuch\"}\n", "schema not supported"),
])
def test_a_bad_constraint_fails_its_close_and_the_prompt(ax: Mount, file: str, text: str,
                                                         reason: str) -> None:
    name = draft(ax, "max_tokens 5\\n")
    f = open(ax.path / f"tasks/{name}/{file}", "w")  # noqa: SIM115 (its close is the test)
    f.write(text)
    with pytest.raises(OSError) as bad:
        f.close()
    assert bad.value.errno == errno.EINVAL
    assert reason in ax.read(f"tasks/{name}/error")
    assert ax.read(f"tasks/{name}/{file}") == ""
    done = ax.sh(f"echo hi > tasks/{name}/prompt", check=False)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    assert reason in ax.read(f"tasks/{name}/error")
    ax.sh(f": > tasks/{name}/{file}; echo hi > tasks/{name}/prompt")  # emptied: no constraint
    assert ax.wait_state(name, "done") == "done"


def test_schema_and_grammar_are_read_only_once_submitted(ax: Mount) -> None:
    name = draft(ax, "max_tokens 2\\n")
    run(ax, name)
    done = ax.sh(f"echo 'root ::= \"a\"' > tasks/{name}/grammar", check=False)
    assert done.returncode != 0


def test_the_json_grammar_compiles() -> None:
    grammar.check(grammar.JSON)


def test_a_shell_sees_a_bad_schema_at_its_write(ax: Mount) -> None:
    name = draft(ax, "max_tokens 5\\n")
    done = ax.sh(f"echo '{{\"type\": \"nosuch\"}}' > tasks/{name}/schema; echo \"exit $?\"",
                 check=False)
    assert "exit 1" in done.stdout and "Invalid argument" in done.stderr
    assert "schema not supported" in ax.read(f"tasks/{name}/error")
    ax.sh(f"echo '{{\"enum\": [\"a\", \"b\"]}}' > tasks/{name}/schema")  # a good one clears it
    assert run(ax, name) in ('"a"', '"b"')
