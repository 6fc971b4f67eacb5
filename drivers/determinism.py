"""Batch-invariant decoding on llama.cpp's CPU backend (notes/determinism.md).

On CPU, llama.cpp gives a sequence logits that depend on what else shares its step and
on where its KV cells sit, unless all of these hold:

- weights not repacked: the repacked K-quant kernels take tokens in groups of 4 and the
  rest one by one, which round differently;
- flash attention on: its plain path walks a query's cells in cell order and skips the
  masked ones, so other sequences' cells do not enter the sum;
- the KV cache in Q8_0: with f16 KV, flash attention takes a split-KV path for one-token
  steps over 512+ cells and a tiled path for steps of 64+ query rows, both placement
  dependent;
- ``GGML_CPU_TILED_MM=0`` before the process's first decode: otherwise steps of 8+
  tokens use a tiled K-quant matmul that rounds differently from the one-row dot product;
- each sequence's cells in position order in the cache, since the plain path's online
  softmax sums them in cell order: ``compact`` packs the used cells to the cache's start
  (order kept) whenever cells were freed, so new cells always go after every used one.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import llama_cpp as lc

from drivers.base import DriverError

TILED_ENV = "GGML_CPU_TILED_MM"
KV_TYPE = lc.GGML_TYPE_Q8_0
KV_TYPE_NAME = "q8_0"
KV_BYTES_PER_VALUE = 34 / 32  # a Q8_0 block: 32 int8 and an f16 scale

_decoded = False  # whether this process ran a decode (llama.cpp reads TILED_ENV once, then)


@dataclass(slots=True, frozen=True)
class Mode:
    """Whether a loaded model's tokens are batch-invariant, and why (models/NAME/info)."""

    deterministic: bool
    reason: str

    def line(self) -> str:
        return f"{'yes' if self.deterministic else 'no'} ({self.reason})"


def choose(asked: bool, on_gpu: bool) -> Mode:
    """The mode a model gets: ``asked`` is the mount's or the model's setting. Call before
    the model's context is made; ``apply`` then sets it up."""
    if not asked:
        return Mode(False, "off by setting: batched steps may change a task's last bits")
    if on_gpu:
        return Mode(False, "runs on a GPU, whose kernels are not batch-invariant here")
    if _decoded and os.environ.get(TILED_ENV) != "0":
        return Mode(False, f"another model decoded in this process before {TILED_ENV}=0 was set")
    os.environ[TILED_ENV] = "0"
    return Mode(True, f"cpu: weights not repacked, flash attention, KV {KV_TYPE_NAME}, "
                      f"{TILED_ENV}=0, cells kept in position order")


def apply(mparams: lc.llama_model_params, cparams: lc.llama_context_params) -> None:
    """Set llama.cpp's model and context parameters for a deterministic model."""
    mparams.use_extra_bufts = False
    cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
    cparams.type_k = KV_TYPE
    cparams.type_v = KV_TYPE


def decoding() -> None:
    """Note that this process decodes (llama.cpp has read TILED_ENV by now)."""
    global _decoded
    _decoded = True


def compact(ctx: lc.llama_context_p) -> None:
    """Pack every used cell of ``ctx``'s KV cache to the cache's start, in the order they
    are in, shared cells still shared: llama.cpp's whole-cache save and restore does
    exactly that (``seq_id`` -1)."""
    size = lc.llama_state_seq_get_size(ctx, -1)
    buf = (ctypes.c_uint8 * size)()
    if lc.llama_state_seq_get_data(ctx, buf, size, -1) != size:
        raise DriverError("llama.cpp could not save the KV cache to compact it")
    if lc.llama_state_seq_set_data(ctx, buf, size, -1) == 0:
        raise DriverError("llama.cpp could not restore the compacted KV cache")
