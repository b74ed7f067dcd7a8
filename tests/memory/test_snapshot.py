"""Snapshots: round trips for every kind, determinism, one-sequence restores, pipeline merges, and
atomic refusal of damaged or mismatched input."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from statemesh.memory import (
    MemoryFull,
    MemorySpec,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotIncompatible,
    SnapshotTooLarge,
    SnapshotTruncated,
    SnapshotVersionError,
    create_memory,
    merge_snapshots,
)
from statemesh.memory import snapshot as fmt

from .helpers import KINDS, attention_spec, make, observe, run_step

SPECS = {kind: make(kind).spec for kind in KINDS}


def filled(kind: str, n_ctx: int = 32, n_seq_max: int = 4, **kw) -> object:  # type: ignore[no-untyped-def]
    mem = make(kind, n_ctx=n_ctx, n_seq_max=n_seq_max, **kw)
    run_step(mem, [0, 1, 2, 3, 4, 0, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1], n_ubatch=3)
    mem.seq_cp(0, 2)
    run_step(mem, [5, 5], [0, 2], salt=0.25)
    return mem


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_into_a_memory_of_another_size_restores_everything(kind: str) -> None:
    mem = filled(kind)
    data = mem.state_write()
    other = make(kind, n_ctx=48, n_seq_max=6)
    other.state_read(data)
    other.check_integrity()
    assert other.state_write() == data
    assert [(s, other.seq_pos_min(s), other.seq_pos_max(s)) for s in other.seq_ids()] == observe(mem)[2]
    assert other.stats()["cells_used"] == mem.stats()["cells_used"]  # sharing survives


@pytest.mark.parametrize("kind", KINDS)
def test_same_content_gives_the_same_bytes_whatever_the_cell_layout(kind: str) -> None:
    a = make(kind, n_ctx=32)
    run_step(a, [0, 1, 2], [1, 1, 1])
    b = make(kind, n_ctx=40)
    run_step(b, [0, 1, 2, 3, 4, 5], [3] * 6, salt=9.0)  # occupy other cells first
    run_step(b, [0, 1, 2], [1, 1, 1])
    b.seq_rm(3)
    assert a.state_write(1) == b.state_write(1)
    assert a.state_write() == b.state_write()


@pytest.mark.parametrize("kind", KINDS)
def test_one_sequence_restores_under_another_id_replacing_only_that_id(kind: str) -> None:
    src = filled(kind)
    dst = make(kind)
    run_step(dst, [0, 1, 2], [1, 1, 1], salt=3.0)
    run_step(dst, [0, 1], [3, 3], salt=4.0)
    keep = dst.state_write(3)
    dst.state_read(src.state_write(0), seq=1)
    dst.check_integrity()
    assert dst.state_write(3) == keep
    assert dst.seq_pos_max(1) == src.seq_pos_max(0)
    for layer in dst.layers:
        if layer in dst.spec.attention_layers:
            np.testing.assert_array_equal(dst.kv(layer, 1)[0], src.kv(layer, 0)[0])
        else:
            np.testing.assert_array_equal(dst.state(layer, 1)[1], src.state(layer, 0)[1])
    # without seq= it comes back under its own id
    fresh = make(kind)
    fresh.state_read(src.state_write(2))
    assert fresh.seq_ids() == [2]


@pytest.mark.parametrize("kind", KINDS)
def test_two_pipeline_halves_merge_into_a_one_piece_memory_and_back(kind: str) -> None:
    spec = SPECS[kind]
    stateful = [i for i, s in enumerate(spec.layers) if s is not None]
    cut = len(spec.layers) // 2
    whole = filled(kind)
    halves = []
    for layers in (range(0, cut), range(cut, len(spec.layers))):
        if not set(layers) & set(stateful):
            continue
        half = create_memory(spec, n_ctx=32, n_seq_max=4, layers=layers, backend="numpy")
        half.state_read(whole.state_write())  # reads just its own layers
        halves.append(half)
    merged = merge_snapshots([h.state_write() for h in halves])
    assert merged == whole.state_write()  # byte for byte what one piece writes
    one_piece = make(kind)
    one_piece.state_read(merged)
    assert one_piece.state_write() == whole.state_write()
    # one sequence, the same way
    merged_one = merge_snapshots([h.state_write(0) for h in halves])
    assert merged_one == whole.state_write(0)


def test_merging_snapshots_of_different_steps_is_refused() -> None:
    spec = attention_spec(2)
    a = create_memory(spec, n_ctx=8, n_seq_max=2, layers=[0], backend="numpy")
    b = create_memory(spec, n_ctx=8, n_seq_max=2, layers=[1], backend="numpy")
    run_step(a, [0, 1], [0, 0])
    run_step(b, [0], [0])
    with pytest.raises(SnapshotIncompatible, match="table differs"):
        merge_snapshots([a.state_write(), b.state_write()])
    with pytest.raises(SnapshotIncompatible, match="more than one"):
        merge_snapshots([a.state_write(), a.state_write()])


def damaged(data: bytes) -> list[tuple[str, bytes]]:
    cases = [
        ("truncated header", data[:40]),
        ("truncated body", data[:-100]),
        ("truncated by one", data[:-1]),
        ("trailing junk", data + b"\0junk"),
        ("empty", b""),
        ("not a snapshot", b"GGUF" + data[4:]),
    ]
    for offset in (0, 9, 12, 20, 36, 44, 64, 70, 100, len(data) // 2, len(data) - 9, len(data) - 1):
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        cases.append((f"bit flip at {offset}", bytes(flipped)))
    return cases


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_snapshots_raise_snapshot_error_and_change_nothing(kind: str) -> None:
    data = filled(kind).state_write()
    target = make(kind)
    run_step(target, [0, 1], [2, 2], salt=7.0)
    before = observe(target)
    for what, bad in damaged(data):
        with pytest.raises(SnapshotError):
            target.state_read(bad)
        with pytest.raises(SnapshotError):
            target.state_read(bad, seq=1)
        assert observe(target) == before, what
    target.check_integrity()


def test_each_kind_of_damage_gets_its_own_error() -> None:
    data = filled("kv").state_write()
    target = make("kv")
    with pytest.raises(SnapshotTruncated, match="declares"):
        target.state_read(data[:-8])
    with pytest.raises(SnapshotCorrupt, match="after its declared end"):
        target.state_read(data + b"x")
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        target.state_read(data[:200] + bytes([data[200] ^ 1]) + data[201:])
    with pytest.raises(SnapshotCorrupt, match="magic"):
        target.state_read(b"PK\x03\x04" + data[4:])
    with pytest.raises(SnapshotVersionError, match="version 7"):
        target.state_read(data[:8] + struct.pack("<H", 7) + data[10:])
    small = create_memory(attention_spec(), n_ctx=2, n_seq_max=1, backend="numpy")
    with pytest.raises(SnapshotTooLarge, match="cap"):
        small.state_read(fmt.MAGIC + bytes(small.max_snapshot_bytes))


def test_a_forged_snapshot_with_a_valid_checksum_is_still_checked() -> None:
    """A client can compute the checksum: the structure is validated field by field anyway."""
    data = bytearray(filled("kv").state_write())
    first_section = fmt.HEADER.size
    struct.pack_into("<Q", data, first_section + 16, 1 << 40)  # a section length past the end
    body = len(data) - fmt.CHECKSUM.size
    import xxhash

    struct.pack_into("<Q", data, body, xxhash.xxh3_64_intdigest(bytes(data[:body])))
    with pytest.raises(SnapshotCorrupt, match="past the body end"):
        make("kv").state_read(bytes(data))


def test_mismatched_snapshots_are_incompatible() -> None:
    data = filled("kv").state_write()
    with pytest.raises(SnapshotIncompatible, match="another model"):
        make("iswa").state_read(data)
    other_model = create_memory(
        MemorySpec(attention_spec().layers, model="other"), n_ctx=32, n_seq_max=4, backend="numpy"
    )
    with pytest.raises(SnapshotIncompatible, match="another model"):
        other_model.state_read(data)
    with pytest.raises(SnapshotIncompatible, match="out of range"):
        make("kv", n_seq_max=2).state_read(filled("kv").state_write(3 - 1))
    with pytest.raises(SnapshotIncompatible, match="every sequence"):
        make("kv").state_read(data, seq=1)
    few_seqs = make("kv", n_seq_max=2)
    with pytest.raises(SnapshotIncompatible, match="names sequence 2"):
        few_seqs.state_read(data)


def test_a_snapshot_that_does_not_fit_is_memory_full_and_changes_nothing() -> None:
    data = filled("kv").state_write()
    small = make("kv", n_ctx=8, n_seq_max=4)
    run_step(small, [0, 1, 2], [3, 3, 3])
    before = observe(small)
    with pytest.raises(MemoryFull):
        small.state_read(data)
    with pytest.raises(MemoryFull, match="free for sequence 1"):
        small.state_read(filled("kv").state_write(0), seq=1)
    assert observe(small) == before


def test_round_trip_never_touches_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was used")

    for name in ("dumps", "loads", "dump", "load", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    mem = filled("hybrid_iswa")
    data = mem.state_write()
    other = make("hybrid_iswa")
    other.state_read(data)
    assert merge_snapshots([data]) == data
    assert b"numpy" not in data and b"\x80\x04" not in data[:16]


def test_write_buffer_is_the_same_bytes_without_the_copy() -> None:
    mem = filled("kv")
    view = mem.state_write_buffer()
    assert view.readonly and bytes(view) == mem.state_write()
    make("kv").state_read(view)  # any bytes-like input reads
    make("kv").state_read(np.frombuffer(view, dtype=np.uint8))
