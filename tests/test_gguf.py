"""drivers/gguf.py against the gguf package's GGUFReader, and on files that are not GGUF."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from drivers.gguf import FILE_TYPES, GGML_TYPES, read_header, read_info
from tests.tinymodel import CHATML_TEMPLATE, write_tiny_gguf


def reader_values(reader: gguf.GGUFReader) -> dict[str, object]:
    """GGUFReader's metadata as plain Python values (arrays as tuples)."""
    values: dict[str, object] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        values[key] = tuple(value) if isinstance(value, list) else value
    return values


def same(a: object, b: object) -> bool:
    """Equal, with float32 values compared as float32."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.float32(a) == np.float32(b))  # type: ignore[arg-type]
    return a == b


def check_against_reader(path: Path) -> None:
    header = read_header(path)
    reader = gguf.GGUFReader(path)
    expected = reader_values(reader)
    assert header.metadata.keys() == expected.keys()
    for key, value in expected.items():
        assert same(header.metadata[key], value), key
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert mine.shape == tuple(int(d) for d in theirs.shape), mine.name
        assert mine.type == int(theirs.tensor_type), mine.name
        assert mine.elements == int(theirs.n_elements), mine.name
        assert mine.nbytes == int(theirs.n_bytes), mine.name
        assert header.data_offset + mine.offset == int(theirs.data_offset), mine.name
    info = read_info(path)
    assert info.parameters == sum(int(t.n_elements) for t in reader.tensors)
    assert info.size_bytes == path.stat().st_size


def test_tiny_model_matches_gguf_reader(tiny_model: Path) -> None:
    check_against_reader(tiny_model)
    info = read_info(tiny_model)
    assert info.architecture == "llama"
    assert info.name == "axfs-tiny-llama"
    assert info.quantisation == "F32"
    assert (info.layers, info.embedding_length) == (2, 64)
    assert info.context_length == 65536  # TINY_CTX in conftest
    assert info.vocab_size == 870
    assert info.chat_template == ""


def test_chat_template_is_read(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "chat.gguf", chat_template=CHATML_TEMPLATE)
    check_against_reader(path)
    info = read_info(path)
    assert info.chat_template == CHATML_TEMPLATE
    assert info.vocab_size == 874  # four chat control tokens more


def test_gemma_matches_gguf_reader(gemma_model: Path) -> None:
    start = time.monotonic()
    info = read_info(gemma_model)
    took = time.monotonic() - start
    check_against_reader(gemma_model)
    assert info.architecture == "gemma3"
    assert info.name == "Gemma 3 270m"
    assert info.quantisation == "Q4_K_M"
    assert (info.layers, info.embedding_length, info.context_length) == (18, 640, 32768)
    assert info.vocab_size == 262144
    assert 268_000_000 < info.parameters < 268_200_000  # llama.cpp says 268.1M
    assert took < 3, f"reading Gemma's header took {took:.1f} s"


def test_type_tables_match_the_gguf_package() -> None:
    for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
        assert GGML_TYPES[int(qtype)] == (qtype.name, block, size)
    for ftype in gguf.LlamaFileType:
        if ftype is not gguf.LlamaFileType.GUESSED:
            assert FILE_TYPES[int(ftype)] == ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def test_quantisation_without_file_type_is_the_commonest_weight_type(tmp_path: Path) -> None:
    path = tmp_path / "nofiletype.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("big", np.zeros((64, 64), dtype=np.float16))
    w.add_tensor("norm1", np.ones(64, dtype=np.float32))
    w.add_tensor("norm2", np.ones(64, dtype=np.float32))  # more F32 tensors, fewer elements
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = read_info(path)
    assert info.quantisation == "F16"
    assert (info.architecture, info.name, info.layers, info.context_length) == (
        "llama", "nofiletype", 0, 0)
    assert info.parameters == 64 * 64 + 128


def test_big_endian_file(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_name("big end")
    w.add_block_count(3)
    w.add_array("some.numbers", [1, 2, 3])
    w.add_tensor("t", np.zeros((2, 8), dtype=np.float32).byteswap())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = read_header(path)
    assert header.metadata["some.numbers"] == (1, 2, 3)
    assert header.tensors[0].shape == (8, 2)
    info = read_info(path)
    assert (info.name, info.layers, info.parameters) == ("big end", 3, 16)


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "is empty"),
    (b"PK\x03\x04 a zip file, not a model", "not a GGUF file"),
    (b"GGU", "not a GGUF file"),
    (b"GGUF\x01\x00\x00\x00" + bytes(16), "version 1"),
    (b"GGUF\x03\x00\x00", "truncated"),
    (b"GGUF\x03\x00\x00\x00" + (1).to_bytes(8, "little"), "truncated"),
    (b"GGUF\x03\x00\x00\x00" + bytes(8) + (1 << 60).to_bytes(8, "little") + bytes(12), "truncated"),
])
def test_bad_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        read_info(path)


def test_truncated_anywhere(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_model.read_bytes()
    header = read_header(tiny_model)
    path = tmp_path / "cut.gguf"
    # inside the metadata, inside the tensor infos, and inside the tensor data
    for cut in (100, header.data_offset - 40, header.data_offset + 1000, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            read_info(path)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_info(tmp_path / "nothing.gguf")
