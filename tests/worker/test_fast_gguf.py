"""Issue 17 (start fast): the GGUF header read in bulk (`read_gguf_header`) gives what the `gguf`
package's reader gives, for the default model and for a file written here with every value type;
truncated and forged files give a `ModelError` naming what is wrong; the arena writes concatenated
and transposed weights exactly."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statemesh.worker import default_model_path
from statemesh.worker.errors import ModelError
from statemesh.worker.loading.gguf_file import read_gguf
from statemesh.worker.loading.gguf_header import GGUFHeader, read_gguf_header
from statemesh.worker.loading.host_arena import HostArena
from statemesh.worker.loading.tokenizer import tokenizer_from_gguf

# ---- every value type, written by the gguf package ---------------------------------------------------

SCALARS: list[tuple[str, V, Any]] = [
    ("t.u8", V.UINT8, 200),
    ("t.i8", V.INT8, -100),
    ("t.u16", V.UINT16, 60000),
    ("t.i16", V.INT16, -30000),
    ("t.u32", V.UINT32, 4_000_000_000),
    ("t.i32", V.INT32, -2_000_000_000),
    ("t.u64", V.UINT64, 2**63 + 5),
    ("t.i64", V.INT64, -(2**62)),
    ("t.f32", V.FLOAT32, 1.5),
    ("t.f64", V.FLOAT64, 0.1),
    ("t.true", V.BOOL, True),
    ("t.false", V.BOOL, False),
    ("t.str", V.STRING, "héllo ✓ world"),
    ("t.empty", V.STRING, ""),
]
ARRAYS: list[tuple[str, V, list[Any]]] = [
    ("t.a.u8", V.UINT8, [0, 7, 255]),
    ("t.a.i8", V.INT8, [-128, 0, 127]),
    ("t.a.u16", V.UINT16, [1, 65535]),
    ("t.a.i16", V.INT16, [-32768, 32767]),
    ("t.a.u32", V.UINT32, [3, 4_294_967_295]),
    ("t.a.i32", V.INT32, [-5, 6, 2_000_000_000]),
    ("t.a.u64", V.UINT64, [2**64 - 1, 0]),
    ("t.a.i64", V.INT64, [-(2**63), 2**63 - 1]),
    ("t.a.f32", V.FLOAT32, [0.5, -2.25]),
    ("t.a.f64", V.FLOAT64, [1e-300, 3.0]),
    ("t.a.bool", V.BOOL, [True, False, True]),
    ("t.a.str", V.STRING, ["a", "", "ü ✓", "x y", "Ġthe"]),
]


def write_sample(path: Path, alignment: int | None = None) -> dict[str, np.ndarray]:
    """A small GGUF file with every value type and tensors of several types and ranks; the tensors'
    data as written (quantized ones as their bytes)."""
    rng = np.random.default_rng(3)
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, vtype, value in SCALARS:
        writer.add_key_value(key, value, vtype)
    for key, vtype, values in ARRAYS:
        writer.add_key_value(key, values, V.ARRAY, sub_type=vtype)
    tensors = {
        "f32.2d": rng.standard_normal((3, 64)).astype(np.float32),
        "f32.3d": rng.standard_normal((2, 3, 32)).astype(np.float32),
        "f16.1d": rng.standard_normal(64).astype(np.float16),
        "i32": np.arange(5, dtype=np.int32),
        "q8_0": gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q8_0),
        "q4_1": gguf.quants.quantize(rng.standard_normal((4, 32)).astype(np.float32), Q.Q4_1),
    }
    for name, data in tensors.items():
        qtype = {"q8_0": Q.Q8_0, "q4_1": Q.Q4_1}.get(name)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def assert_same_as_gguf_reader(path: Path, header: GGUFHeader) -> None:
    reader = gguf.GGUFReader(str(path))
    expected = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert header.metadata == expected
    assert list(header.metadata) == list(expected)  # in the file's order
    assert header.data_offset == reader.data_offset and header.alignment == reader.alignment
    assert len(header.tensors) == len(reader.tensors)
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert (ours.name, ours.tensor_type, ours.n_elements, ours.n_bytes, ours.data_offset) == (
            theirs.name,
            theirs.tensor_type,
            theirs.n_elements,
            theirs.n_bytes,
            theirs.data_offset,
        )
        assert ours.shape.dtype == theirs.shape.dtype and ours.shape.tolist() == theirs.shape.tolist()
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        np.testing.assert_array_equal(ours.data, theirs.data)


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_reads_as_written_and_as_the_gguf_reader_reads_it(
    tmp_path: Path, alignment: int | None
) -> None:
    path = tmp_path / "sample.gguf"
    written = write_sample(path, alignment)
    header = read_gguf_header(path)
    assert header.version == 3 and header.alignment == (alignment or 32)
    assert header.data_offset % header.alignment == 0
    for key, _, value in SCALARS:
        assert header.metadata[key] == value and type(header.metadata[key]) is type(value), key
    for key, _, values in ARRAYS:
        assert header.metadata[key] == values, key
    assert header.metadata["t.a.f32"] == [0.5, -2.25] and header.metadata["general.architecture"] == "llama"
    by_name = {t.name: t for t in header.tensors}
    assert list(by_name) == list(written)
    np.testing.assert_array_equal(by_name["f32.3d"].data, written["f32.3d"])
    np.testing.assert_array_equal(by_name["q8_0"].data, written["q8_0"])
    assert by_name["f32.3d"].shape.tolist() == [32, 3, 2]  # innermost first, as GGUF stores them
    assert by_name["q4_1"].tensor_type == Q.Q4_1 and by_name["q4_1"].n_elements == 4 * 32
    assert not by_name["f32.2d"].data.flags.writeable  # a view of the read-only mapping
    assert_same_as_gguf_reader(path, header)


def test_the_default_model_reads_as_the_gguf_reader_reads_it() -> None:
    path = default_model_path()
    header = read_gguf_header(path)
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 49152
    assert header.metadata["tokenizer.ggml.merges"][0].count(" ") >= 1
    assert_same_as_gguf_reader(path, header)


# ---- truncated and forged files ------------------------------------------------------------------


def test_every_truncation_is_a_model_error(tmp_path: Path) -> None:
    """Cut anywhere before the end of the last tensor's data: a ModelError, never another error.
    (What follows the last tensor is padding: a file cut there still reads, the same.)"""
    path = tmp_path / "sample.gguf"
    write_sample(path)
    data = path.read_bytes()
    whole = read_gguf_header(path)
    end = max(t.data_offset + t.n_bytes for t in whole.tensors)
    cut = tmp_path / "cut.gguf"
    for size in range(len(data)):
        cut.write_bytes(data[:size])
        if size < end:
            with pytest.raises(ModelError, match=str(cut)):
                read_gguf_header(cut)
        else:
            assert read_gguf_header(cut).metadata == whole.metadata


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=4))
def test_flipped_bits_give_a_model_error_or_a_file_that_holds_together(
    tmp_path: Path, flips: list[tuple[int, int]]
) -> None:
    """Bit flips anywhere in the header (counts, lengths, types, offsets): a ModelError, or a
    header whose tensors lie within the file; and never an allocation beyond a small multiple of
    the file's size."""
    path = tmp_path / "sample.gguf"
    if not path.exists():
        write_sample(path)
    data = bytearray(path.read_bytes())
    header_bytes = read_gguf_header(path).data_offset
    for at, bit in flips:
        data[at % header_bytes] ^= 1 << bit
    forged = tmp_path / "forged.gguf"
    forged.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        header = read_gguf_header(forged)
    except ModelError as e:
        assert str(forged) in str(e)
    else:
        for t in header.tensors:
            assert header.data_offset <= t.data_offset and t.data_offset + t.n_bytes <= len(data)
            assert t.data.nbytes == t.n_bytes
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 100 * len(data) + (1 << 20)


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", vtype) + payload


def array(item_type: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", item_type, count) + items


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf_file(kvs: list[bytes], tensors: list[bytes] = (), *, version: int = 3, n_kv: int | None = None,
              n_tensors: int | None = None, data: bytes = b"\0" * 256, magic: bytes = b"GGUF") -> bytes:  # fmt: skip
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)  # fmt: skip
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


def nested(depth: int) -> bytes:
    return array(V.UINT8, 1, b"\1") if depth == 0 else array(V.ARRAY, 1, nested(depth - 1))


GOOD_KV = kv("general.architecture", V.STRING, string("llama"))
FORGED = [
    ("empty", b"", "shorter than a GGUF header"),
    ("short", b"GGUF\3\0\0\0", "shorter than a GGUF header"),
    ("magic", gguf_file([GOOD_KV], magic=b"GGML"), "starts with b'GGML'"),
    ("version 1", gguf_file([GOOD_KV], version=1), "version 1; supported: 2, 3"),
    ("big-endian", gguf_file([GOOD_KV], version=3 << 24), "big-endian GGUF files are not supported"),
    ("key count", gguf_file([GOOD_KV], n_kv=2**63), "the key/value section declares 9223372036854775808 items"),
    ("tensor count", gguf_file([GOOD_KV], n_tensors=2**40), "the tensor info section declares 1099511627776"),
    ("key length", gguf_file([struct.pack("<Q", 2**64 - 1)]), "needs 18446744073709551615 bytes"),
    ("key utf-8", gguf_file([kv(b"bad\xff", V.UINT8, b"\1")]), "a metadata key at byte 32 is not UTF-8"),
    ("value type", gguf_file([kv("k", 13, b"\0" * 8)]), "'k' has value type 13"),
    ("value cut", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv("k", V.UINT64, b""), "'k' at byte 37 needs 8 bytes"),
    ("string length", gguf_file([kv("k", V.STRING, struct.pack("<Q", 2**40))]), "'k' at byte 45 needs 1099511627776"),
    ("array length", gguf_file([kv("k", V.ARRAY, array(V.UINT32, 2**62))]), "'k' declares 4611686018427387904 items"),
    ("item type", gguf_file([kv("k", V.ARRAY, array(99, 1))]), "'k' has item type 99"),
    ("strings count", gguf_file([kv("k", V.ARRAY, array(V.STRING, 2**61))]), "'k' declares 2305843009213693952 items"),
    (
        "string item length",
        gguf_file([kv("k", V.ARRAY, array(V.STRING, 2, string("ok") + struct.pack("<Q", 10**9)))]),
        r"'k'\[1\] \(of 2 strings from byte 49\) runs past the file's end",
    ),
    (
        "string item utf-8",
        gguf_file([kv("k", V.ARRAY, array(V.STRING, 2, string("ok") + string(b"\xc3")))]),
        r"'k'\[1\] at byte 67 is not UTF-8",
    ),
    ("nesting", gguf_file([kv("k", V.ARRAY, nested(9))]), "nests arrays deeper than 8"),
    ("duplicate key", gguf_file([GOOD_KV, GOOD_KV]), "metadata key 'general.architecture' appears twice"),
    (
        "alignment",
        gguf_file([kv("general.alignment", V.UINT32, struct.pack("<I", 48))]),
        "general.alignment is 48; expected a power of two",
    ),
    ("dims", gguf_file([GOOD_KV], [tensor_info("w", [1, 1, 1, 1, 1])]), "tensor 'w' has 5 dimensions; expected 1 to 4"),
    ("no dims", gguf_file([GOOD_KV], [tensor_info("w", [])]), "tensor 'w' has 0 dimensions"),
    ("tensor type", gguf_file([GOOD_KV], [tensor_info("w", [4], ggml_type=99)]), "tensor 'w' has type 99"),
    ("blocks", gguf_file([GOOD_KV], [tensor_info("w", [40], ggml_type=Q.Q8_0)]), "rows of 40 are not whole Q8_0"),
    ("past the end", gguf_file([GOOD_KV], [tensor_info("w", [65])]), "'w' .260 bytes at data offset 0. does not lie"),
    ("offset", gguf_file([GOOD_KV], [tensor_info("w", [4], offset=8)]), "on a 32-byte boundary"),
    ("far offset", gguf_file([GOOD_KV], [tensor_info("w", [4], offset=2**63)]), "does not lie within"),
    ("elements", gguf_file([GOOD_KV], [tensor_info("w", [2**62, 2**62])]), "more elements than an int64 counts"),
    ("zero dim", gguf_file([GOOD_KV], [tensor_info("w", [2**62, 0, 2**62])]), "more elements than an int64 counts"),
    (
        "duplicate tensor",
        gguf_file([GOOD_KV], [tensor_info("w", [4]), tensor_info("w", [4], offset=32)]),
        "tensor 'w' appears twice",
    ),
]


@pytest.mark.parametrize(("case", "content", "message"), FORGED, ids=[c[0] for c in FORGED])
def test_a_forged_file_is_a_model_error_that_says_what_is_wrong(
    tmp_path: Path, case: str, content: bytes, message: str
) -> None:
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        read_gguf_header(path)
    with pytest.raises(ModelError, match=message):
        read_gguf(path, progress=False)  # the loader passes it on as it is


def test_a_well_formed_hand_written_file_reads(tmp_path: Path) -> None:
    """The forging helpers above write files that read (so each case fails for its one fault)."""
    content = gguf_file([GOOD_KV, kv("k", V.ARRAY, nested(3))], [tensor_info("w", [4]), tensor_info("v", [8], 0, 32)])
    path = tmp_path / "ok.gguf"
    path.write_bytes(content)
    header = read_gguf_header(path)
    assert header.metadata == {"general.architecture": "llama", "k": [[[[1]]]]}
    assert [(t.name, t.data.shape, t.data_offset - header.data_offset) for t in header.tensors] == [
        ("w", (4,), 0),
        ("v", (8,), 32),
    ]


def test_a_directory_or_a_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        read_gguf_header(tmp_path)
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        read_gguf_header(tmp_path / "none.gguf")


def test_merges_of_unknown_tokens_are_a_model_error() -> None:
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"]}
    assert tokenizer_from_gguf({**meta, "tokenizer.ggml.merges": ["a b"]}).hf.encode("ab").ids == [2]
    with pytest.raises(ModelError, match="merges do not fit its 3 tokens"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.merges": ["a c"]})
    with pytest.raises(ModelError, match="merges do not fit its 3 tokens"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.merges": ["ab"]})  # no space: not a pair


# ---- the arena -------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
def test_the_arena_concatenates_and_transposes_exactly(axis: int) -> None:
    rng = np.random.default_rng(axis)
    arena = HostArena()
    sources = [rng.standard_normal((200, 70)), rng.standard_normal((70, 130)).T, rng.standard_normal((9, 70))]
    parts = [s if axis == 0 else s.T for s in sources]  # axis 1: [70, rows] each, two of them transposed
    out = arena.concatenate(parts, axis, np.float32)
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.concatenate(parts, axis=axis).astype(np.float32))
    wide = rng.standard_normal((3000, 70)).astype(np.float32)  # many blocks of a transposed copy
    np.testing.assert_array_equal(arena.copy(wide.T), wide.T)
    np.testing.assert_array_equal(arena.copy(wide[::-1].T), wide[::-1].T)  # negative strides too


def test_the_arena_keeps_its_contents_when_its_pages_become_huge() -> None:
    """The arena collapses what it wrote into huge pages on a thread, after writes pause; the
    arrays read the same before and after (a copy of 6 MB covers whole 2 MB pages)."""
    rng = np.random.default_rng(5)
    arena = HostArena()
    sources = [rng.standard_normal((1536, 1024)).astype(np.float32), rng.standard_normal(777).astype(np.float32)]
    copies = [arena.copy(s) for s in sources]
    assert arena.settle(timeout=60)
    for s, c in zip(sources, copies, strict=True):
        np.testing.assert_array_equal(c, s)
    more = arena.copy(sources[0].T)  # writing after a collapse works, and is collapsed in turn
    assert arena.settle(timeout=60)
    np.testing.assert_array_equal(more, sources[0].T)
    np.testing.assert_array_equal(copies[0], sources[0])
