"""The one parser of every ``ctl`` file (tasks/ID/ctl, models/NAME/ctl, replay/ID/ctl).

Each file's commands are a table of verbs and their arguments, in the manner of Plan 9's
``Cmdtab``: ``parse`` finds the verb and checks the number (and, where the row says,
the form) of its arguments, and every file refuses what it cannot parse with the same
words: ``FILE: cannot parse 'TEXT' (commands: VERB ARGS, ...)``, EINVAL. What an
argument means is the handler's (``FILE 'TEXT': why``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from axfs.errors import BadInput

SHOWN = 60  # characters of a refused line quoted in its message


@dataclass(slots=True, frozen=True)
class Verb:
    """One row: ``name``, how its arguments read in the usage (``N``, ``URL...``), how many
    it takes (``most`` None: any number), and a pattern each must match, if any."""

    name: str
    usage: str = ""
    least: int = 0
    most: int | None = 0
    pattern: re.Pattern[str] | None = None

    def takes(self, args: Sequence[str]) -> bool:
        if len(args) < self.least or (self.most is not None and len(args) > self.most):
            return False
        return self.pattern is None or all(self.pattern.fullmatch(a) for a in args)

    @property
    def help(self) -> str:
        return f"{self.name} {self.usage}" if self.usage else self.name


@dataclass(slots=True, frozen=True)
class Command:
    """A parsed line: its verb, its arguments, and where to say it was refused."""

    verb: str
    args: list[str]
    where: str  # "FILE 'TEXT'", the beginning of an argument's refusal


def parse(table: Sequence[Verb], file: str, text: str) -> Command:
    """The command ``text`` written to ``file`` is, by ``table``; BadInput if none."""
    words = text.split()
    shown = repr(text.strip()[:SHOWN])
    for verb in table:
        if words and words[0] == verb.name and verb.takes(words[1:]):
            return Command(verb.name, words[1:], f"{file} {shown}")
    usage = ", ".join(v.help for v in table)
    raise BadInput(f"{file}: cannot parse {shown} (commands: {usage})")
