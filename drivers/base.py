"""The interface every runtime driver implements.

The kernel (axfs) plans a step; a driver runs it. A step is a list of pieces, each
feeding some tokens of one sequence at given positions; pieces that ask for a sample
get the next token back. Everything here is plain data so that the scheduler and the
tests never touch model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class DriverError(Exception):
    """A driver could not do what was asked (the message says why, in words)."""


class ModelLoadError(DriverError):
    """The model file could not be loaded."""


class StepAborted(DriverError):
    """``abort`` stopped the step; the sequences are as they were before it."""


@dataclass(slots=True, frozen=True)
class Sampling:
    """How one sequence picks its next token. temperature 0 means greedy. The defaults
    leave out what they can (no min-p, no penalties); llama-server's are axfs.config's."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0
    grammar: str = ""  # GBNF the output must match (drivers.grammar); "": none
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # tokens the penalties look back over
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # The sequence's last tokens so far (at most repeat_last_n), which the penalties count
    # as seen from the start, as llama-server counts the prompt: set only when penalized.
    recent: tuple[int, ...] = ()
    logprobs: int = 0  # > 0: each sampled token's record with this many alternatives

    @property
    def penalized(self) -> bool:
        """Whether the penalties change anything (llama.cpp's own test for a no-op)."""
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                            or self.frequency_penalty != 0.0)


@dataclass(slots=True)
class Piece:
    """Tokens of one sequence fed in one step, starting at position ``pos``."""

    seq: int
    tokens: list[int]
    pos: int
    sample: bool


@dataclass(slots=True)
class ModelInfo:
    """What the model file says about itself, shown in models/<name>/info."""

    name: str
    path: str
    architecture: str
    description: str
    parameters: int
    size_bytes: int
    context_length: int
    vocab_size: int
    device: str
    extra: dict[str, str] = field(default_factory=dict)
    # Whether a task's tokens depend only on the model file, prompt, parameters and seed,
    # never on what else shares its steps (drivers.determinism)
    deterministic: bool = False


@dataclass(slots=True)
class SeqState:
    """A sequence set aside: its sampler (with its random state) and, when kept, its KV.

    ``kv`` is opaque to everyone but the driver that made it; ``kv_bytes`` is its size.
    """

    sampler: object
    kv: object | None
    kv_bytes: int


@dataclass(slots=True, frozen=True)
class ContextShape:
    """The shape of the runtime context a driver opened."""

    n_ctx: int  # KV cells in all, shared by every sequence
    n_seq_max: int  # sequence slots
    n_batch: int  # most tokens one step may carry
    cell_bytes: int  # bytes of KV per cell (all layers, K and V)


class Driver(Protocol):
    """A loaded model with one context that runs batched steps.

    Calls that touch the context (``open_seq``, ``close_seq``, ``step``) are made
    by one thread at a time; ``tokenize`` and ``piece`` only read the vocabulary.
    """

    info: ModelInfo
    shape: ContextShape

    def tokenize(self, text: str, bos: bool = True, *, special: bool = False) -> list[int]:
        """``text`` as tokens, beginning with the model's BOS token if it uses one and
        ``bos`` (a text that continues another takes none). With ``special``, the
        special and control tokens written in the text (``<start_of_turn>`` in a chat
        template's output) become those tokens; without, they are plain text."""
        ...

    def piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def open_seq(self, seq: int, sampling: Sampling) -> None:
        """Give sequence ``seq`` a new sampler; its KV cells are left as they are."""
        ...

    def close_seq(self, seq: int) -> None:
        """Clear sequence ``seq``: its sampler and its KV cells."""
        ...

    def copy_seq(self, src: int, dst: int, n: int) -> None:
        """Make the empty sequence ``dst`` hold the first ``n`` cells of ``src`` (shared,
        not duplicated, where the runtime can)."""
        ...

    def trim_seq(self, seq: int, n: int) -> None:
        """Keep only the first ``n`` cells of sequence ``seq``."""
        ...

    def seq_cells(self, seq: int) -> int:
        """Cells the runtime says sequence ``seq`` holds."""
        ...

    def save_seq(self, seq: int, keep_kv: bool) -> SeqState:
        """Take sequence ``seq`` out of the context (its slot is then free), keeping its
        sampler and, with ``keep_kv``, a copy of its KV cells."""
        ...

    def restore_seq(self, seq: int, state: SeqState) -> None:
        """Put a saved sequence back, into the empty slot ``seq`` (which may differ from
        before); a state without KV brings back only the sampler."""
        ...

    def step(self, pieces: list[Piece]) -> dict[int, int]:
        """Run one batch; return the sampled token for every piece with ``sample``."""
        ...

    def token_records(self) -> dict[int, bytes]:
        """After ``step``: for each sequence opened with ``logprobs`` that sampled a
        token, that token's record (drivers.logprobs)."""
        ...

    def abort(self, stop: bool = True) -> None:
        """From another thread: make the step running now, or the next one, stop and
        raise StepAborted; ``abort(False)`` withdraws the request."""
        ...

    def close(self) -> None: ...
