"""A task's timeline (replay/ID/timeline) as typed entries, and why a task finished.

An entry is a ``Mark`` (one event: admitted, preempted, first token...) or a ``Steps``
(consecutive steps of one kind the task ran in, counted as they come: the engine adds
to the last one each step, so it stays one object updated in place, not a new entry
per token). The journal keeps entries as ``[ms, kind, {details}]`` (``record`` and
``entry``), the form it always had.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from axfs.trace import Event


class Finish(enum.StrEnum):
    """Why a task ended (its status's ``finish_reason``)."""

    EOS = "eos"  # the model's end-of-generation token
    STOP = "stop"  # a stop string (or a remote engine's own end)
    LENGTH = "length"  # max_tokens
    CONTEXT = "context"  # the task's context is full
    KILLED = "killed"
    DEADLINE = "deadline"  # its config's deadline came (axfs.deadlines)
    ERROR = "error"


GENERATED = frozenset({Finish.EOS, Finish.STOP, Finish.LENGTH, Finish.CONTEXT})  # ran to its end


class StepKind(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


PREFILL, DECODE = StepKind.PREFILL, StepKind.DECODE  # the engine's per-step names, looked up once


@dataclass(slots=True)
class Mark:
    """Event ``kind`` happened ``at`` ms after submission."""

    at: float
    kind: Event
    details: dict[str, object]

    def record(self) -> list[Any]:
        return [self.at, self.kind.value, self.details]


@dataclass(slots=True)
class Steps:
    """From ``at`` to ``until_ms`` ms after submission, ``steps`` steps of ``kind`` in a
    row, ``tokens`` tokens of this task in all, in batches of ``batch_min..batch_max``."""

    at: float
    kind: StepKind
    until_ms: float
    steps: int
    tokens: int
    batch_min: int
    batch_max: int

    def record(self) -> list[Any]:
        return [self.at, self.kind.value, {"until_ms": self.until_ms, "steps": self.steps,
                                           "tokens": self.tokens, "batch_min": self.batch_min,
                                           "batch_max": self.batch_max}]


Entry = Mark | Steps


def entry(record: list[Any]) -> Entry:
    """An entry back from its journal ``record``."""
    at, kind, details = record
    if kind in (PREFILL, DECODE):
        return Steps(at, StepKind(kind), details["until_ms"], details["steps"], details["tokens"],
                     details["batch_min"], details["batch_max"])
    return Mark(at, Event(kind), dict(details))
