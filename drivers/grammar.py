"""Constrained output: GBNF grammars for llama.cpp's grammar sampler, from a JSON Schema
or as written, checked before a task takes them.

llama.cpp compiles a grammar when its sampler is made (``llama_sampler_init_grammar``);
a grammar that does not compile gives no sampler, and the parser's reason goes to the
process's stderr, not to the log callback. ``check`` compiles a grammar without a model
(no vocabulary: a grammar naming tokens, ``<[id]>``, is refused) and takes that reason
from stderr while it runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable

import llama_cpp as lc
from llama_cpp import llama_grammar

JSON = llama_grammar.JSON_GBNF  # llama.cpp's grammars/json.gbnf: one JSON object
ROOT = b"root"
MAX_REASON = 300

_stderr_lock = threading.Lock()


class GrammarError(ValueError):
    """A grammar or a schema that does not compile; the message says why."""


def from_schema(text: str) -> str:
    """The GBNF grammar for the JSON Schema ``text`` (llama.cpp's converter)."""
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise GrammarError(f"not JSON: {e}") from e
    if not isinstance(schema, dict | bool):
        raise GrammarError("a JSON Schema is an object (or true)")
    try:
        grammar = str(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
    except Exception as e:  # the converter raises what it meets: KeyError, ValueError...
        raise GrammarError(f"schema not supported: {type(e).__name__}: {e}") from e
    check(grammar)
    return grammar


def check(grammar: str) -> None:
    """Compile ``grammar`` as llama.cpp will; GrammarError with llama.cpp's reason if not."""
    if not grammar.strip():
        raise GrammarError("the grammar is empty")
    if "\0" in grammar:
        raise GrammarError("the grammar contains a NUL byte")
    said, sampler = _with_stderr(lambda: lc.llama_sampler_init_grammar(
        None, grammar.encode("utf-8"), ROOT))
    if sampler:
        lc.llama_sampler_free(sampler)
        return
    lines = [line.strip() for line in said.splitlines() if "grammar" in line]
    reason = next((line.split("error parsing grammar:", 1)[1].strip()
                   for line in lines if "error parsing grammar:" in line), "")
    reason = reason or next((line for line in lines if "failed to parse" not in line), "")
    if not reason:
        reason = "no 'root' rule, or a rule that refers to itself first (left recursion)"
    raise GrammarError(f"grammar does not compile: {reason[:MAX_REASON]}")


def _with_stderr(call: Callable[[], object]) -> tuple[str, object]:
    """Run ``call`` with file descriptor 2 going to a file; (what was written, its result).
    What is not the grammar parser's is written on to the real stderr."""
    with _stderr_lock, tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            result = call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        said = f.read().decode("utf-8", "replace")
    if said and "grammar" not in said:
        sys.stderr.write(said)
    return said, result
