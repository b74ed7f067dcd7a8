"""Snapshot pieces (`snapshot.Span`): a sequence written in pieces while it keeps growing, as a
migration's pre-copy writes it, reads back into another memory as the very sequence one snapshot
gives — on every memory kind — and a piece out of order, forged or too large changes nothing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statemesh.memory import (
    InvalidInput,
    Memory,
    MemoryFull,
    SnapshotCorrupt,
    SnapshotIncompatible,
    create_memory,
    merge_snapshots,
)
from statemesh.memory import snapshot as fmt

from .helpers import KINDS, attention_spec, make, observe, run_step

ALL_KINDS = [*KINDS, "windowed"]  # "windowed": every layer windowed (Mistral-style), no full cache


def memory(kind: str, n_ctx: int, n_seq_max: int = 4) -> Memory:
    if kind == "windowed":
        return create_memory(attention_spec(window=3), n_ctx=n_ctx, n_seq_max=n_seq_max, backend="numpy")
    return make(kind, n_ctx=n_ctx, n_seq_max=n_seq_max)


def grow(mem: Memory, seq: int, n: int, salt: float = 0.0) -> None:
    """Feed seq n more tokens, one step each (as decoding does)."""
    for _ in range(n):
        run_step(mem, [mem.seq_pos_max(seq) + 1], [seq], salt=salt)


@pytest.mark.parametrize("kind", ALL_KINDS)
@settings(max_examples=settings.default.max_examples // 6, deadline=None)
@given(
    prompt=st.integers(1, 20),
    rounds=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 4)), max_size=4),
    tail=st.integers(0, 4),
    target_seq=st.integers(0, 3),
)
def test_pieces_written_while_the_sequence_grows_read_back_as_one_snapshot(
    kind: str, prompt: int, rounds: list[tuple[int, int]], tail: int, target_seq: int
) -> None:
    source = memory(kind, n_ctx=64)
    run_step(source, list(range(prompt)), [1] * prompt, n_ubatch=5)
    run_step(source, [0, 1, 2], [0, 0, 0], salt=5.0)  # a neighbour that must not travel
    target = memory(kind, n_ctx=80, n_seq_max=5)
    neighbour = (target_seq + 1) % 4
    run_step(target, [0, 1], [neighbour, neighbour], salt=7.0)  # and one there that must stay
    before = target.state_write(neighbour)

    sent = 0
    for size, decoded in rounds:  # each round: a piece of what is held, then the sequence goes on
        end = min(source.seq_pos_max(1) + 1, sent + size)
        if end > sent:
            target.state_read(source.state_write(1, sent, end), seq=target_seq)
            sent = end
        grow(source, 1, decoded, salt=float(size))
    grow(source, 1, tail)
    target.state_read(source.state_write(1, sent or None, None), seq=target_seq)

    target.check_integrity()
    whole = memory(kind, n_ctx=80, n_seq_max=5)
    whole.state_read(source.state_write(1), seq=target_seq)
    assert target.state_write(target_seq) == whole.state_write(target_seq)
    assert (target.seq_pos_min(target_seq), target.seq_pos_max(target_seq)) == (
        source.seq_pos_min(1),
        source.seq_pos_max(1),
    )
    assert target.state_write(neighbour) == before


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_first_piece_replaces_what_the_sequence_held(kind: str) -> None:
    source = memory(kind, n_ctx=32)
    run_step(source, list(range(6)), [0] * 6)
    target = memory(kind, n_ctx=32)
    run_step(target, list(range(9)), [0] * 9, salt=3.0)  # stale content under the same id
    target.state_read(source.state_write(0, 0, 4), seq=0)
    target.state_read(source.state_write(0, 4, None), seq=0)
    target.check_integrity()
    assert target.state_write(0) == source.state_write(0)


@pytest.mark.parametrize("kind", ["kv", "iswa", "hybrid"])
def test_a_piece_that_does_not_continue_the_sequence_changes_nothing(kind: str) -> None:
    source = memory(kind, n_ctx=32)
    run_step(source, list(range(10)), [0] * 10)
    target = memory(kind, n_ctx=32)
    with pytest.raises(SnapshotIncompatible, match="continues a sequence from position 4"):
        target.state_read(source.state_write(0, 4, 8), seq=0)  # nothing before it was read
    target.state_read(source.state_write(0, 0, 4), seq=0)
    seen = observe(target)
    with pytest.raises(SnapshotIncompatible, match="read the pieces in order"):
        target.state_read(source.state_write(0, 6, None), seq=0)  # 4 .. 5 skipped
    assert observe(target) == seen
    target.state_read(source.state_write(0, 4, None), seq=0)
    assert target.state_write(0) == source.state_write(0)


def test_a_piece_that_does_not_fit_changes_nothing() -> None:
    source = memory("kv", n_ctx=32)
    run_step(source, list(range(12)), [0] * 12)
    target = memory("kv", n_ctx=8)
    target.state_read(source.state_write(0, 0, 6), seq=0)
    seen = observe(target)
    with pytest.raises(MemoryFull, match="piece needs 6"):
        target.state_read(source.state_write(0, 6, None), seq=0)
    assert observe(target) == seen


def test_pieces_are_of_one_sequence_and_cover_a_real_range() -> None:
    mem = memory("kv", n_ctx=16)
    run_step(mem, list(range(5)), [0] * 5)
    with pytest.raises(InvalidInput, match="give seq"):
        mem.state_write(None, 0, 3)
    for p0, p1 in ((3, 3), (4, 2), (-1, 2)):
        with pytest.raises(InvalidInput, match="0 <= p0 < p1"):
            mem.state_write(0, p0, p1)
    other = memory("kv", n_ctx=16)
    other.state_read(mem.state_write(0, 0, 3))  # without seq=, under its own id, as a whole one
    other.state_read(mem.state_write(0, 3, None))
    assert other.state_write() == mem.state_write()
    assert mem.state_write(0, 0, None) == mem.state_write(0)  # [0, end) is the whole sequence


def _with_header(data: bytes, **fields: int) -> bytes:
    """`data` with header fields replaced and its checksum made right again (a forger can)."""
    names = ["magic", "version", "flags", "dtype", "fingerprint", "total", "n_sections", "seq", "p0", "p1"]
    values = dict(zip(names, fmt.HEADER.unpack_from(data, 0), strict=True))
    values.update(fields)
    body = bytearray(data[: -fmt.CHECKSUM.size])
    fmt.HEADER.pack_into(body, 0, *values.values())
    import xxhash

    return bytes(body) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(body)))


def test_a_forged_piece_header_is_refused_and_changes_nothing() -> None:
    source = memory("kv", n_ctx=16)
    run_step(source, list(range(8)), [0] * 8)
    target = memory("kv", n_ctx=16)
    target.state_read(source.state_write(0, 0, 4), seq=0)
    seen = observe(target)
    piece = source.state_write(0, 4, 6)
    forged = [
        (_with_header(piece, p0=5), SnapshotCorrupt, "outside it"),  # says [5, 6) but holds 4 and 5
        (_with_header(piece, p1=4), SnapshotCorrupt, "not one"),  # p1 <= p0
        (_with_header(piece, p0=0, p1=-1), SnapshotCorrupt, "not one"),  # a "piece" that is whole
        (_with_header(piece, version=1), SnapshotCorrupt, "has no pieces"),
        (_with_header(piece, flags=fmt.FLAG_PIECE), SnapshotCorrupt, "disagrees|not one"),  # no sequence
    ]
    for data, error, message in forged:
        with pytest.raises(error, match=message):
            target.state_read(data, seq=0)
        assert observe(target) == seen


def test_a_middle_piece_carrying_recurrent_states_is_refused() -> None:
    """Only the piece that ends a sequence may carry its states (they change every token)."""
    source = memory("hybrid", n_ctx=16)
    run_step(source, list(range(6)), [0] * 6)
    middle = fmt.decode(source.state_write(0, 2, 4))
    whole = fmt.decode(source.state_write(0))
    sections = [*middle.sections, *[s for s in whole.sections if s.part == fmt.PART_RECURRENT]]
    raw = b"".join(bytes(s.raw) for s in sorted(sections, key=fmt._section_order))
    total = fmt.HEADER.size + len(raw) + fmt.CHECKSUM.size
    header = _with_header(source.state_write(0, 2, 4), total=total, n_sections=len(sections))[: fmt.HEADER.size]
    forged = _with_header(header + raw + bytes(8))
    target = memory("hybrid", n_ctx=16)
    target.state_read(source.state_write(0, 0, 2), seq=0)
    seen = observe(target)
    with pytest.raises(SnapshotCorrupt, match="carries recurrent states"):
        target.state_read(forged, seq=0)
    assert observe(target) == seen


@pytest.mark.parametrize("kind", ["kv", "hybrid", "iswa"])
def test_pieces_of_pipeline_stages_merge_into_the_one_memory_piece(kind: str) -> None:
    one = memory(kind, n_ctx=32)
    spec = one.spec
    halves = [
        create_memory(spec, n_ctx=32, n_seq_max=4, layers=layers, backend="numpy")
        for layers in ([0], list(range(1, len(spec.layers))))
    ]
    for mem in (one, *halves):
        run_step(mem, list(range(7)), [2] * 7, n_ubatch=3)
    for p0, p1 in ((0, 3), (3, 5), (5, None)):
        assert merge_snapshots([h.state_write(2, p0, p1) for h in halves]) == one.state_write(2, p0, p1)
    with pytest.raises(SnapshotIncompatible, match="span"):
        merge_snapshots([halves[0].state_write(2, 0, 3), halves[1].state_write(2, 3, None)])


def test_a_piece_holds_only_its_range() -> None:
    mem = memory("kv", n_ctx=64)
    run_step(mem, list(range(40)), [0] * 40)
    doc = fmt.decode(mem.state_write(0, 10, 25))
    positions = doc.table(fmt.CELL_TABLE, fmt.PART_FULL).arrays[0]  # type: ignore[union-attr]
    assert positions.tolist() == list(range(10, 25))
    assert doc.span == fmt.Span(10, 25)
    tail = fmt.decode(mem.state_write(0, 30, None))
    assert tail.span == fmt.Span(30, None)
    assert [s.arrays[0].shape[0] for s in tail.sections if s.kind == fmt.ATTENTION_LAYER] == [10, 10]
