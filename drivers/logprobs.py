"""Token records: each sampled token's log-probability, the entropy of the distribution it
was drawn from and the likeliest tokens with theirs, for the tasks that ask (``config
logprobs N``).

The distribution is the model's own, as llama-server reports it for ``n_probs`` (OpenAI's
``logprobs``) with ``post_sampling_probs`` off, its default: the softmax of the raw logits
of the row the token was sampled from (``get_token_probabilities`` in llama.cpp's
tools/server), before temperature, top-k, top-p, min-p, the penalties or a grammar. A
token a grammar forced may so have a low log-probability: the model's doubt, which is
what a script wants to see.

A record is one fixed-size row (``row_dtype``): the token's log-probability and the
entropy (both float32, in nats), then N int32 token ids and their N float32
log-probabilities, likeliest first. A task's records are its rows back to back (axfs.tokens
reads them; the journal keeps them as they are).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# Logits this far below a row's largest count for nothing (exp underflows to 0 in float32
# long before): clipped, so that 0 * -inf never makes the entropy NaN.
FLOOR = -1e4


def row_dtype(n: int) -> np.dtype[np.void]:
    """A record with ``n`` alternatives, as numpy reads it."""
    return np.dtype([("logprob", "<f4"), ("entropy", "<f4"), ("ids", "<i4", (n,)),
                     ("logprobs", "<f4", (n,))])


def row_size(n: int) -> int:
    return 8 + 8 * n


def record(logprob: float, entropy: float, ids: npt.ArrayLike, logprobs: npt.ArrayLike) -> bytes:
    """One record's bytes."""
    return (np.array([logprob, entropy], "<f4").tobytes() + np.asarray(ids, "<i4").tobytes()
            + np.asarray(logprobs, "<f4").tobytes())


def read(data: bytes | bytearray, n: int) -> npt.NDArray[np.void]:
    """The whole records in ``data``, written with ``n`` alternatives each."""
    return np.frombuffer(data, row_dtype(n), len(data) // row_size(n))


def records(logits: npt.NDArray[np.float32], tokens: Sequence[int], n_top: Sequence[int]
            ) -> list[bytes]:
    """The record of each ``tokens[i]``, sampled from row i of ``logits`` (one row a
    sequence, n_vocab wide), with its ``n_top[i]`` likeliest tokens: every row at once.

    log p = z - log sum exp z, with z the logits less their largest; the entropy is
    log S - sum(e^z z) / S, S = sum e^z (the same sums, no second exp)."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.maximum(z, FLOOR, out=z)
    e = np.exp(z)
    total = e.sum(axis=1)
    lse = np.log(total)
    logprob = z[np.arange(len(z)), np.asarray(tokens)] - lse
    n = min(max(n_top), z.shape[1])
    top = np.argpartition(z, -n, axis=1)[:, -n:]
    top_z = np.take_along_axis(z, top, axis=1)
    order = np.argsort(-top_z, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    top_lp = np.take_along_axis(top_z, order, axis=1) - lse[:, None]
    entropy = lse - np.multiply(e, z, out=e).sum(axis=1) / total
    return [record(logprob[i], entropy[i], top[i, :k], top_lp[i, :k]) for i, k in enumerate(n_top)]
