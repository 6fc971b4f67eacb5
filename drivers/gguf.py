"""What a GGUF file says about its model, read from its header without loading it.

A GGUF file is a header (magic ``GGUF``, version, key-value metadata, tensor infos)
followed by the tensor data. This reader parses the header of versions 2 and 3 (either
byte order) through a memory map and stops where the data begins, so it takes the same
time on a 100 MB file as on a 100 GB one: what costs is the vocabulary (about 0.2 s for
262,144 tokens), not the weights. No numpy, no llama.cpp.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from drivers.files import open_regular

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> struct format of one item (8 STRING and 9 ARRAY aside).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (name, elements a block, bytes a block), as in ggml.h / ggml.c.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}

# general.file_type (llama.h's llama_ftype) -> the name llama.cpp's tools use for it.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}
_FILE_TYPE_GUESSED = 1024  # a flag llama.cpp adds when it guessed the type


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGML order: shape[0] is the row length
    type: int  # a ggml type id (GGML_TYPES)
    offset: int  # from the start of the data section

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type][0] if self.type in GGML_TYPES else f"type {self.type}"

    @property
    def nbytes(self) -> int | None:
        """Bytes of data, or None for a type this reader does not know."""
        if self.type not in GGML_TYPES:
            return None
        _, block, size = GGML_TYPES[self.type]
        return self.elements // block * size


@dataclass(frozen=True, slots=True)
class GgufHeader:
    """Everything before the tensor data. Metadata values are Python values; an array is
    a tuple of them."""

    version: int
    metadata: dict[str, object]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where the tensor data begins
    size_bytes: int  # of the whole file


@dataclass(frozen=True, slots=True)
class GgufInfo:
    """The facts about a model that models/<name>/info shows."""

    architecture: str
    name: str  # general.name, or the file's stem when absent
    parameters: int  # the sum of the tensors' element counts
    quantisation: str  # general.file_type's name, else the type most weights have
    context_length: int  # {arch}.context_length, 0 if absent
    layers: int  # {arch}.block_count, 0 if absent
    embedding_length: int  # {arch}.embedding_length, 0 if absent
    vocab_size: int  # {arch}.vocab_size, else the length of tokenizer.ggml.tokens
    chat_template: str  # tokenizer.chat_template, "" if absent
    size_bytes: int  # of the file


class _Cursor:
    """Reads GGUF values from a buffer, failing with ValueError past its end."""

    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf = buf
        self.end = len(buf)
        self.pos = 0
        self.order = order

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise ValueError(f"truncated: the file ends inside {what} (at byte {self.pos}, "
                             f"{n} more bytes needed, {self.end - self.pos} left)")

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return value  # type: ignore[no-any-return]

    def u32(self, what: str) -> int:
        return int(self.scalar("I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("Q", what))

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data.decode("utf-8", "replace")

    def value(self, vtype: int, what: str) -> object:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item = self.u32(what)
            count = self.u64(what)
            if item in _SCALARS:
                fmt = f"{self.order}{count}{_SCALARS[item]}"
                size = count * struct.calcsize(_SCALARS[item])
                self.need(size, what)
                items = struct.unpack_from(fmt, self.buf, self.pos)
                self.pos += size
                return items
            if item == _STRING:
                # Each string takes at least its 8-byte length: a corrupt count fails here
                # instead of looping for ever.
                self.need(8 * count, what)
                return tuple(self.string(what) for _ in range(count))
            if item == _ARRAY:
                return tuple(self.value(_ARRAY, what) for _ in range(count))
            raise ValueError(f"{what}: unknown array item type {item}")
        raise ValueError(f"{what}: unknown value type {vtype}")


def read_header(path: Path) -> GgufHeader:
    """Parse the header of the GGUF file at ``path``.

    Raises ValueError, saying why, for an empty file, a file that is not GGUF (or not a
    regular file: see drivers.files), an
    unsupported version, or one that ends before its header or its tensor data does;
    OSError when it cannot be read.
    """
    with open(open_regular(path), "rb") as f:  # a FIFO or a device is refused, not waited on
        size = f.seek(0, 2)
        if size == 0:
            raise ValueError(f"{path} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path, size)


def _parse(buf: mmap.mmap, path: Path, size: int) -> GgufHeader:
    if buf[:4] != MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not begin with 'GGUF')")
    c = _Cursor(buf, "<")
    c.pos = 4
    version = c.u32("the version")
    if version & 0xFFFF == 0 and version:  # written on a big-endian machine
        c.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise ValueError(f"{path} is GGUF version {version}; only versions 2 and 3 are read")
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata count")
    metadata: dict[str, object] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key {i}")
        metadata[key] = c.value(c.u32(f"the type of {key}"), f"metadata value {key}")
    # Each tensor info takes at least 24 bytes: a corrupt count fails here at once.
    c.need(24 * n_tensors, "the tensor infos")
    tensors = []
    for i in range(n_tensors):
        name = c.string(f"the name of tensor {i}")
        n_dims = c.u32(f"tensor {name}")
        c.need(8 * n_dims, f"tensor {name}")
        shape = struct.unpack_from(f"{c.order}{n_dims}Q", buf, c.pos)
        c.pos += 8 * n_dims
        ttype = c.u32(f"tensor {name}")
        tensors.append(TensorInfo(name, shape, ttype, c.u64(f"tensor {name}")))
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0:
        raise ValueError(f"{path}: general.alignment is {align!r}, not a positive integer")
    data_offset = -(-c.pos // align) * align
    for t in tensors:
        nbytes = t.nbytes
        if nbytes is not None and data_offset + t.offset + nbytes > size:
            raise ValueError(f"truncated: {path} is {size} bytes but tensor {t.name} ends at "
                             f"byte {data_offset + t.offset + nbytes}")
    return GgufHeader(version, metadata, tuple(tensors), data_offset, size)


def _int(metadata: dict[str, object], key: str) -> int:
    value = metadata.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str(metadata: dict[str, object], key: str) -> str:
    value = metadata.get(key, "")
    return value if isinstance(value, str) else ""


def quantisation(header: GgufHeader) -> str:
    """general.file_type's name ("Q4_K_M", "F16"); without one, the type that most of
    the weights (by element count) have."""
    if "general.file_type" in header.metadata:
        ftype = _int(header.metadata, "general.file_type") & ~_FILE_TYPE_GUESSED
        return FILE_TYPES.get(ftype, f"file type {ftype}")
    counts: Counter[str] = Counter()
    for t in header.tensors:
        counts[t.type_name] += t.elements
    return counts.most_common(1)[0][0] if counts else "unknown"


def info(header: GgufHeader, path: Path) -> GgufInfo:
    m = header.metadata
    arch = _str(m, "general.architecture")
    tokens = m.get("tokenizer.ggml.tokens", ())
    return GgufInfo(
        architecture=arch or "unknown",
        name=_str(m, "general.name") or path.stem,
        parameters=sum(t.elements for t in header.tensors),
        quantisation=quantisation(header),
        context_length=_int(m, f"{arch}.context_length"),
        layers=_int(m, f"{arch}.block_count"),
        embedding_length=_int(m, f"{arch}.embedding_length"),
        vocab_size=_int(m, f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, tuple)
                                                      else 0),
        chat_template=_str(m, "tokenizer.chat_template"),
        size_bytes=header.size_bytes,
    )


def read_info(path: Path) -> GgufInfo:
    """The model facts of the GGUF file at ``path`` (ValueError as ``read_header``)."""
    return info(read_header(path), Path(path))
