"""A task's generated tokens as a script reads them: ``tasks/ID/tokens``, and the
confidence lines of its ``status``.

``tokens`` has a line a generated token, its fields separated by tabs:

  INDEX ID TEXT                                  without logprobs
  INDEX ID LOGPROB ENTROPY ALTERNATIVES TEXT     with ``config logprobs N``

INDEX counts from 0. ID is the token's id (-1 for a remote task, whose pieces of text
are counted as tokens). LOGPROB is the token's natural log-probability and ENTROPY that
of the distribution it was drawn from, in nats (drivers.logprobs says which
distribution: llama-server's). ALTERNATIVES are the N likeliest tokens, likeliest first,
``ID:LOGPROB`` separated by commas. TEXT is the token's bytes with ``\\`` tab newline
and carriage return written ``\\\\ \\t \\n \\r``, other control characters and bytes that
are not UTF-8 ``\\xHH``, and the characters other programs take as line ends (U+0085,
U+2028, U+2029) ``\\uHHHH``: TEXT is always the last field, and a line is one line. It
is empty for a remote task, and while the task's model is not loaded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from axfs.task import Task
from drivers import logprobs

STATS = ("mean_logprob", "min_logprob", "mean_entropy")

_ESCAPES: dict[int, str] = {ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n",
                            ord("\r"): "\\r"}
_ESCAPES.update({c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if c not in _ESCAPES})
_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x2028, 0x2029)})
# surrogateescape decodes a byte that is not UTF-8 as U+DC80..U+DCFF
_ESCAPES.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})


def escape(piece: bytes) -> str:
    """A token's bytes as one tab-free line (see the module's docstring)."""
    return piece.decode("utf-8", "surrogateescape").translate(_ESCAPES)


def render(task: Task, piece: Callable[[int], bytes] | None) -> str:
    """The text of ``tasks/ID/tokens``; ``piece``: a token's bytes (None: not known now)."""
    def text(token: int) -> str:
        return escape(piece(token)) if piece is not None and token >= 0 else ""

    n = task.config.logprobs
    if not n:
        return "".join(f"{i}\t{t}\t{text(t)}\n" for i, t in enumerate(task.output_tokens))
    rows = logprobs.read(task.records, n)
    lps, entropies = rows["logprob"].tolist(), rows["entropy"].tolist()
    ids, alt_lps = rows["ids"].tolist(), rows["logprobs"].tolist()
    lines = []
    for i, token in enumerate(task.output_tokens):
        if i < len(lps):
            alts = ",".join(f"{a}:{lp:.4f}" for a, lp in zip(ids[i], alt_lps[i], strict=True))
            stats = f"{lps[i]:.4f}\t{entropies[i]:.4f}\t{alts}"
        else:  # a token whose record was not kept
            stats = "-\t-\t-"
        lines.append(f"{i}\t{token}\t{stats}\t{text(token)}\n")
    return "".join(lines)


def stats(task: Task) -> list[tuple[str, str]]:
    """``status``'s confidence lines for a task run with logprobs (none for others):
    the mean and least log-probability of its tokens, and their mean entropy."""
    n = task.config.logprobs
    if not n:
        return []
    rows = logprobs.read(task.records, n)
    if not len(rows):
        return [(k, "-") for k in STATS]
    lp = rows["logprob"].astype(np.float64)
    values = (lp.mean(), lp.min(), rows["entropy"].astype(np.float64).mean())
    return [(k, f"{v:.4f}") for k, v in zip(STATS, values, strict=True)]


def records_after(task: Task, n: int) -> bytes:
    """The records of the tokens generated after the first ``n``."""
    return bytes(task.records[n * logprobs.row_size(task.config.logprobs):])


def keep(task: Task, n: int) -> None:
    """Keep the records of the first ``n`` generated tokens only."""
    del task.records[n * logprobs.row_size(task.config.logprobs):]
