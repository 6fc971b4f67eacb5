"""Write a tiny, randomly initialised llama-architecture GGUF model for tests.

The model is a few hundred kilobytes, loads in milliseconds and has a SentencePiece-style
("llama") vocabulary with byte-fallback tokens and multi-byte UTF-8 pieces, so generated
text regularly contains non-ASCII characters and lone UTF-8 bytes.

With a chat template the vocabulary also has the control tokens of the chatml and gemma
formats (``CHAT_TOKENS``), which llama.cpp takes as end-of-generation where they end a
turn. ``tools/make-model`` builds its large benchmark models on the same vocabulary.

Usage: ``python tests/tinymodel.py OUT.gguf [--seed N] [--chat-template T]``
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
from collections.abc import Sequence

import gguf
import numpy as np
import numpy.typing as npt

BOS_ID = 1
EOS_ID = 2
SPACE = "\u2581"  # SentencePiece word-boundary marker "▁"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>")
# chatml as instruction-tuned models' GGUFs carry it (Jinja; llama.cpp recognises the
# format by its markers)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,;:!?'\"-()[]{}<>/\\@#$%&*+=_~|`^"
    "éüèàçöñß€日本語中文"
)
_WORDS = (  # common English words plus a few non-ASCII ones
    "the of and to a in is it you that he was for on are with as I his they be at one have"
    " this from or had by hot word but what some we can out other were all there when up use"
    " your how said an each she which do their time if will way about many then them write"
    " would like so these her long make thing see him two has look more day could go come did"
    " number sound no most people my over know water than call first who may down side been"
    " now find any new work part take get place made live where after back little only round"
    " man year came show every good me give our under name very through just form sentence"
    " great think say help low line differ turn cause much mean before move right boy old too"
    " same tell does set three want air well also play small end put home read hand port large"
    " spell add even land here must big high such follow act why ask men change went light"
    " kind off need house picture try us again animal point mother world near build self earth"
    " father café naïve über résumé 日本 東京 €5 Hello World The"
)


def vocab(size: int = 0, control: Sequence[str] = ()) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the SentencePiece-style vocabulary: special and
    byte tokens, word pieces, then the ``control`` tokens, then (to reach ``size``
    tokens) pieces made of two words, which a text tokenizes to only if it has them."""
    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256
    pieces: dict[str, None] = dict.fromkeys([SPACE, *_CHARS])
    for word in _WORDS.split():
        # SPM merges pairs of adjacent pieces, so every prefix of a word must be a piece too.
        w = SPACE + word
        pieces.update(dict.fromkeys(w[:n] for n in range(2, len(w) + 1)))
    tokens += list(pieces)
    types += [tt.NORMAL] * len(pieces)
    # Longer pieces get higher scores so the greedy SPM merge prefers them.
    scores = [0.0] * 259 + [float(len(p)) - i * 1e-4 for i, p in enumerate(pieces)]
    tokens += control
    types += [tt.CONTROL] * len(control)
    scores += [0.0] * len(control)
    words = list(dict.fromkeys(_WORDS.split()))
    pairs = dict.fromkeys(SPACE + a + b for a, b in itertools.product(words, words) if a != b)
    seen = set(tokens)
    extra = list(itertools.islice((p for p in pairs if p not in seen), max(0, size - len(tokens))))
    if len(tokens) + len(extra) < size:
        raise ValueError(f"the vocabulary has at most {len(tokens) + len(extra)} tokens")
    tokens += extra
    types += [tt.NORMAL] * len(extra)
    scores += [float(len(p)) for p in extra]
    return tokens, scores, [int(t) for t in types]


def add_tokenizer(w: gguf.GGUFWriter, tokens: list[str], scores: list[float],
                  types: list[int]) -> None:
    """The tokenizer's metadata: a SentencePiece ("llama") vocabulary with BOS, no EOS."""
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)


def _normal(
    rng: np.random.Generator, shape: tuple[int, ...], std: float
) -> npt.NDArray[np.float32]:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def write_tiny_gguf(
    path: pathlib.Path,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_ctx_train: int = 2048,
    chat_template: str = "",
) -> pathlib.Path:
    """Write a tiny llama GGUF with random (seeded, deterministic) f32 weights to ``path``.

    With ``chat_template`` (a built-in name such as "chatml", or a template such as
    ``CHATML_TEMPLATE``) the file carries it as ``tokenizer.chat_template`` and the
    vocabulary has ``CHAT_TOKENS`` as control tokens.
    The same arguments always produce a byte-identical file.  Returns ``path``.
    """
    n_head, n_head_kv, n_ff = 4, 2, 2 * n_embd
    head_dim = n_embd // n_head
    control = CHAT_TOKENS if chat_template else ()
    tokens, scores, types = vocab(control=control)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("axfs-tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    add_tokenizer(w, tokens, scores, types)
    if chat_template:
        w.add_chat_template(chat_template)

    # numpy shapes are the reverse of GGML's ne: a (out, in) matrix maps in -> out.
    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", _normal(rng, (n_vocab, n_embd), 1.0))
    for i in range(n_layer):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", ones)
        w.add_tensor(f"{blk}.attn_q.weight", _normal(rng, (n_embd, n_embd), 0.5))
        w.add_tensor(f"{blk}.attn_k.weight", _normal(rng, (head_dim * n_head_kv, n_embd), 0.5))
        w.add_tensor(f"{blk}.attn_v.weight", _normal(rng, (head_dim * n_head_kv, n_embd), 0.5))
        w.add_tensor(f"{blk}.attn_output.weight", _normal(rng, (n_embd, n_embd), 0.5))
        w.add_tensor(f"{blk}.ffn_norm.weight", ones)
        w.add_tensor(f"{blk}.ffn_gate.weight", _normal(rng, (n_ff, n_embd), 0.5))
        w.add_tensor(f"{blk}.ffn_up.weight", _normal(rng, (n_ff, n_embd), 0.5))
        w.add_tensor(f"{blk}.ffn_down.weight", _normal(rng, (n_embd, n_ff), 0.5))
    w.add_tensor("output_norm.weight", ones)
    output = _normal(rng, (n_vocab, n_embd), 1.0)
    # <unk>, <s> and the chat tokens get logit 0: never the greedy choice.
    output[[0, BOS_ID, *range(n_vocab - len(control), n_vocab)]] = 0.0
    output[EOS_ID] *= 0.5  # EOS practically never: tests rely on long generations.
    w.add_tensor("output.weight", output)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("output", type=pathlib.Path, help="where to write the .gguf file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-ctx-train", type=int, default=2048)
    parser.add_argument("--chat-template", default="",
                        help='a built-in name ("chatml", "gemma") or a template')
    args = parser.parse_args(argv)
    out = write_tiny_gguf(
        args.output,
        seed=args.seed,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_ctx_train=args.n_ctx_train,
        chat_template=args.chat_template,
    )
    print(f"{out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
