"""The snapshot format: a sequence's (or every sequence's) state as portable, checked bytes.

Layout (docs/snapshot-format.md has every byte): a 64-byte header (magic, version, flags, dtype,
model fingerprint, total length, section count, sequence id), then sections, each a 32-byte header,
array descriptors and 64-byte-aligned arrays, then an xxh3-64 checksum of everything before it.

Sections are tables (attention cells: positions and owners; recurrent states: which sequence holds
which state at which position) and one section per global layer with that layer's rows in table
order. A memory reads the tables of its parts and the sections of the layers it holds, so snapshots
move between pipeline splits; `merge_snapshots` joins what the stages of one pipeline wrote.

Reading never uses pickle and never trusts a length: every field is bounds-checked before use.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from statemesh.memory.backend import Backend
from statemesh.memory.errors import (
    SnapshotCorrupt,
    SnapshotIncompatible,
    SnapshotTooLarge,
    SnapshotTruncated,
    SnapshotVersionError,
)
from statemesh.memory.specs import MemorySpec

MAGIC = b"SMSNAP\r\n"
VERSION = 2  # 2 added pieces (`FLAG_PIECE`, `Span`); a version 1 snapshot reads as a version 2 one without them
READABLE_VERSIONS = (1, 2)
ALIGN = 64
NO_SEQ = 0xFFFFFFFF
NO_LAYER = 0xFFFFFFFF
MAX_DIMS = 6
PARALLEL_CHECKSUM_BYTES = 8 << 20  # below this, a thread costs more than it hides

HEADER = struct.Struct("<8sHHB3x16sQIIqq")  # 64 bytes; the last two: a piece's span (`Span`)
SECTION = struct.Struct("<IIIIQ8x")  # 32 bytes: kind, part, layer, n_arrays, length
ARRAY = struct.Struct("<BB6x6Q")  # 56 bytes: dtype code, ndim, dims (unused dims 0)
CHECKSUM = struct.Struct("<Q")

FLAG_ONE_SEQUENCE = 1
FLAG_PIECE = 2  # a piece of one sequence (`Span`): its p0 and p1 are in the header (p1 = -1: open end)
KNOWN_FLAGS = FLAG_ONE_SEQUENCE | FLAG_PIECE
OPEN_END = -1

# section kinds
CELL_TABLE = 1  # arrays: positions int64 [n], owner counts uint32 [n], owner ids uint32 [sum counts]
STATE_TABLE = 2  # arrays: seq ids uint32 [s], positions int64 [s], state index uint32 [s]
ATTENTION_LAYER = 3  # arrays: k [n, Hkv, D], v [n, Hkv, Dv] (n = that part's cell table)
RECURRENT_LAYER = 4  # arrays: conv [m, *conv_shape], ssm [m, *ssm_shape] (m = distinct states)
SECTION_KINDS = {CELL_TABLE: 3, STATE_TABLE: 3, ATTENTION_LAYER: 2, RECURRENT_LAYER: 2}

# parts: which cache a table or an attention layer belongs to
PART_FULL, PART_WINDOWED, PART_RECURRENT = 0, 1, 2
PART_NAMES = {PART_FULL: "full attention", PART_WINDOWED: "windowed attention", PART_RECURRENT: "recurrent"}

DTYPE_CODES: dict[int, np.dtype[Any]] = {1: np.dtype("<f4"), 2: np.dtype("<f2"), 3: np.dtype("<i8"), 4: np.dtype("<u4")}
CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
MEMORY_DTYPE_CODES = {"float32": 1, "float16": 2}


def _pad(n: int) -> int:
    return -n % ALIGN


@dataclass(frozen=True)
class Span:
    """Which part of one sequence a snapshot holds, for moving a long sequence in pieces while it
    runs (a migration's pre-copy): its full-attention cells at positions [p0, p1), p1 None = to the
    end. The piece with the open end also holds what does not grow with the sequence and changes
    every token — windowed attention cells and recurrent states — whole; the others hold none.

    Read into a sequence, a piece that starts at 0 replaces everything the sequence held; one that
    starts at p0 > 0 continues it: its full-attention cells must end at p0 - 1, and they are kept.
    So pieces [0, a), [a, b), [b, None) read in order give the sequence that one snapshot gives.
    The whole sequence is Span(0, None), which is what a snapshot without the piece flag holds."""

    p0: int = 0
    p1: int | None = None

    def __post_init__(self) -> None:
        if self.p0 < 0 or (self.p1 is not None and self.p1 <= self.p0):
            raise ValueError(f"a snapshot span [p0, p1) needs 0 <= p0 < p1, got [{self.p0}, {self.p1})")

    @property
    def whole(self) -> bool:
        return self.p0 == 0 and self.p1 is None

    @property
    def ends(self) -> bool:
        """Whether it reaches the sequence's end, and so holds its windowed cells and states."""
        return self.p1 is None

    def holds(self, positions: np.ndarray) -> np.ndarray:
        """Which of these positions of full-attention cells the piece holds."""
        inside = positions >= self.p0
        return inside if self.p1 is None else inside & (positions < self.p1)


WHOLE = Span()


@dataclass(frozen=True)
class ArraySource:
    """An array to write: its shape and dtype, and how to fill a host buffer of that shape (so
    device rows are gathered straight into the snapshot, without an intermediate copy)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fill: Callable[[np.ndarray], None]

    @staticmethod
    def of(array: np.ndarray) -> ArraySource:
        a = np.ascontiguousarray(array)
        return ArraySource(a.shape, a.dtype, lambda out: np.copyto(out, a))


@dataclass(frozen=True)
class Section:
    kind: int
    part: int
    layer: int  # NO_LAYER for tables
    arrays: list[ArraySource]


def layer_section(kind: int, part: int, layer: int, arrays: list[Any], rows: np.ndarray, backend: Backend) -> Section:
    """A layer section holding `array[rows]` of each (device) array, gathered straight into the
    snapshot buffer when it is written."""

    def source(array: Any) -> ArraySource:
        dtype = np.dtype(array.dtype).newbyteorder("<")
        return ArraySource((len(rows), *array.shape[1:]), dtype, lambda out: backend.gather_to_host(array, rows, out))

    return Section(kind, part, layer, [source(a) for a in arrays])


@dataclass(frozen=True)
class ReadSection:
    kind: int
    part: int
    layer: int
    arrays: list[np.ndarray]  # read-only views into the snapshot's bytes
    raw: memoryview  # the section's bytes, header included (for merging)


@dataclass(frozen=True)
class Document:
    """A decoded, checksum-verified snapshot; arrays are views into the caller's bytes."""

    dtype: str
    fingerprint: bytes
    seq: int | None  # the sequence of a one-sequence snapshot; None for every sequence
    sections: list[ReadSection]
    span: Span = WHOLE  # what part of its sequence it holds

    def table(self, kind: int, part: int) -> ReadSection | None:
        for s in self.sections:
            if s.kind == kind and s.part == part:
                return s
        return None

    def layer(self, layer: int) -> ReadSection | None:
        for s in self.sections:
            if s.layer == layer and s.kind in (ATTENTION_LAYER, RECURRENT_LAYER):
                return s
        return None


# ---- writing --------------------------------------------------------------------------------------


def _section_order(section: Section | ReadSection) -> tuple[int, int, int]:
    """Tables first (by kind, then part), then layers by id: a merge of pipeline parts gives the
    very bytes a one-piece memory writes."""
    if section.layer == NO_LAYER:
        return (0, section.kind, section.part)
    return (1, section.layer, 0)


def _section_size(section: Section) -> int:
    head = SECTION.size + ARRAY.size * len(section.arrays)
    size = head + _pad(head)
    for a in section.arrays:
        nbytes = int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize
        size += nbytes + _pad(nbytes)
    return size


def _pack_header(out: memoryview, dtype: str, fingerprint: bytes, total: int, n_sections: int,
                 seq: int | None, span: Span) -> None:  # fmt: skip
    if seq is None and not span.whole:
        raise ValueError("a piece (`Span`) is of one sequence; name it")
    flags = (FLAG_ONE_SEQUENCE if seq is not None else 0) | (0 if span.whole else FLAG_PIECE)
    p0, p1 = (0, 0) if span.whole else (span.p0, OPEN_END if span.p1 is None else span.p1)
    seq_field = NO_SEQ if seq is None else seq
    HEADER.pack_into(out, 0, MAGIC, VERSION, flags, MEMORY_DTYPE_CODES[dtype], fingerprint, total, n_sections,
                     seq_field, p0, p1)  # fmt: skip


def encode(spec: MemorySpec, seq: int | None, sections: list[Section], span: Span = WHOLE) -> memoryview:
    """Write the snapshot into one freshly allocated buffer; sections in the order given."""
    sections = sorted(sections, key=_section_order)
    total = HEADER.size + sum(_section_size(s) for s in sections) + CHECKSUM.size
    buf = np.empty(total, dtype=np.uint8)
    out = buf.data  # the buffer as a memoryview, for struct and the checksum
    _pack_header(out, spec.dtype, spec.fingerprint, total, len(sections), seq, span)
    checksum = xxhash.xxh3_64(out[: HEADER.size])
    # Large snapshots hash each section on a second thread (xxhash releases the GIL) while the next
    # one is copied; one worker runs the updates in order, so the digest is the one-pass digest.
    with ThreadPoolExecutor(max_workers=1) if total >= PARALLEL_CHECKSUM_BYTES else nullcontext() as pool:
        offset = HEADER.size
        for section in sections:
            end = _write_section(buf, offset, section)
            if pool is None:
                checksum.update(out[offset:end])
            else:
                pool.submit(checksum.update, out[offset:end])
            offset = end
    assert offset == total - CHECKSUM.size
    CHECKSUM.pack_into(out, offset, checksum.intdigest())
    return out.toreadonly()


def _write_section(buf: np.ndarray, offset: int, section: Section) -> int:
    start = offset
    out = buf.data
    SECTION.pack_into(
        out, offset, section.kind, section.part, section.layer, len(section.arrays), _section_size(section)
    )
    offset += SECTION.size
    for a in section.arrays:
        if len(a.shape) > MAX_DIMS:
            raise ValueError(f"snapshot arrays have at most {MAX_DIMS} dimensions, got {a.shape}")
        dims = tuple(a.shape) + (0,) * (MAX_DIMS - len(a.shape))
        ARRAY.pack_into(out, offset, CODE_OF[a.dtype], len(a.shape), *dims)
        offset += ARRAY.size
    buf[offset : offset + _pad(offset - start)] = 0
    offset += _pad(offset - start)
    for a in section.arrays:
        nbytes = int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize
        a.fill(buf[offset : offset + nbytes].view(a.dtype).reshape(a.shape))
        offset += nbytes
        buf[offset : offset + _pad(nbytes)] = 0
        offset += _pad(nbytes)
    return offset


# ---- reading --------------------------------------------------------------------------------------


def decode(data: Any, max_bytes: int | None = None) -> Document:
    """Check and parse a snapshot. SnapshotError subclasses for anything wrong; nothing trusted."""
    try:
        raw = np.frombuffer(data, dtype=np.uint8)
        mv = raw.data
    except (TypeError, ValueError) as e:
        raise SnapshotCorrupt(f"a snapshot must be bytes-like, got {type(data).__name__}") from e
    n = len(raw)
    if max_bytes is not None and n > max_bytes:
        raise SnapshotTooLarge(f"snapshot of {n} bytes exceeds this reader's cap of {max_bytes} bytes")
    if raw[: len(MAGIC)].tobytes() != MAGIC[: min(n, len(MAGIC))]:
        raise SnapshotCorrupt("not a statemesh snapshot (bad magic in the first 8 bytes)")
    if n < HEADER.size + CHECKSUM.size:
        raise SnapshotTruncated(f"snapshot is {n} bytes, shorter than its {HEADER.size}-byte header")
    _, version, flags, dtype_code, fingerprint, total, n_sections, seq, p0, p1 = HEADER.unpack_from(mv, 0)
    if version not in READABLE_VERSIONS:
        raise SnapshotVersionError(f"snapshot format version {version}; this reader reads versions {READABLE_VERSIONS}")
    if n < total:
        raise SnapshotTruncated(f"snapshot is {n} bytes but its header declares {total}")
    if n > total:
        raise SnapshotCorrupt(f"snapshot has {n - total} bytes after its declared end at {total}")
    body = total - CHECKSUM.size
    (expected,) = CHECKSUM.unpack_from(mv, body)
    if xxhash.xxh3_64_intdigest(mv[:body]) != expected:
        raise SnapshotCorrupt("snapshot checksum mismatch: the bytes were changed or damaged")
    if flags & ~KNOWN_FLAGS:
        raise SnapshotVersionError(f"snapshot uses unknown flags {flags:#x}")
    dtype = {code: name for name, code in MEMORY_DTYPE_CODES.items()}.get(dtype_code)
    if dtype is None:
        raise SnapshotCorrupt(f"unknown dtype code {dtype_code}")
    one_seq = bool(flags & FLAG_ONE_SEQUENCE)
    if one_seq == (seq == NO_SEQ):
        raise SnapshotCorrupt("snapshot header's sequence id disagrees with its flags")
    span = WHOLE
    if flags & FLAG_PIECE and version < 2:
        raise SnapshotCorrupt(f"snapshot format version {version} has no pieces, yet its flags say it is one")
    if flags & FLAG_PIECE:
        if not one_seq or p0 < 0 or (p1 != OPEN_END and p1 <= p0) or (p0 == 0 and p1 == OPEN_END):
            raise SnapshotCorrupt(f"snapshot header declares a piece [{p0}, {p1}) that is not one (flags {flags:#x})")
        span = Span(p0, None if p1 == OPEN_END else p1)
    sections: list[ReadSection] = []
    offset = HEADER.size
    for _ in range(n_sections):
        section, offset = _read_section(raw, offset, body)
        if any(_section_order(s) == _section_order(section) for s in sections):
            raise SnapshotCorrupt(f"section for {_section_order(section)} appears twice")
        sections.append(section)
    if offset != body:
        raise SnapshotCorrupt(f"sections end at byte {offset}, but the checksum is at {body}")
    return Document(dtype, bytes(fingerprint), seq if one_seq else None, sections, span)


def _read_section(raw: np.ndarray, offset: int, end: int) -> tuple[ReadSection, int]:
    if offset + SECTION.size > end:
        raise SnapshotCorrupt(f"section header at byte {offset} runs past the body end {end}")
    mv = raw.data
    kind, part, layer, n_arrays, length = SECTION.unpack_from(mv, offset)
    if SECTION_KINDS.get(kind) != n_arrays or part not in PART_NAMES:
        raise SnapshotCorrupt(f"section at byte {offset}: unknown kind {kind} / part {part} / {n_arrays} arrays")
    if (layer == NO_LAYER) != (kind in (CELL_TABLE, STATE_TABLE)):
        raise SnapshotCorrupt(f"section at byte {offset}: layer field {layer} does not fit kind {kind}")
    if length % ALIGN or offset + length > end:
        raise SnapshotCorrupt(f"section at byte {offset} declares length {length} past the body end {end}")
    start, stop = offset, offset + length
    offset += SECTION.size
    described: list[tuple[np.dtype[Any], tuple[int, ...]]] = []
    for _ in range(n_arrays):
        code, ndim, *dims = ARRAY.unpack_from(mv, offset)
        offset += ARRAY.size
        if code not in DTYPE_CODES or not 1 <= ndim <= MAX_DIMS or any(dims[ndim:]):
            raise SnapshotCorrupt(f"array descriptor at byte {offset - ARRAY.size} is malformed")
        described.append((DTYPE_CODES[code], tuple(dims[:ndim])))
    offset += _pad(offset - start)
    arrays = []
    for dtype, shape in described:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > stop - offset:
            raise SnapshotCorrupt(f"array of shape {shape} at byte {offset} runs past its section")
        arrays.append(raw[offset : offset + nbytes].view(dtype).reshape(shape))
        offset += nbytes + _pad(nbytes)
    if offset != stop:
        raise SnapshotCorrupt(f"section at byte {start} declares {length} bytes but holds {offset - start}")
    return ReadSection(kind, part, layer, arrays, mv[start:stop]), stop


def check_compatible(doc: Document, spec: MemorySpec) -> None:
    if doc.dtype != spec.dtype:
        raise SnapshotIncompatible(f"snapshot holds {doc.dtype} state; this memory stores {spec.dtype}")
    if doc.fingerprint != spec.fingerprint:
        raise SnapshotIncompatible(
            "snapshot was written for another model or layer layout (model fingerprint "
            f"{doc.fingerprint.hex()}, this memory's {spec.fingerprint.hex()})"
        )


# ---- merging pipeline parts -----------------------------------------------------------------------


def merge_snapshots(parts: list[Any]) -> bytes:
    """Join the snapshots that the stages of one pipeline wrote (same model, same sequences, each
    holding some layers) into one that holds all their layers. Tables that several parts carry must
    be identical; a layer may appear in one part only."""
    if not parts:
        raise SnapshotIncompatible("merge_snapshots needs at least one snapshot")
    docs = [decode(p) for p in parts]
    first = docs[0]
    tables: dict[tuple[int, int], ReadSection] = {}
    layers: dict[int, ReadSection] = {}
    for i, doc in enumerate(docs):
        if (doc.dtype, doc.fingerprint, doc.seq, doc.span) != (first.dtype, first.fingerprint, first.seq, first.span):
            raise SnapshotIncompatible(
                f"snapshot {i} differs from snapshot 0 in model, dtype, sequence or span; only the stages "
                "of one pipeline, written for the same sequences, can be merged"
            )
        for s in doc.sections:
            if s.layer == NO_LAYER:
                seen = tables.setdefault((s.kind, s.part), s)
                if bytes(seen.raw) != bytes(s.raw):
                    raise SnapshotIncompatible(
                        f"snapshot {i}'s {PART_NAMES[s.part]} table differs from an earlier part's: "
                        "the stages hold different sequences (write them at the same step)"
                    )
            elif layers.setdefault(s.layer, s) is not s:
                raise SnapshotIncompatible(f"layer {s.layer} appears in more than one snapshot")
    ordered = sorted([*tables.values(), *layers.values()], key=_section_order)
    total = HEADER.size + sum(len(s.raw) for s in ordered) + CHECKSUM.size
    buf = np.empty(total, dtype=np.uint8)
    out = buf.data
    _pack_header(out, first.dtype, first.fingerprint, total, len(ordered), first.seq, first.span)
    offset = HEADER.size
    for s in ordered:
        buf[offset : offset + len(s.raw)] = np.frombuffer(s.raw, dtype=np.uint8)
        offset += len(s.raw)
    CHECKSUM.pack_into(out, offset, xxhash.xxh3_64_intdigest(out[:offset]))
    return buf.tobytes()
