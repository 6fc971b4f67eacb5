"""A task's parameters: the ``config`` file's flat ``key value`` lines.

The lines written through one open file are one change (see axfs.fs.edits): each is
checked as it arrives and all apply together when the file is closed, so a bad line
changes nothing. The key and its value are separated by any white space; numbers are
plain ASCII digits (with a sign, and for real numbers a point and an exponent).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from axfs.errors import BadInput
from drivers import grammar as grammars
from drivers.base import Sampling

MAX_STOPS = 8
MAX_STOP_LEN = 256


@dataclass(slots=True)
class TaskConfig:
    """Sampling and scheduling parameters, copied into a task when it is submitted."""

    model: str = ""
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    seed: int = -1  # -1: a random seed is drawn at submission and shown here
    stop: list[str] = field(default_factory=list)
    priority: int = 100
    chat: bool = False  # the prompt goes through the model's chat template
    format: str = "text"  # "json": the output is one JSON object (llama.cpp's JSON grammar)
    deadline: float = 0.0  # seconds from submission; 0: none (see axfs.deadlines)
    # Written to tasks/ID/schema or tasks/ID/grammar, not to config: the GBNF the output
    # must match (a schema's converted) and the schema it came from.
    grammar: str = ""
    schema: str = ""

    def copy(self) -> TaskConfig:
        return dataclasses.replace(self, stop=list(self.stop))

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        seed=self.seed, grammar=self.output_grammar)

    @property
    def output_grammar(self) -> str:
        """The GBNF the output must match: the task's own, else JSON's for ``format json``."""
        return self.grammar or (grammars.JSON if self.format == "json" else "")

    def fix_seed(self) -> None:
        if self.seed < 0:
            self.seed = random.randrange(2**31)

    def render(self) -> str:
        lines = [
            f"model {self.model}",
            f"max_tokens {self.max_tokens}",
            f"temperature {self.temperature:g}",
            f"top_k {self.top_k}",
            f"top_p {self.top_p:g}",
            f"seed {self.seed}",
        ]
        lines += [f"stop {escape(s)}" for s in self.stop] or ["stop"]
        lines.append(f"priority {self.priority}")
        lines.append(f"chat {'on' if self.chat else 'off'}")
        lines.append(f"format {self.format}")
        lines.append(f"deadline {self.deadline:g}")
        return "\n".join(lines) + "\n"

    def updated(self, text: str, models: set[str], where: str = "config") -> TaskConfig:
        """A copy with the ``key value`` lines of ``text`` applied; BadInput if any is bad
        (its message begins with ``where`` and the line's number)."""
        new = self.copy()
        stops: list[str] | None = None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, value = [*line.split(None, 1), ""][:2]
            at = f"{where} line {n} ({line[:60]!r})"
            if key == "stop":
                stops = [] if stops is None else stops
                if value:
                    stops.append(_parse_stop(value, at))
                continue
            if key == "model":
                if value not in models:
                    known = ", ".join(sorted(models)) or "none"
                    raise BadInput(f"{at}: no model named {value!r} (models: {known})")
                new.model = value
                continue
            parse = _PARSERS.get(key)
            if parse is None:
                raise BadInput(f"{at}: unknown key {key!r} (keys: {', '.join(KEYS)})")
            setattr(new, key, parse(value, at))
        if stops is not None:
            if len(stops) > MAX_STOPS:
                raise BadInput(f"{where}: at most {MAX_STOPS} stop strings")
            new.stop = stops
        return new


T = TypeVar("T", int, float)
# What int() and float() accept beyond these (1_000, Unicode digits, " 5") is refused.
_INTEGER = re.compile(r"[-+]?[0-9]+")
_REAL = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|[-+]?(inf|infinity|nan)",
                   re.IGNORECASE)


def _number(kind: type[T], lo: T, hi: T) -> Callable[[str, str], T]:
    pattern = _INTEGER if kind is int else _REAL

    def parse(value: str, where: str) -> T:
        try:
            if not pattern.fullmatch(value):
                raise ValueError(value)
            v = kind(value)
        except ValueError:
            kind_name = "an integer" if kind is int else "a number"
            raise BadInput(f"{where}: {value!r} is not {kind_name}") from None
        if not lo <= v <= hi:  # also rejects nan
            raise BadInput(f"{where}: {value} is outside {lo}..{hi}")
        return v

    return parse


def _switch(value: str, where: str) -> bool:
    if value not in ("on", "off"):
        raise BadInput(f"{where}: {value!r} is not on or off")
    return value == "on"


def _format(value: str, where: str) -> str:
    if value not in ("text", "json"):
        raise BadInput(f"{where}: {value!r} is not text or json")
    return value


_PARSERS: dict[str, Callable[[str, str], object]] = {
    "max_tokens": _number(int, 1, 1_000_000),
    "temperature": _number(float, 0.0, 100.0),
    "top_k": _number(int, 0, 1_000_000),
    "top_p": _number(float, 0.0, 1.0),
    "seed": _number(int, -1, 2**32 - 1),
    "priority": _number(int, 1, 10_000),
    "chat": _switch,
    "format": _format,
    "deadline": _number(float, 0.0, 31_536_000.0),
}
KEYS = ("model", *_PARSERS, "stop")


def parse_setting(key: str, value: str, where: str) -> object:
    """One numeric or on/off setting's value (``ctl``'s ``priority N``); BadInput why not."""
    return _PARSERS[key](value, where)

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r", "s": " "}


def escape(s: str) -> str:
    """A stop string as written in config: backslash escapes, spaces at the ends as \\s."""
    body = "".join(_ESCAPES.get(c, c) for c in s)
    lead = len(body) - len(body.lstrip(" "))
    trail = len(body) - len(body.rstrip(" "))
    if lead == len(body):
        return "\\s" * lead
    return "\\s" * lead + body.strip(" ") + "\\s" * trail


def _parse_stop(value: str, where: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            if nxt not in _UNESCAPES:
                raise BadInput(f"{where}: unknown escape \\{nxt} (use \\n \\t \\r \\s \\\\)")
            out.append(_UNESCAPES[nxt])
        else:
            out.append(c)
    stop = "".join(out)
    if len(stop) > MAX_STOP_LEN:
        raise BadInput(f"{where}: a stop string is at most {MAX_STOP_LEN} characters")
    return stop
