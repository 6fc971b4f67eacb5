"""A task's token records (``config logprobs N``: axfs.tokens, drivers.logprobs) as
OpenAI's ``logprobs``, for the whole answer or for the tokens of each streamed chunk:

- a completion's ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, lists
  with an entry a token; ``top_logprobs`` maps the likeliest tokens' texts to their
  logprobs, the sampled token's among them (OpenAI's "up to logprobs + 1"), and
  ``text_offset`` is where the token's text begins in the answer, in characters;
- a chat's ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}]}``.

The tokens are those whose text begins in the answer: not the end-of-generation token,
nor those of a stop string the answer was cut before (llama-server leaves these out
too). A token's text has its bytes that are not UTF-8 (half a character) written
``\\xHH``; ``bytes`` has them as they are. The log-probabilities are the
model's own, before sampling (drivers/logprobs.py), as llama-server and OpenAI report.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from axfs import tokens
from axfs.task import Task
from axfs.timeline import Finish
from drivers import logprobs

Piece = Callable[[int], bytes]  # a token's bytes (Kernel.piece_of)


class Logprobs:
    """The logprobs of ``task``'s answer (a ``chat``'s or a completion's), each token
    taken once, as its text is published; ``top``: the alternatives shown a token (at
    most the task's ``config logprobs``)."""

    def __init__(self, task: Task, chat: bool, top: int) -> None:
        self.task = task
        self.chat = chat
        self.top = top
        self.num_taken = 0  # tokens reported so far
        self.num_bytes = 0  # bytes of the answer before the next token
        self.num_chars = 0  # characters of the answer before it (text_offset)
        # Decodes the tokens as the task does (axfs.task), so that byte counts agree.
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, published: int, piece: Piece | None) -> dict[str, Any]:
        """The logprobs of the tokens not yet taken whose text begins in the first
        ``published`` bytes of the answer (none while the model is not loaded: ``piece``
        None)."""
        taken = self._taken(published, piece) if piece is not None else []
        if self.chat:
            return {"content": [{**_token(t.text, t.logprob), "top_logprobs": [
                _token(a, alp) for a, alp in t.alternatives]} for t in taken]}
        return {"tokens": [_text(t.text) for t in taken],
                "token_logprobs": [t.logprob for t in taken],
                "top_logprobs": [_likeliest(t) for t in taken],
                "text_offset": [t.offset for t in taken]}

    def _taken(self, published: int, piece: Piece) -> list[Token]:
        task = self.task
        rows = logprobs.read(tokens.records_after(task, self.num_taken), task.config.logprobs)
        last = len(task.output_tokens) - (task.finish_reason is Finish.EOS)
        lps = rows["logprob"].tolist()
        ids, alt_lps = rows["ids"][:, :self.top].tolist(), rows["logprobs"][:, :self.top].tolist()
        taken: list[Token] = []
        for i in range(len(rows)):
            if self.num_taken + i >= last or self.num_bytes >= published:
                break
            text = piece(task.output_tokens[self.num_taken + i])
            alternatives = [(piece(a), alp) for a, alp in zip(ids[i], alt_lps[i], strict=True)]
            taken.append(Token(text, self.num_chars, lps[i], alternatives))
            decoded = self._decoder.decode(text)
            self.num_bytes += len(decoded.encode())
            self.num_chars += len(decoded)
        self.num_taken += len(taken)
        return taken


@dataclass(slots=True)
class Token:
    """A token of the answer: its bytes, where its text begins (characters), its logprob
    and the likeliest tokens' bytes with theirs."""

    text: bytes
    offset: int
    logprob: float
    alternatives: list[tuple[bytes, float]]


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", "backslashreplace")


def _token(piece: bytes, logprob: float) -> dict[str, Any]:
    return {"token": _text(piece), "logprob": logprob, "bytes": list(piece)}


def _likeliest(token: Token) -> dict[str, float]:
    top = {_text(a): alp for a, alp in token.alternatives}
    top.setdefault(_text(token.text), token.logprob)
    return top
