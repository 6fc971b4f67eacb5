"""The llama.cpp driver: one model, one context, many sequences, in this process.

It speaks llama.cpp's low-level C API through llama-cpp-python's ctypes bindings:
the high-level ``Llama`` class decodes one sequence only. ctypes releases the GIL
during every C call, so the engine runs ``step`` in a worker thread while the FUSE
handlers keep answering.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import llama_cpp as lc
import numpy as np

from drivers import determinism, gguf, logprobs, samplers
from drivers.base import (
    ContextShape,
    DriverError,
    ModelInfo,
    ModelLoadError,
    Piece,
    Sampling,
    SeqState,
    StepAborted,
)
from drivers.devices import free_gpu_memory, gpus, plan_gpu_layers
from drivers.llamalib import (
    abort_flag,
    check_gguf,
    cpu_has_amx,
    head_dims,
    init_backend,
    kv_cell_bytes,
    meta,
    recent_log,
)

log = logging.getLogger(__name__)

class LlamaCppDriver:
    """A GGUF model loaded with llama.cpp and one context of ``n_seq_max`` sequences."""

    def __init__(
        self,
        path: Path,
        *,
        name: str | None = None,
        n_ctx: int = 8192,
        n_seq_max: int = 32,
        n_batch: int = 512,
        n_threads: int | None = None,
        repack: bool | None = None,
        gpu_layers: int | None = None,
        deterministic: bool = False,
    ) -> None:
        """``gpu_layers``: layers to offload to the GPU (llama.cpp's ``n_gpu_layers``;
        the layer count + 1 or more, or a negative number, puts all of it there); None
        chooses: 0 without a GPU or a llama.cpp built for one, else as many as fit in
        the first GPU's free memory with this context's KV (``plan_gpu_layers``).
        ``deterministic``: batch-invariant decoding where it can be had (drivers.determinism;
        ``mode`` says whether it is and why)."""
        path = Path(path).resolve()
        check_gguf(path)
        init_backend()
        gpu, n_gpu_layers = self._plan_gpu(path, n_ctx, gpu_layers)
        mparams = lc.llama_model_default_params()
        # Repacked weight layouts make batched steps about a quarter faster here, but
        # llama.cpp's AMX repack path crashes on the first decode (docs/design.md, Architecture): by default
        # repack everywhere except on CPUs with AMX.
        self.repack = not cpu_has_amx() if repack is None else repack
        mparams.use_extra_bufts = self.repack
        mparams.n_gpu_layers = n_gpu_layers
        mode = determinism.choose(deterministic, n_gpu_layers != 0, mparams)
        self.repack = self.repack and not mode.deterministic
        recent_log.clear()
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            said = "; ".join(line for line in recent_log if "error" in line.lower())
            raise ModelLoadError(
                f"llama.cpp could not load {path} (truncated or corrupt GGUF?)"
                + (f": {said}" if said else "")
            )
        self._model = model
        self._vocab = lc.llama_model_get_vocab(model)
        threads = n_threads or os.cpu_count() or 1
        self._abort, self._abort_cb = abort_flag()

        def cparams() -> lc.llama_context_params:
            p: lc.llama_context_params = lc.llama_context_default_params()
            p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, n_seq_max
            p.n_threads = p.n_threads_batch = threads
            p.kv_unified = p.no_perf = True
            p.abort_callback = self._abort_cb  # type: ignore[assignment]
            p.abort_callback_data = ctypes.cast(self._abort, ctypes.c_void_p)
            return p

        settings = cparams()
        self.mode = determinism.context(mode, settings, *head_dims(model))
        self._open_context(settings, path)
        self._samplers: dict[int, samplers.SeqSampler] = {}
        self._records: dict[int, bytes] = {}  # the last step's token records (token_records)
        self._add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self._pieces: dict[int, bytes] = {}  # token -> its bytes, as tokens are first seen
        self._eog: dict[int, bool] = {}  # token -> whether it ends generation
        template = lc.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8", "replace") if template else ""
        n_layer = lc.llama_model_n_layer(model)
        offloaded = self._offloaded(n_gpu_layers, n_layer)
        self.info = ModelInfo(
            name=name or path.stem,
            path=str(path),
            architecture=meta(model, "general.architecture") or "unknown",
            description=self._desc(),
            parameters=lc.llama_model_n_params(model),
            size_bytes=lc.llama_model_size(model),
            context_length=lc.llama_model_n_ctx_train(model),
            vocab_size=lc.llama_vocab_n_tokens(self._vocab),
            device=self._device(gpu, offloaded, n_layer, threads),
            extra={"file_bytes": str(path.stat().st_size), "gpu_layers": str(offloaded)},
        )
        tried, self.mode = self.mode, determinism.check(self.mode, self, self._order, self.shape.n_seq_max)
        if tried.deterministic and not self.mode.deterministic:  # llama.cpp's default context
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            self._open_context(cparams(), path)
        self.info.extra["deterministic"] = self.mode.line()
        self.info.deterministic = self.mode.deterministic
        log.info("loaded %s: %s, context %s", path, self.info.description, self.shape)

    def _open_context(self, cparams: lc.llama_context_params, path: Path) -> None:
        """The context, its shape and its batch, from ``cparams``."""
        ctx = lc.llama_init_from_model(self._model, cparams)
        if not ctx:
            lc.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp could not create a context for {path}")
        self._ctx = ctx
        self._mem = lc.llama_get_memory(ctx)
        self.shape = ContextShape(
            n_ctx=lc.llama_n_ctx(ctx),
            n_seq_max=lc.llama_n_seq_max(ctx) - (1 if self.mode.deterministic else 0),
            n_batch=lc.llama_n_batch(ctx),
            cell_bytes=self._cell_bytes(),
        )
        self._batch = lc.llama_batch_init(self.shape.n_batch, 0, 1)
        self._order = determinism.placement(self.mode, ctx, self.shape.n_ctx, self.shape.n_seq_max)

    # -- where it runs ------------------------------------------------------------------

    @staticmethod
    def _plan_gpu(path: Path, n_ctx: int, asked: int | None) -> tuple[int | None, int]:
        """(the NVML index of the GPU planned for or None, n_gpu_layers)."""
        if not lc.llama_supports_gpu_offload():
            if asked:
                log.warning("this llama.cpp has no GPU support: %d GPU layers asked, none used",
                            asked)
            return None, 0
        free = free_gpu_memory()
        if asked is not None:
            return (free[0][0] if free else None), asked
        if not free:
            log.info("llama.cpp supports GPU offload but NVML sees no GPU: the model runs on CPU")
            return None, 0
        index, free_bytes = free[0]
        try:
            header = gguf.read_header(path)
        except ValueError as e:
            raise ModelLoadError(f"model file {path}: {e}") from e
        layers = gguf.info(header, path).layers
        kv_bytes = n_ctx * kv_cell_bytes(header.metadata)
        n = plan_gpu_layers(layers, header.size_bytes, kv_bytes, free_bytes)
        log.info("GPU %d has %d MiB free: %d of %d layers planned for it (model %d MiB, KV %d MiB)",
                 index, free_bytes >> 20, n, layers, header.size_bytes >> 20, kv_bytes >> 20)
        return index, n

    @staticmethod
    def _offloaded(n_gpu_layers: int, n_layer: int) -> int:
        """Layers llama.cpp puts on the GPU for ``n_gpu_layers`` (the output counts as one)."""
        if not lc.llama_supports_gpu_offload():
            return 0
        return n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)

    def _device(self, gpu: int | None, offloaded: int, n_layer: int, threads: int) -> str:
        cpu = f"cpu ({threads} threads{', repacked weights' if self.repack else ''})"
        if not offloaded:
            return cpu
        names = {g.index: g.name for g in gpus()[0]}
        where = f"GPU {gpu} {names.get(gpu, '')}".rstrip() if gpu is not None else "GPU"
        output = " + output" if offloaded > n_layer else ""
        return f"{where}: {min(offloaded, n_layer)}/{n_layer} layers{output}; {cpu}"

    # -- model facts ---------------------------------------------------------------

    def _desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self._model, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def _cell_bytes(self) -> int:
        """Bytes of KV one cell takes across all layers, in f16 or deterministic mode's type."""
        per_value = self.mode.kv.bytes_per_value if self.mode.kv else 2
        layers, heads = lc.llama_model_n_layer(self._model), lc.llama_model_n_head_kv(self._model)
        return int(layers * heads * sum(head_dims(self._model)) * per_value)

    # -- vocabulary ----------------------------------------------------------------

    def tokenize(self, text: str, bos: bool = True, *, special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, self._add_bos and bos,
                                  special)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def piece(self, token: int) -> bytes:
        # Every generated token passes here: a table filled as tokens are first seen
        # saves a ctypes buffer and a foreign call per token (a whole table at load
        # would take a second for Gemma's 262,144 tokens).
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._token_to_piece(token)
        return piece

    def _token_to_piece(self, token: int) -> bytes:
        cap = 64
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = lc.llama_token_to_piece(self._vocab, token, buf, cap, 0, False)
            if n >= 0:
                return buf.raw[:n]
            cap = -n

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(lc.llama_vocab_is_eog(self._vocab, token))
        return eog

    # -- sequences -----------------------------------------------------------------

    def open_seq(self, seq: int, sampling: Sampling) -> None:
        if not 0 <= seq < self.shape.n_seq_max:
            raise DriverError(f"sequence {seq} is outside 0..{self.shape.n_seq_max - 1}")
        self._drop_sampler(seq)
        self._samplers[seq] = samplers.make(self._vocab, sampling, self.info.vocab_size,
                                            self.shape.n_ctx)

    def _drop_sampler(self, seq: int) -> None:
        sampler = self._samplers.pop(seq, None)
        if sampler is not None:
            sampler.free()

    def close_seq(self, seq: int) -> None:
        self._order.drop(seq)
        lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._drop_sampler(seq)

    def copy_seq(self, src: int, dst: int, n: int) -> None:
        # In the unified cache this adds ``dst`` to the cells of ``src``: no KV is copied.
        lc.llama_memory_seq_cp(self._mem, src, dst, 0, n)

    def trim_seq(self, seq: int, n: int) -> None:
        self._order.drop(seq, n)
        if not lc.llama_memory_seq_rm(self._mem, seq, n, -1):
            raise DriverError(f"llama.cpp could not trim sequence {seq} to {n} cells")

    def seq_cells(self, seq: int) -> int:
        last = lc.llama_memory_seq_pos_max(self._mem, seq)
        return 0 if last < 0 else last - lc.llama_memory_seq_pos_min(self._mem, seq) + 1

    def save_seq(self, seq: int, keep_kv: bool) -> SeqState:
        kv = None
        size = 0
        if keep_kv:
            size = lc.llama_state_seq_get_size(self._ctx, seq)
            kv = (ctypes.c_uint8 * size)()
            if lc.llama_state_seq_get_data(self._ctx, kv, size, seq) != size:
                raise DriverError(f"llama.cpp could not save sequence {seq}")
        sampler = self._samplers.pop(seq)
        self._order.drop(seq)
        lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
        return SeqState(sampler=sampler, kv=kv, kv_bytes=size)

    def restore_seq(self, seq: int, state: SeqState) -> None:
        if not isinstance(state.sampler, samplers.SeqSampler):
            raise DriverError("saved state is not from this driver")
        self._drop_sampler(seq)
        if state.kv is not None:
            kv = state.kv
            if isinstance(kv, bytearray):  # read back from a swap file
                kv = (ctypes.c_uint8 * len(kv)).from_buffer(kv)
            if not isinstance(kv, ctypes.Array):
                raise DriverError("saved state is not from this driver")
            self._order.drop(seq)
            lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self._order.room(state.kv_bytes // max(1, self.shape.cell_bytes) + 1)  # or fewer
            if lc.llama_state_seq_set_data(self._ctx, kv, state.kv_bytes, seq) == 0:
                raise DriverError(f"llama.cpp could not restore a sequence into slot {seq}")
            self._order.placed(self.seq_cells(seq))
        self._samplers[seq] = state.sampler

    # -- the step ------------------------------------------------------------------

    def step(self, pieces: list[Piece]) -> dict[int, int]:
        total = sum(len(p.tokens) for p in pieces)
        if total == 0:
            return {}
        if total > self.shape.n_batch:
            # llama.cpp aborts the whole process on this; refuse it here instead.
            raise DriverError(f"step of {total} tokens exceeds n_batch {self.shape.n_batch}")
        b = self._batch
        i = 0
        wanted: list[tuple[int, int]] = []
        for p in pieces:
            last = len(p.tokens) - 1
            for j, tok in enumerate(p.tokens):
                b.token[i] = tok
                b.pos[i] = p.pos + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = p.seq
                b.logits[i] = p.sample and j == last
                i += 1
            if p.sample and p.tokens:
                wanted.append((p.seq, i - 1))
        b.n_tokens = total
        self._order.room(total)
        determinism.decoding()
        rc = lc.llama_decode(self._ctx, b)
        if rc == 2:
            raise StepAborted("the step was aborted")
        if rc == 1:
            raise DriverError("the KV cache has no room for this step")
        if rc != 0:
            raise DriverError(f"llama_decode failed with code {rc}")
        self._order.placed(total)
        sampled = {seq: self._sample(seq, idx) for seq, idx in wanted}
        asked = [(seq, idx) for seq, idx in wanted if self._samplers[seq].logprobs]
        self._records = self._token_records(asked, sampled) if asked else {}
        return sampled

    def token_records(self) -> dict[int, bytes]:
        return self._records

    def abort(self, stop: bool = True) -> None:
        self._abort[0] = b"\1" if stop else b"\0"

    def logits(self, index: int) -> bytes:
        """The last step's logits for its token ``index`` (one that asked for a sample)."""
        return self._logits(index).tobytes()

    def _logits(self, idx: int) -> np.ndarray:
        """The logits of output ``idx`` of the last step (a view of llama.cpp's buffer)."""
        logits = lc.llama_get_logits_ith(self._ctx, idx)
        return np.ctypeslib.as_array(logits, shape=(self.info.vocab_size,))

    def _sample(self, seq: int, idx: int) -> int:
        chain = self._samplers[seq].chain
        if chain is None:
            logits = lc.llama_get_logits_ith(self._ctx, idx)
            return int(np.ctypeslib.as_array(logits, shape=(self.info.vocab_size,)).argmax())
        return int(lc.llama_sampler_sample(chain, self._ctx, idx))

    def _token_records(self, asked: list[tuple[int, int]], sampled: dict[int, int]
                       ) -> dict[int, bytes]:
        """The records of the tokens sampled for ``asked`` (seq, output index): their rows
        of logits are untouched by sampling (the samplers work on copies)."""
        rows = np.stack([self._logits(idx) for _, idx in asked])
        seqs = [seq for seq, _ in asked]
        made = logprobs.records(rows, [sampled[s] for s in seqs],
                                [self._samplers[s].logprobs for s in seqs])
        return dict(zip(seqs, made, strict=True))

    def close(self) -> None:
        for seq in list(self._samplers):
            self.close_seq(seq)
        if self._ctx:
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None
