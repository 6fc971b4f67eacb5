"""The llama.cpp library itself, as the driver (drivers/llamacpp.py) needs it: the backend
started once per process, llama.cpp's log into this process's logging (its last lines
kept, so that a failed load can say what llama.cpp said), the abort callback, what the
CPU can do, the first checks of a GGUF file, and a loaded model's metadata.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from pathlib import Path

import llama_cpp as lc

from drivers.base import DriverError, ModelLoadError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}

# llama.cpp logs through one process-wide callback; the last lines are kept so that a
# failed load can say what llama.cpp said.
recent_log: collections.deque[str] = collections.deque(maxlen=50)
_backend_lock = threading.Lock()
_backend_ready = False


@lc.llama_log_callback  # type: ignore[untyped-decorator]
def _on_llama_log(level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
    line = (text or b"").decode("utf-8", "replace").rstrip("\n")
    if not line.strip(" ."):
        return
    recent_log.append(line)
    log.log(_LEVELS.get(level, logging.DEBUG), "llama.cpp: %s", line)


def init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            lc.llama_log_set(_on_llama_log, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _backend_ready = True


def abort_flag() -> tuple[ctypes.Array[ctypes.c_char], object]:
    """A flag llama.cpp polls between graph nodes, and the callback that reads it.

    The callback is libc's strlen on a two-byte buffer: it returns 1 once the first byte
    is set and 0 before, so the check runs in C, with no Python call and no GIL taken
    hundreds of times a step.
    """
    flag = ctypes.create_string_buffer(2)
    strlen = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value
    if strlen is None:
        raise DriverError("libc's strlen was not found")
    return flag, lc.ggml_abort_callback(strlen)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX, whose llama.cpp repack path crashes here (docs/design.md, Architecture)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_" in line for line in f)
    except OSError:
        return False


def kv_cell_bytes(metadata: dict[str, object]) -> int:
    """Bytes of KV one cell takes across all layers, assuming f16 K and V, from a GGUF's
    metadata (0 when it does not say enough)."""
    arch = metadata.get("general.architecture", "")

    def num(key: str) -> int:
        value = metadata.get(f"{arch}.{key}", 0)
        if isinstance(value, tuple):  # per-layer counts (OpenELM): the most any layer has
            value = max((v for v in value if isinstance(v, int)), default=0)
        return value if isinstance(value, int) else 0

    n_head = num("attention.head_count")
    n_head_kv = num("attention.head_count_kv") or n_head
    head_k = num("attention.key_length") or (num("embedding_length") // n_head if n_head else 0)
    head_v = num("attention.value_length") or head_k
    return num("block_count") * n_head_kv * (head_k + head_v) * 2


def check_gguf(path: Path) -> None:
    """Fail with a clear message when ``path`` is not a readable GGUF file."""
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"model {path} is not a regular file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"model file {path} cannot be read: {e.strerror}") from e
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"model file {path} is not a GGUF file (no GGUF magic at its start)")


def meta(model: lc.llama_model_p, key: str) -> str | None:
    """A loaded model's GGUF metadata value ``key`` as text (None if it has none)."""
    buf = ctypes.create_string_buffer(256)
    n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def head_dims(model: lc.llama_model_p) -> tuple[int, int]:
    """Values per attention head in K and in V (drivers.determinism chooses the KV type by them)."""
    arch = meta(model, "general.architecture") or ""
    head_k = int(meta(model, f"{arch}.attention.key_length") or 0)
    head_v = int(meta(model, f"{arch}.attention.value_length") or 0)
    if not head_k:
        head_k = head_v = lc.llama_model_n_embd(model) // max(1, lc.llama_model_n_head(model))
    return head_k, head_v
