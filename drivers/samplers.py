"""llama.cpp sampler chains, made from a Sampling (drivers.base) for the llama.cpp driver
(drivers/llamacpp.py).

The order is llama-server's (the default sampler order in llama.cpp's common/sampling.cpp):
penalties, top-k, top-p, min-p, temperature, then a draw; a grammar, when there is one,
goes first, so that whatever the others keep can match it. At temperature 0 the draw is
the likeliest token, which top-k, top-p and min-p always keep: they are left out. A
sequence whose chain would only take the likeliest token (greedy, no grammar, no
penalties) gets none: the driver takes the argmax of its logits itself, where llama.cpp's
greedy sampler would first copy all n_vocab logits into candidate records, each token.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp as lc

from drivers.base import DriverError, Sampling


@dataclass(slots=True)
class SeqSampler:
    """How one sequence samples: its chain (None: the argmax of the logits), and how many
    alternatives its token records list (0: it keeps none; drivers.logprobs)."""

    chain: ctypes.c_void_p | None
    logprobs: int

    def free(self) -> None:
        if self.chain is not None:
            lc.llama_sampler_free(self.chain)
            self.chain = None


def make(vocab: ctypes.c_void_p, sampling: Sampling, n_vocab: int, n_ctx: int) -> SeqSampler:
    """The sampler of one sequence; DriverError when its grammar does not compile."""
    greedy = sampling.temperature <= 0
    if greedy and not sampling.grammar and not sampling.penalized:
        return SeqSampler(None, sampling.logprobs)
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())

    def add(sampler: ctypes.c_void_p) -> None:
        lc.llama_sampler_chain_add(chain, sampler)

    if sampling.grammar:
        grammar = lc.llama_sampler_init_grammar(vocab, sampling.grammar.encode(), b"root")
        if not grammar:
            lc.llama_sampler_free(chain)
            raise DriverError("llama.cpp could not compile the task's grammar")
        add(grammar)
    if sampling.penalized:
        add(_penalties(sampling, n_vocab, n_ctx))
    if greedy:
        add(lc.llama_sampler_init_greedy())
        return SeqSampler(chain, sampling.logprobs)
    if sampling.top_k > 0:
        add(lc.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0:
        add(lc.llama_sampler_init_top_p(sampling.top_p, 1))
    if sampling.min_p > 0.0:
        add(lc.llama_sampler_init_min_p(sampling.min_p, 1))
    add(lc.llama_sampler_init_temp(sampling.temperature))
    add(lc.llama_sampler_init_dist(sampling.seed))
    return SeqSampler(chain, sampling.logprobs)


def _penalties(sampling: Sampling, n_vocab: int, n_ctx: int) -> ctypes.c_void_p:
    """llama.cpp's penalties sampler, having seen the sequence's recent tokens (as
    llama-server's slot accepts its prompt into its sampler). Its window holds at most the
    context: llama.cpp allocates it whole."""
    last_n = min(sampling.repeat_last_n, n_ctx)
    penalties: ctypes.c_void_p = lc.llama_sampler_init_penalties(
        n_vocab, last_n, sampling.repeat_penalty, sampling.frequency_penalty,
        sampling.presence_penalty)
    for token in sampling.recent[-last_n:]:
        lc.llama_sampler_accept(penalties, token)
    return penalties
