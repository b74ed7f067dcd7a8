"""`read_gguf_header`: a GGUF file's metadata and tensor infos, read in bulk from a memory map.

The `gguf` package's reader builds a NumPy view for every value it meets: the default model's
49k-token vocabulary and 48k merges become ~250k memmap slices, ~8 s of a 10 s load. Here the header
is walked once with `struct`; a numeric array is one `np.frombuffer`; a string array's lengths are
walked first (its strings lie back to back, each after its 8-byte length), then its strings are
decoded from one bytes object. Tensor data is not read: each tensor's `data` is a view of the mapped
file, typed as the `gguf` reader types it, so `gguf.quants.dequantize` takes it as before.

The layout (GGUF v2 and v3, little-endian; llama.cpp's `ggml/src/gguf.cpp`):
    magic "GGUF", version u32, tensor count u64, key/value count u64
    key/value pairs: key (string), value type u32, value
        string = length u64 + UTF-8 bytes; array = item type u32 + count u64 + the items
    tensor infos: name (string), n_dims u32, dims u64 x n_dims (innermost first), type u32, offset u64
    padding to `general.alignment` (32 when absent), then the tensor data; offsets count from its start

Every count and length is checked against the bytes left in the file before anything is built for
it, so a truncated or forged file gives a `ModelError` that says what is wrong and where, never a
huge allocation.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from statemesh.worker.errors import ModelError

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 had 32-bit counts; v2 and v3 share this layout (v3 allows big-endian files)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # arrays of arrays of ...: a forged file must not exhaust the stack

# GGUF value types (gguf.GGUFValueType) -> how one is stored
STRING, ARRAY = 8, 9
SCALARS = {
    0: struct.Struct("<B"),  # uint8
    1: struct.Struct("<b"),  # int8
    2: struct.Struct("<H"),  # uint16
    3: struct.Struct("<h"),  # int16
    4: struct.Struct("<I"),  # uint32
    5: struct.Struct("<i"),  # int32
    6: struct.Struct("<f"),  # float32
    7: struct.Struct("<?"),  # bool
    10: struct.Struct("<Q"),  # uint64
    11: struct.Struct("<q"),  # int64
    12: struct.Struct("<d"),  # float64
}
ITEMS = {kind: np.dtype(s.format.replace("?", "B")) for kind, s in SCALARS.items()}  # array items; bools as bytes
BOOL = 7
U32, U64 = SCALARS[4], SCALARS[10]
MIN_ITEM_BYTES = {STRING: 8, ARRAY: 12}  # a string's length; an array's type and count

# How the `gguf` reader types a tensor's data: these ggml types (F32, F16, F64, I8, I16, I32, I64) as
# their own dtype, any other type as bytes
PLAIN_TYPES = {0: np.float32, 1: np.float16, 28: np.float64, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64}


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor, with the names and meanings of the `gguf` reader's `ReaderTensor`."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # uint64 dims, GGUF order: innermost first
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray  # a read-only view of the mapped file: [outer dims..., inner] elements, or bytes per row


@dataclass(frozen=True, eq=False)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # key -> int, float, bool, str, or a list of them (a list of lists for nested arrays)
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int  # where the tensor data begins


def read_gguf_header(path: Path) -> GGUFHeader:
    """The metadata and tensor infos of the GGUF file at `path`; `ModelError` when it is not one."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelError(f"{path} is not a readable GGUF file: {size} bytes, shorter than a GGUF header (24)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # keeps its own handle on the file
    except OSError as e:
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from e
    return _Parser(buf, path).header()


class _Parser:
    """A cursor over the mapped file that checks every read against the file's end."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path = buf, path
        self.at, self.end = 0, len(buf)

    def fail(self, what: str) -> NoReturn:
        raise ModelError(f"{self.path} is not a valid GGUF file: {what}")

    def take(self, n: int, what: str) -> int:
        """Moves past `n` bytes holding `what`; where they start."""
        if n > self.end - self.at:
            self.fail(f"{what} at byte {self.at} needs {n} bytes, but the file ends at byte {self.end}")
        at, self.at = self.at, self.at + n
        return at

    def room(self, count: int, item_bytes: int, what: str) -> None:
        """Refuses `count` items of at least `item_bytes` each when the rest of the file cannot hold them."""
        if count * item_bytes > self.end - self.at:
            self.fail(
                f"{what} declares {count} items (at least {count * item_bytes} bytes) at byte {self.at}, "
                f"but only {self.end - self.at} bytes remain"
            )

    def u32(self, what: str) -> int:
        return int(U32.unpack_from(self.buf, self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(U64.unpack_from(self.buf, self.take(8, what))[0])

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        at = self.take(n, what)
        try:
            return self.buf[at : at + n].decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} at byte {at} is not UTF-8 ({e.reason} at its byte {e.start})")

    # ---- the file, top to bottom ---------------------------------------------------------------------

    def header(self) -> GGUFHeader:
        magic = self.buf[0:4]
        if magic != MAGIC:
            raise ModelError(f"{self.path} is not a readable GGUF file: it starts with {magic!r}, not {MAGIC!r}")
        self.at = 4
        version = self.u32("the version")
        if version not in VERSIONS and version & 0xFFFF == 0:
            self.fail(f"version field {version:#010x} is byte-swapped: big-endian GGUF files are not supported")
        if version not in VERSIONS:
            self.fail(f"version {version}; supported: {', '.join(map(str, VERSIONS))}")
        n_tensors, n_keys = self.u64("the tensor count"), self.u64("the key/value count")
        self.room(n_keys, 8 + 4 + 1, "the key/value section")  # key length, value type, a one-byte value
        metadata: dict[str, Any] = {}
        for _ in range(n_keys):
            key = self.string("a metadata key")
            if key in metadata:
                self.fail(f"metadata key {key!r} appears twice")
            metadata[key] = self.value(self.u32(f"the value type of {key!r}"), repr(key), depth=0)
        self.room(n_tensors, 8 + 4 + 4 + 8, "the tensor info section")  # name length, n_dims, type, offset
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            self.fail(f"general.alignment is {alignment!r}; expected a power of two")
        data_offset = self.at + (-self.at) % alignment
        tensors: dict[str, TensorInfo] = {}
        for name, dims, kind, offset in infos:
            if name in tensors:
                self.fail(f"tensor {name!r} appears twice")
            tensors[name] = self.tensor(name, dims, kind, offset, (data_offset, alignment))
        return GGUFHeader(version, metadata, list(tensors.values()), alignment, data_offset)

    def value(self, kind: int, what: str, depth: int) -> Any:
        scalar = SCALARS.get(kind)
        if scalar is not None:
            return scalar.unpack_from(self.buf, self.take(scalar.size, what))[0]
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            return self.array(what, depth)
        self.fail(f"{what} has value type {kind}; known types are 0 .. 12")

    def array(self, what: str, depth: int) -> list[Any]:
        kind = self.u32(f"the item type of {what}")
        count = self.u64(f"the length of {what}")
        items = ITEMS.get(kind)
        if items is not None:
            self.room(count, items.itemsize, what)
            values = np.frombuffer(self.buf, items, count, self.take(count * items.itemsize, what))
            listed: list[Any] = (values != 0).tolist() if kind == BOOL else values.tolist()
            return listed
        if kind == STRING:
            return self.strings(count, what)
        if kind == ARRAY:
            if depth + 1 >= MAX_ARRAY_DEPTH:
                self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
            self.room(count, MIN_ITEM_BYTES[ARRAY], what)
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        self.fail(f"{what} has item type {kind}; known types are 0 .. 12")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings at the cursor: one pass over their lengths for where each lies, then each
        decoded from one bytes object holding them all."""
        self.room(count, MIN_ITEM_BYTES[STRING], what)
        buf, first, end = self.buf, self.at, self.end
        at, bounds = first, [0] * (count + 1)  # string i's bytes: [bounds[i] + 8, bounds[i + 1]) from `first`
        unpack, i = U64.unpack_from, 0
        try:
            for i in range(count):
                at += 8 + unpack(buf, at)[0]  # struct.error once `at` runs past the end (OverflowError far past)
                bounds[i + 1] = at - first
        except (struct.error, OverflowError):
            at = end + 1
        if at > end:
            self.fail(f"{what}[{i}] (of {count} strings from byte {first}) runs past the file's end at byte {end}")
        blob = buf[first:at]
        self.at = at
        try:
            return [blob[a + 8 : b].decode("utf-8") for a, b in itertools.pairwise(bounds)]
        except UnicodeDecodeError:
            bad = next(i for i in range(count) if not _is_utf8(blob[bounds[i] + 8 : bounds[i + 1]]))
            self.fail(f"{what}[{bad}] at byte {first + bounds[bad] + 8} is not UTF-8")

    def tensor_info(self) -> tuple[str, np.ndarray, int, int]:
        name = self.string("a tensor name")
        n_dims = self.u32(f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            self.fail(f"tensor {name!r} has {n_dims} dimensions; expected 1 to {MAX_DIMS}")
        dims = np.frombuffer(self.buf, "<u8", n_dims, self.take(8 * n_dims, f"the dimensions of tensor {name!r}"))
        kind = self.u32(f"the type of tensor {name!r}")
        offset = self.u64(f"the data offset of tensor {name!r}")
        return name, dims.astype(np.uint64), kind, offset

    def tensor(self, name: str, dims: np.ndarray, kind: int, offset: int, data: tuple[int, int]) -> TensorInfo:
        """The tensor's info and a view of its data, once its type, size and place are checked;
        `data` is (where the tensor data begins, its alignment)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # imported when needed: it takes ~0.3 s

        data_offset, alignment = data
        try:
            ggml_type = GGMLQuantizationType(kind)
        except ValueError:
            self.fail(f"tensor {name!r} has type {kind}, which the gguf package does not know")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        shape = [int(d) for d in reversed(dims.tolist())]  # outermost first, as NumPy has it
        if shape[-1] % block:
            self.fail(f"tensor {name!r} rows of {shape[-1]} are not whole {ggml_type.name} blocks of {block}")
        n_elements = int(np.prod(shape, dtype=object))
        if int(np.prod([max(d, 1) for d in shape], dtype=object)) >= 2**63:  # NumPy's limit, even with a 0 dim
            self.fail(f"tensor {name!r} has dimensions {shape}, more elements than an int64 counts")
        n_bytes = n_elements * type_size // block
        start = data_offset + offset
        if offset % alignment or n_bytes > self.end - start:
            self.fail(
                f"tensor {name!r} ({n_bytes} bytes at data offset {offset}) does not lie within the file's "
                f"{self.end - data_offset} data bytes on a {alignment}-byte boundary"
            )
        plain = PLAIN_TYPES.get(kind)
        if plain is not None:
            view = np.frombuffer(self.buf, plain, n_elements, start).reshape(shape)
        else:  # quantized (and BF16): bytes, each innermost row as its blocks
            row_bytes = shape[-1] // block * type_size
            view = np.frombuffer(self.buf, np.uint8, n_bytes, start).reshape(*shape[:-1], row_bytes)
        return TensorInfo(name, ggml_type, dims, n_elements, n_bytes, start, view)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
