"""Batch-invariant decoding on llama.cpp's CPU backend (docs/design.md, Replay).

On CPU, llama.cpp gives a sequence logits that depend on what else shares its step and
on where its KV cells sit, unless all of these hold:

- weights not repacked: the repacked K-quant kernels take tokens in groups of 4 and the
  rest one by one, which round differently;
- flash attention on: its plain path walks a query's cells in cell order and skips the
  masked ones, so other sequences' cells do not enter the sum;
- the KV cache in Q8_0 or BF16: with f16 KV, flash attention takes a split-KV path for one-token
  steps over 512+ cells and a tiled path for steps of 64+ query rows, both placement
  dependent;
- ``GGML_CPU_TILED_MM=0`` before the process's first decode: otherwise steps of 8+
  tokens use a tiled K-quant matmul that rounds differently from the one-row dot product;
- each sequence's cells in position order in the cache, since the plain path's online
  softmax sums them in cell order (``Placement``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import time
from dataclasses import dataclass, replace
from typing import Protocol

import llama_cpp as lc

from drivers.base import DriverError, Piece, Sampling

log = logging.getLogger(__name__)

TILED_ENV = "GGML_CPU_TILED_MM"
GGML_TYPE_BF16 = 30  # ggml.h's; llama-cpp-python does not export it
# What newer llama.cpp builds write first in a sequence's state (its io_magic), then the seq_id
STATE_MAGIC = 0xAF143CD8

_decoded = False  # whether this process ran a decode (llama.cpp reads TILED_ENV once, then)
# Texts decoded at load to check the mode (``check``)
PROBE = ("The quick brown fox jumps over the lazy dog while the cat watches.",
         "Once upon a time")


@dataclass(slots=True, frozen=True)
class KVType:
    ggml: int
    name: str
    bytes_per_value: float


# Q8_0 halves the KV's memory; its blocks of 32 need heads of a multiple of 32 values
# (BF16 works for any head, at f16's size).
Q8_0 = KVType(lc.GGML_TYPE_Q8_0, "q8_0", 34 / 32)
BF16 = KVType(GGML_TYPE_BF16, "bf16", 2.0)


@dataclass(slots=True, frozen=True)
class Mode:
    """Whether a loaded model's tokens are batch-invariant, and why (models/NAME/info)."""

    deterministic: bool
    reason: str
    kv: KVType | None = None  # the KV cache's type in deterministic mode

    def line(self) -> str:
        return f"{'yes' if self.deterministic else 'no'} ({self.reason})"

    def checked(self, same: bool) -> Mode:
        """This mode after ``probe`` said whether a probe's logits came out the same."""
        if same:
            return replace(self, reason=self.reason + "; checked at load: a probe's logits "
                           "are bit-identical alone and in batches")
        return Mode(False, "checked at load: a probe's logits differ alone and in a batch "
                    "with these settings, on this CPU and llama.cpp build; it runs with "
                    "llama.cpp's default context settings")


def choose(asked: bool, on_gpu: bool, mparams: lc.llama_model_params) -> Mode:
    """The mode a model gets (``asked``: the mount's setting), with its model parameters
    set for it. ``context`` then sets the context's."""
    if not asked:
        return Mode(False, "off by setting: batched steps may change a task's last bits")
    if on_gpu:
        return Mode(False, "runs on a GPU, whose kernels are not batch-invariant here")
    if _decoded and os.environ.get(TILED_ENV) != "0":
        return Mode(False, f"another model decoded in this process before {TILED_ENV}=0 was set")
    os.environ[TILED_ENV] = "0"
    mparams.use_extra_bufts = False
    return Mode(True, "")


def context(mode: Mode, cparams: lc.llama_context_params, head_k: int, head_v: int) -> Mode:
    """Set a deterministic model's context parameters; the mode, with its KV type."""
    if not mode.deterministic:
        return mode
    kv = Q8_0 if head_k % 32 == 0 and head_v % 32 == 0 else BF16
    cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
    cparams.swa_full = True  # pinned cells stay: a window cache as big as the whole one
    cparams.n_seq_max += 1  # the pin (``Placement``)
    cparams.type_k = kv.ggml
    cparams.type_v = kv.ggml
    return Mode(True, f"cpu: weights not repacked, flash attention, KV {kv.name}, "
                      f"{TILED_ENV}=0, cells kept in position order", kv)


def decoding() -> None:
    """Note that this process decodes (llama.cpp has read TILED_ENV by now)."""
    global _decoded
    _decoded = True


class Unordered:
    """Where cells go is llama.cpp's choice (not in deterministic mode): ``Placement``'s
    calls, doing nothing."""

    def drop(self, seq: int, first: int = 0) -> None:
        pass

    def room(self, n: int) -> None:
        pass

    def placed(self, n: int) -> None:
        pass


def placement(mode: Mode, ctx: lc.llama_context_p, n_ctx: int, pin: int) -> Unordered:
    """What keeps the cells of a context opened in ``mode`` in order; ``pin``: the
    sequence past the driver's."""
    return Placement(ctx, n_ctx, pin) if mode.deterministic else Unordered()


class Placement(Unordered):
    """Keeps a deterministic context's cells in position order.

    llama.cpp puts a step's new cells in the first free ones from where the last step
    stopped, or from the cache's start when there are holes before that; so a hole left
    by a dropped sequence could take a running sequence's next token *below* its earlier
    ones. Here no cell is ever freed between compactions: the cells a sequence drops are
    first added to one more sequence, the *pin* (the one past the driver's), so every used
    cell stays below ``top`` and each new one goes at ``top``. When the cache has no room
    at ``top`` or half of what is below it is dropped cells, ``compact`` frees the pinned
    ones and packs the rest to the cache's start, order kept. It pins those too: llama.cpp
    also reuses a cell that sliding-window attention masks for the one sequence holding it
    (Gemma 3: 512 positions back), which the search from the start after a compaction
    would find below used ones; a cell held by two sequences is never reused so.
    """

    def __init__(self, ctx: lc.llama_context_p, n_ctx: int, pin: int) -> None:
        self._ctx = ctx
        self._mem = lc.llama_get_memory(ctx)
        self._n_ctx = n_ctx
        self._pin = pin
        self.top = 0  # cells placed since the last compaction and live at it, all below
        self.dropped = 0  # cells dropped since, at most (shared ones may count twice)

    def drop(self, seq: int, first: int = 0) -> None:
        """Before the driver removes ``seq``'s cells from position ``first`` on."""
        last = lc.llama_memory_seq_pos_max(self._mem, seq)
        start = max(first, lc.llama_memory_seq_pos_min(self._mem, seq))
        if last >= start:
            lc.llama_memory_seq_cp(self._mem, seq, self._pin, first, -1)
            self.dropped += last - start + 1

    def room(self, n: int) -> None:
        """Before ``n`` cells (at most) are placed."""
        if self.top + n > self._n_ctx or self.dropped > self.top // 2:
            self.compact()

    def placed(self, n: int) -> None:
        self.top += n

    def compact(self) -> None:
        """Pack every used cell to the cache's start, in the order they are in, shared
        cells still shared (llama.cpp's whole-cache save and restore does exactly that,
        ``seq_id`` -1), and pin them."""
        began, before = time.monotonic(), self.top
        lc.llama_memory_seq_rm(self._mem, self._pin, -1, -1)  # dropped cells come free
        state = self.save()
        if lc.llama_state_seq_set_data(self._ctx, state, len(state), -1) == 0:
            raise DriverError("llama.cpp could not restore the compacted KV cache")
        for seq in range(self._pin):
            lc.llama_memory_seq_cp(self._mem, seq, self._pin, -1, -1)
        self.top = live_cells(bytes(state[:16]))
        log.info("KV cache compacted: %d of %d cells live, in %.0f ms", self.top, before,
                 1000 * (time.monotonic() - began))
        self.dropped = 0

    def save(self) -> ctypes.Array[ctypes.c_uint8]:
        """The whole cache's state."""
        size = lc.llama_state_seq_get_size(self._ctx, -1)
        state: ctypes.Array[ctypes.c_uint8] = (ctypes.c_uint8 * size)()
        if lc.llama_state_seq_get_data(self._ctx, state, size, -1) != size:
            raise DriverError("llama.cpp could not save the KV cache to compact it")
        return state


def live_cells(head: bytes) -> int:
    """The cells in use, from the first 16 bytes of a whole-cache state: after
    STATE_MAGIC and the seq_id where the build writes them, the first cache's stream
    count (one: a unified cache) and that stream's cell count. A compaction packs them
    at the cache's start, so the next cell goes there."""
    words = struct.unpack("<4I", head.ljust(16, b"\0")[:16])
    if words[0] == STATE_MAGIC:
        words = words[2:]
    if words[0] != 1:
        raise DriverError(f"llama.cpp's KV cache state begins {head[:8].hex()}: not a layout "
                          "deterministic mode reads")
    return int(words[1])


class Probed(Protocol):
    """What ``probe`` needs of a driver."""

    def open_seq(self, seq: int, sampling: Sampling) -> None: ...

    def close_seq(self, seq: int) -> None: ...

    def step(self, pieces: list[Piece]) -> dict[int, int]: ...

    def logits(self, index: int) -> bytes: ...

    def tokenize(self, text: str, bos: bool = True, *, special: bool = False) -> list[int]: ...


def check(mode: Mode, driver: Probed, order: Unordered, n_seq_max: int) -> Mode:
    """``mode`` once checked on ``driver``'s context, whose cells ``order`` places: the
    cache's state is one ``live_cells`` reads, and ``probe`` gives the same logits (with
    one sequence, ``n_seq_max``, nothing is ever batched: no probe)."""
    if not mode.deterministic or not isinstance(order, Placement):
        return mode
    try:
        live_cells(bytes(order.save()[:16]))
    except DriverError as e:
        return Mode(False, f"checked at load: {e}; it runs with llama.cpp's default "
                    "context settings")
    if n_seq_max < 2:
        return mode
    return mode.checked(probe(driver, driver.tokenize(PROBE[0]), driver.tokenize(PROBE[1])))


def probe(driver: Probed, prompt: list[int], other: list[int]) -> bool:
    """Whether ``prompt`` gets the same logits, bit for bit, decoded alone and in batches
    with ``other`` (placed first, then decoding beside it), for its prefill and its next
    token. Sequences 0 and 1 are used and cleared."""
    def run(steps: list[list[Piece]]) -> list[bytes]:
        seen = []
        for seq in range(2):
            driver.open_seq(seq, Sampling())
        for pieces in steps:
            driver.step(pieces)
            end = -1
            for p in pieces:
                end += len(p.tokens)
                if p.seq == 0:
                    seen.append(driver.logits(end))
        for seq in range(2):
            driver.close_seq(seq)
        return seen

    n, token = len(prompt), prompt[-1]
    alone = run([[Piece(0, prompt, 0, True)], [Piece(0, [token], n, True)]])
    batched = run([[Piece(1, other, 0, True), Piece(0, prompt, 0, True)],
                   [Piece(1, [token], len(other), True), Piece(0, [token], n, True)]])
    return alone == batched
