"""`KVCache`: token cells for attention layers, shared between sequences.

Each cell holds one token's K and V rows for every layer of this cache, a position, a set of owner
sequences (`owners[cell, seq]`) and a stamp that orders cells by when they were made (so a snapshot's
cell order depends on content and history, never on which cell indices were free). `seq_cp` shares
cells by adding an owner; nothing is copied until a shift moves one owner's positions.

Each sequence keeps its cells sorted by (position, stamp) in a growable index (`_SeqCells`), so
`kv(layer, seq)` gathers just that sequence's rows, as a block table would: its cost follows the
sequence's length, not the cache's size.

With `window` set, this is the windowed half of an `ISWACache`: before a micro-batch, each of its
sequences lets go of the cells that fell out of its window (a query at position p sees keys at
positions > p - window), and cells no owner needs any more are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from statemesh.memory import snapshot
from statemesh.memory.backend import Array, Backend, get_backend
from statemesh.memory.base import Leaf, Loader, Memory
from statemesh.memory.dense_kv import DenseKV, DenseRows
from statemesh.memory.errors import (
    InvalidInput,
    InvalidLayer,
    InvalidShape,
    MemoryFull,
    SnapshotCorrupt,
    SnapshotIncompatible,
)
from statemesh.memory.plan import MicroBatch, Transaction
from statemesh.memory.specs import AttentionSpec, MemorySpec

KShift = Callable[[int, Array, Array], Array]  # (layer, k [n, Hkv, D], delta [n]) -> re-rotated k

BLOCK = 16  # cells a sequence grows into before it needs a new block (placement only, not reserved)


class _SeqCells:
    """One sequence's cells sorted by (position, stamp), in a buffer that grows by doubling.
    Appends write past `n` only, so an undo record `(buf, n)` stays valid; other changes install
    a new buffer and bump `epoch`, which tells `DenseKV` that rows it copied may be stale."""

    __slots__ = ("buf", "epoch", "n")

    def __init__(self) -> None:
        self.buf = np.empty(16, dtype=np.int64)
        self.n = 0
        self.epoch = 0

    @property
    def cells(self) -> np.ndarray:
        return self.buf[: self.n]

    def append(self, cells: np.ndarray) -> None:
        end = self.n + len(cells)
        if end > len(self.buf):
            grown = np.empty(max(2 * len(self.buf), end), dtype=np.int64)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : end] = cells
        self.n = end

    def set(self, cells: np.ndarray) -> None:
        self.buf = np.array(cells, dtype=np.int64)
        self.n = len(cells)
        self.epoch += 1

    def restore(self, buf: np.ndarray, n: int) -> None:
        """Back to an undo record: the first n cells are as they were, the rest may differ."""
        self.buf, self.n = buf, n
        self.epoch += 1


class KVCache(Memory, Leaf):
    """Attention state for the layers `layers` (global ids, all `AttentionSpec`s of `spec`)."""

    kind = "attention"

    def __init__(
        self,
        spec: MemorySpec,
        *,
        n_cells: int,
        n_seq_max: int,
        layers: tuple[int, ...] | None = None,
        backend: str | Backend = "auto",
        k_shift: KShift | None = None,
        window: int | None = None,
        part: int = snapshot.PART_FULL,
    ):
        if not isinstance(n_cells, int) or n_cells <= 0:
            raise InvalidInput(f"n_cells must be a positive integer, got {n_cells!r}")
        if not isinstance(n_seq_max, int) or n_seq_max <= 0:
            raise InvalidInput(f"n_seq_max must be a positive integer, got {n_seq_max!r}")
        self.spec = spec
        self.layers = tuple(spec.attention_layers if layers is None else layers)
        for layer in self.layers:
            if not 0 <= layer < len(spec.layers) or not isinstance(spec.layers[layer], AttentionSpec):
                raise InvalidLayer(f"layer {layer} is not an attention layer of this spec")
        self.n_cells = n_cells
        self.n_seq_max = n_seq_max
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend)
        self.k_shift = k_shift
        self.window = window
        self.part = part
        self._k = {i: self.backend.zeros((n_cells, *spec.attention(i).k_shape), spec.dtype) for i in self.layers}
        self._v = {i: self.backend.zeros((n_cells, *spec.attention(i).v_shape), spec.dtype) for i in self.layers}
        self.pos = np.full(n_cells, -1, dtype=np.int64)  # -1: the cell is free
        self.owners = np.zeros((n_cells, n_seq_max), dtype=np.bool_)
        self.stamp = np.zeros(n_cells, dtype=np.int64)
        self._next_stamp = 0
        self._n_used = 0
        self._seq = [_SeqCells() for _ in range(n_seq_max)]
        # on the host, dense rows for full attention take their storage now (see `DenseKV`)
        reserve = window is None and self.backend.is_host
        self._dense = DenseKV(self, budget=DenseKV.default_budget(n_cells, n_seq_max), reserve=reserve)

    # ---- helpers ---------------------------------------------------------------------------------

    def _cells(self, seq: int) -> np.ndarray:
        return self._seq[seq].cells

    def _slice(self, seq: int, p0: int | None, p1: int | None) -> tuple[int, int]:
        """Indices [i, j) into seq's sorted cells of the positions in [p0, p1)."""
        pos = self.pos[self._cells(seq)]
        i = 0 if p0 is None else int(np.searchsorted(pos, p0, side="left"))
        j = len(pos) if p1 is None else int(np.searchsorted(pos, p1, side="left"))
        return i, max(i, j)

    def _in_range(self, p0: int | None, p1: int | None) -> np.ndarray:
        """Every occupied cell whose position is in [p0, p1)."""
        mask = self.pos >= (0 if p0 is None else max(p0, 0))
        if p1 is not None:
            mask &= self.pos < p1
        return np.flatnonzero(mask)

    def _find_free(self, n: int) -> np.ndarray:
        free = np.flatnonzero(self.pos < 0)[:n]
        if len(free) < n:
            raise self._full(n, len(free))
        return free

    def _full(self, need: int, have: int) -> MemoryFull:
        return MemoryFull(
            f"{self._name()} needs {need} free cells but has {have} of {self.n_cells} "
            "(free sequences, or make the cache larger)"
        )

    def _place_rows(self, seq_ids: np.ndarray, seqs: tuple[int, ...]) -> np.ndarray:
        """Free cells for a micro-batch's rows (row i of the result for seq_ids[i]), placed so
        each sequence's cells stay close together, as a block table would keep them: first the
        free cells right after the sequence's last cell, then wholly free blocks of BLOCK cells
        (which no other sequence has started), then any free cell. Nothing is reserved, so no
        room is lost; MemoryFull, nothing changed, when there are too few free cells.

        Example, BLOCK=4, two sequences decoding in turns from an empty cache: seq 0 takes cell
        0 (block 0), seq 1 cell 4 (block 1); next step seq 0 takes 1, seq 1 takes 5, ..."""
        free = self.pos < 0
        if int(free.sum()) < len(seq_ids):
            raise self._full(len(seq_ids), int(free.sum()))
        n_blocks = self.n_cells // BLOCK
        block_free = np.all(free[: n_blocks * BLOCK].reshape(n_blocks, BLOCK), axis=1, keepdims=False).reshape(n_blocks)

        def take(cells: np.ndarray) -> None:  # cells given out are neither free nor in a free block
            free[cells] = False
            block_free[cells[cells < n_blocks * BLOCK] // BLOCK] = False

        cells = np.empty(len(seq_ids), dtype=np.int64)
        for s in seqs:
            rows = np.flatnonzero(seq_ids == s)
            taken = self._continue_after_last(s, free, len(rows))
            take(taken)
            if len(taken) < len(rows):
                blocks = np.flatnonzero(block_free)[: -(-(len(rows) - len(taken)) // BLOCK)]
                fresh = (blocks[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)[: len(rows) - len(taken)]
                take(fresh)
                taken = np.concatenate([taken, fresh])
            if len(taken) < len(rows):
                rest = np.flatnonzero(free)[: len(rows) - len(taken)]
                take(rest)
                taken = np.concatenate([taken, rest])
            cells[rows] = taken
        return cells

    def _continue_after_last(self, seq: int, free: np.ndarray, n: int) -> np.ndarray:
        """Up to n free cells in a row right after seq's last cell."""
        held = self._seq[seq]
        if held.n == 0:
            return np.empty(0, dtype=np.int64)
        start = int(held.buf[held.n - 1]) + 1
        run = free[start : start + n]
        length = len(run) if run.all() else int(np.argmin(run))
        return np.arange(start, start + length, dtype=np.int64)

    def _free_orphans(self, cells: np.ndarray) -> None:
        orphans = cells[~self.owners[cells].any(axis=1)]
        self.pos[orphans] = -1
        self._n_used -= len(orphans)

    def _rebuild(self, seq: int) -> None:
        cells = np.flatnonzero(self.owners[:, seq])
        self._seq[seq].set(cells[np.lexsort((self.stamp[cells], self.pos[cells]))])

    def _out_of_window(self, seq: int, first: int) -> np.ndarray:
        """seq's cells that a query at position `first` does not see (a prefix of its sorted cells)."""
        assert self.window is not None
        cells = self._cells(seq)
        return cells[: int(np.searchsorted(self.pos[cells], first - self.window, side="right"))]

    def _let_go(self, seq: int, dead: np.ndarray) -> None:
        """seq stops owning `dead`, a prefix of its cells; cells nobody owns become free."""
        if len(dead):
            self.owners[dead, seq] = False
            self._free_orphans(dead)
            self._seq[seq].set(self._cells(seq)[len(dead) :])

    def check_room_to_shift(self, seq: int | None, p0: int | None, p1: int | None) -> None:
        """MemoryFull if moving seq's positions in [p0, p1) would need more free cells (for copies
        of shared cells) than there are; composites ask every part before any part moves."""
        if seq is None:
            return
        i, j = self._slice(seq, p0, p1)
        need = int((self.owners[self._cells(seq)[i:j]].sum(axis=1) > 1).sum())
        if need > self.n_cells - self._n_used:
            raise MemoryFull(
                f"{self._name()} needs {need} free cells to copy shared cells before moving positions; "
                f"{self.n_cells - self._n_used} are free"
            )

    def _name(self) -> str:
        return "windowed KV cache" if self.window is not None else "KV cache"

    # ---- sequence operations -------------------------------------------------------------------

    def clear(self) -> None:
        self._mutate()
        self.pos[:] = -1
        self.owners[:] = False
        self._n_used = 0
        for s in self._seq:
            s.set(np.empty(0, dtype=np.int64))
        self._dense.forget()

    def seq_rm(self, seq: int | None, p0: int | None = None, p1: int | None = None) -> bool:
        self._mutate()
        seq = self._check_seq_or_all(seq)
        if seq is None:
            cells = self._in_range(p0, p1)
            affected = np.flatnonzero(self.owners[cells].any(axis=0))
            self.owners[cells] = False
            self._free_orphans(cells)
            for s in affected:
                self._rebuild(int(s))
            return True
        i, j = self._slice(seq, p0, p1)
        if i < j:
            cells = self._cells(seq)
            dropped = cells[i:j]
            self.owners[dropped, seq] = False
            self._free_orphans(dropped)
            self._seq[seq].set(np.concatenate([cells[:i], cells[j:]]))
        return True

    def seq_cp(self, src: int, dst: int, p0: int | None = None, p1: int | None = None) -> None:
        self._mutate()
        src, dst = self._check_seq(src), self._check_seq(dst)
        if src == dst:
            return
        self.seq_rm(dst, p0, p1)
        i, j = self._slice(src, p0, p1)
        shared = self._cells(src)[i:j]
        self.owners[shared, dst] = True
        merged = np.concatenate([self._cells(dst), shared])
        self._seq[dst].set(merged[np.lexsort((self.stamp[merged], self.pos[merged]))])

    def seq_keep(self, seq: int) -> None:
        self._mutate()
        seq = self._check_seq(seq)
        others = np.arange(self.n_seq_max) != seq
        self.owners[:, others] = False
        self._free_orphans(np.flatnonzero(self.pos >= 0))
        for s in np.flatnonzero(others):
            self._seq[s].set(np.empty(0, dtype=np.int64))

    def seq_add(self, seq: int | None, p0: int | None, p1: int | None, delta: int) -> None:
        self._mutate()
        if not isinstance(delta, (int, np.integer)):
            raise InvalidInput(f"seq_add delta must be an integer, got {delta!r}")
        if delta != 0:
            self._shift(self._check_seq_or_all(seq), p0, p1, lambda p: p + int(delta))

    def seq_div(self, seq: int | None, p0: int | None, p1: int | None, d: int) -> None:
        self._mutate()
        if not isinstance(d, (int, np.integer)) or d < 1:
            raise InvalidInput(f"seq_div divisor must be an integer >= 1, got {d!r}")
        if d != 1:
            self._shift(self._check_seq_or_all(seq), p0, p1, lambda p: p // int(d))

    def _shift(self, seq: int | None, p0: int | None, p1: int | None, move: Callable[[np.ndarray], np.ndarray]) -> None:
        if seq is None:
            cells = self._in_range(p0, p1)
        else:
            i, j = self._slice(seq, p0, p1)
            cells = self._unshare(seq, self._cells(seq)[i:j])
        affected = np.flatnonzero(self.owners[cells].any(axis=0))
        old = self.pos[cells]
        new = move(old)
        dropped = cells[new < 0]
        self.owners[dropped] = False
        self._free_orphans(dropped)
        kept, delta = cells[new >= 0], (new - old)[new >= 0]
        self.pos[kept] = new[new >= 0]
        if self.k_shift is not None and len(kept):
            idx, d = self.backend.index(kept), self.backend.asarray(delta)
            for layer in self.layers:
                self._k[layer][idx] = self.k_shift(layer, self._k[layer][idx], d)
        for s in affected:
            self._rebuild(int(s))

    def _unshare(self, seq: int, cells: np.ndarray) -> np.ndarray:
        """Give `seq` its own copy of those of `cells` it shares, so moving them leaves the other
        owners' positions alone. MemoryFull, nothing changed, when there is no room."""
        shared = self.owners[cells].sum(axis=1) > 1
        if not shared.any():
            return cells
        src = cells[shared]
        dst = self._find_free(len(src))
        for layer in self.layers:
            self._k[layer][self.backend.index(dst)] = self._k[layer][self.backend.index(src)]
            self._v[layer][self.backend.index(dst)] = self._v[layer][self.backend.index(src)]
        self.pos[dst] = self.pos[src]
        self.stamp[dst] = np.arange(self._next_stamp, self._next_stamp + len(dst))
        self._next_stamp += len(dst)
        self.owners[dst] = False
        self.owners[dst, seq] = True
        self.owners[src, seq] = False
        self._n_used += len(dst)
        cells = cells.copy()
        cells[shared] = dst
        return cells

    def seq_pos_min(self, seq: int) -> int:
        cells = self._cells(self._check_seq(seq))
        return int(self.pos[cells[0]]) if len(cells) else -1

    def seq_pos_max(self, seq: int) -> int:
        cells = self._cells(self._check_seq(seq))
        return int(self.pos[cells[-1]]) if len(cells) else -1

    def seq_ids(self) -> list[int]:
        return [s for s in range(self.n_seq_max) if self._seq[s].n]

    @property
    def can_shift(self) -> bool:
        return self.window is None

    def room_to_grow(self) -> int | None:
        return None if self.window is not None else self.n_cells - self._n_used

    def stats(self) -> dict[str, Any]:
        nbytes = sum(a.nbytes for a in self._k.values()) + sum(a.nbytes for a in self._v.values())
        return {
            "kind": "windowed_kv" if self.window is not None else "kv",
            "cells_total": self.n_cells,
            "cells_used": self._n_used,
            "seqs": len(self.seq_ids()),
            "bytes": int(nbytes),
            "dense_bytes": self._dense.nbytes,
            "device": self.backend.name,
            "layers": list(self.layers),
            "window": self.window,
        }

    def check_integrity(self) -> None:
        occupied = self.pos >= 0
        owned = self.owners.any(axis=1)
        if int(occupied.sum()) != self._n_used:
            raise AssertionError(f"{self._name()}: {int(occupied.sum())} occupied cells, counter says {self._n_used}")
        if not np.array_equal(occupied, owned):
            bad = np.flatnonzero(occupied != owned)
            raise AssertionError(f"{self._name()}: {len(bad)} cells whose position and owners disagree, e.g. {bad[:5]}")
        for s in range(self.n_seq_max):
            cells = self._cells(s)
            expected = np.flatnonzero(self.owners[:, s])
            if not np.array_equal(np.sort(cells), expected):
                raise AssertionError(f"{self._name()}: sequence {s} indexes {len(cells)} cells, owns {len(expected)}")
            key_pos, key_stamp = self.pos[cells], self.stamp[cells]
            order_ok = (np.diff(key_pos) > 0) | ((np.diff(key_pos) == 0) & (np.diff(key_stamp) > 0))
            if not order_ok.all():
                raise AssertionError(f"{self._name()}: sequence {s}'s cells are not sorted by position")
        if occupied.any() and self.stamp[occupied].max() >= self._next_stamp:
            raise AssertionError(f"{self._name()}: a stamp at or past the next stamp {self._next_stamp}")

    # ---- the leaf: what a micro-batch reads and writes ------------------------------------------

    def _leaf(self, layer: int) -> Leaf:
        if layer not in self._k:
            raise InvalidLayer(f"layer {layer} is not held by this {self._name()} (it holds {list(self.layers)})")
        return self

    def _store_kv(self, ub: MicroBatch, layer: int, k: Array, v: Array) -> None:
        attn = self.spec.attention(layer)
        self._check_rows("k", k, (len(ub), *attn.k_shape), layer)
        self._check_rows("v", v, (len(ub), *attn.v_shape), layer)
        idx = self.backend.index(ub.slots[id(self)])
        self._k[layer][idx] = k
        self._v[layer][idx] = v

    def _check_rows(self, name: str, a: Any, shape: tuple[int, ...], layer: int) -> None:
        xp = self.backend.xp
        if not isinstance(a, xp.ndarray):
            raise InvalidShape(f"layer {layer} {name} must be a {self.backend.name} array, got {type(a).__name__}")
        if a.shape != shape or a.dtype != np.dtype(self.spec.dtype):
            raise InvalidShape(
                f"layer {layer} {name} must be {self.spec.dtype} of shape {shape}, got {a.dtype} {a.shape}"
            )

    def _kv(self, layer: int, seq: int) -> tuple[Array, Array, Array]:
        self._leaf(layer)
        cells = self._cells(seq)
        k, v = self.backend.take_rows([self._k[layer], self._v[layer]], cells)
        return k, v, self.backend.asarray(self.pos[cells])

    def _kv_batch(self, layer: int, seqs: tuple[int, ...]) -> tuple[Array, Array, Array, Array]:
        self._leaf(layer)
        lengths = np.array([self._seq[s].n for s in seqs], dtype=np.int64)
        width = int(lengths.max()) if len(seqs) else 0
        # [S, L] cell ids; padding takes cells 0, 1, 2, ... (any valid cells: their rows are zeroed
        # below), so a padded row stays one run for block copies
        idx = np.tile(np.arange(width, dtype=np.int64) % self.n_cells, (len(seqs), 1))
        pos = np.full((len(seqs), width), -1, dtype=np.int64)  # [S, L], -1 on padding
        for i, s in enumerate(seqs):
            cells = self._cells(s)
            idx[i, : len(cells)] = cells
            pos[i, : len(cells)] = self.pos[cells]
        k, v = self.backend.take_rows([self._k[layer], self._v[layer]], idx.reshape(-1))
        k = k.reshape(len(seqs), width, *k.shape[1:])  # [S*L, Hkv, D] -> [S, L, Hkv, D]
        v = v.reshape(len(seqs), width, *v.shape[1:])  # [S*L, Hkv, Dv] -> [S, L, Hkv, Dv]
        padding = self.backend.asarray(pos < 0)
        k[padding] = 0
        v[padding] = 0
        return k, v, self.backend.asarray(pos), self.backend.asarray(lengths)

    def _kv_dense(self, ub: MicroBatch, layer: int, seqs: tuple[int, ...]) -> DenseRows | None:
        self._leaf(layer)
        if self.window is not None:  # windowed sequences drop their oldest rows every step
            return None
        return self._dense.rows(ub, layer, seqs)

    def _parts(self, ub: MicroBatch, n: int) -> list[MicroBatch]:
        """Parts write the cells reserved for their own rows and read their own sequences' cells;
        the dense rows of all of them are laid out first (`DenseKV.prepare_parts`)."""
        parts = ub._cut(n)
        if len(parts) > 1:
            if self.window is None:
                self._dense.prepare_parts(ub.seqs)
            cells = ub.slots[id(self)]
            for part in parts:
                part.slots[id(self)] = cells[part.index]
        return parts

    # ---- batches ---------------------------------------------------------------------------------

    @property
    def _equal_split(self) -> bool:
        return False

    @property
    def _attention_cells(self) -> int:
        return self.n_cells

    def _transaction(self, real: bool) -> Transaction:
        return _KVTransaction(self, real)

    # ---- snapshots -------------------------------------------------------------------------------

    def _snapshot_sections(self, seq: int | None, span: snapshot.Span) -> list[snapshot.Section]:
        if self.window is not None and not span.ends:
            return []  # windowed cells travel whole, with the piece that ends the sequence
        if seq is None:
            occupied = np.flatnonzero(self.pos >= 0)
            cells = occupied[np.lexsort((self.stamp[occupied], self.pos[occupied]))]
            owner_rows, owner_ids = np.nonzero(self.owners[cells])  # row-major: ids ascend per cell
            counts = np.bincount(owner_rows, minlength=len(cells))
        else:
            i, j = (0, len(self._cells(seq))) if self.window is not None else self._slice(seq, span.p0, span.p1)
            cells = self._cells(seq)[i:j].copy()
            counts, owner_ids = np.ones(len(cells), dtype=np.int64), np.full(len(cells), seq, dtype=np.int64)
        table = snapshot.Section(
            snapshot.CELL_TABLE,
            self.part,
            snapshot.NO_LAYER,
            [
                snapshot.ArraySource.of(self.pos[cells].astype("<i8")),
                snapshot.ArraySource.of(counts.astype("<u4")),
                snapshot.ArraySource.of(owner_ids.astype("<u4")),
            ],
        )
        return [table] + [
            snapshot.layer_section(
                snapshot.ATTENTION_LAYER, self.part, layer, [self._k[layer], self._v[layer]], cells, self.backend
            )
            for layer in self.layers
        ]

    def _snapshot_prepare(self, doc: snapshot.Document, seq: int | None) -> list[Loader]:
        span = doc.span
        if self.window is not None and not span.ends:
            if doc.table(snapshot.CELL_TABLE, self.part) is not None:
                raise SnapshotCorrupt("a piece that does not end its sequence carries windowed cells")
            assert seq is not None
            return [lambda: self._drop(seq)] if span.p0 == 0 else []  # a first piece starts the sequence anew
        pos, owner_seqs, rows = self._read_table(doc)
        layers = {layer: self._read_layer(doc, layer, len(pos)) for layer in self.layers}
        if seq is None:
            if len(pos) > self.n_cells:
                raise MemoryFull(f"the snapshot holds {len(pos)} {self._name()} cells; this one has {self.n_cells}")
            return [lambda: self._load_all(pos, owner_seqs, rows, layers)]
        if self.window is None and not span.whole:
            if not span.holds(pos).all():
                raise SnapshotCorrupt(f"the piece [{span.p0}, {span.p1}) holds cells at positions outside it")
            if span.p0 > 0:
                return [self._continuation(doc, seq, pos, layers)]
        own = self._cells(seq)
        reclaimable = int((self.owners[own].sum(axis=1) == 1).sum())
        free = self.n_cells - self._n_used + reclaimable
        if len(pos) > free:
            raise MemoryFull(f"the snapshot needs {len(pos)} {self._name()} cells; {free} are free for sequence {seq}")
        return [lambda: self._load_one(seq, pos, layers)]

    def _continuation(self, doc: snapshot.Document, seq: int, pos: np.ndarray, layers: dict[int, Any]) -> Loader:
        """A piece that continues `seq` from position p0: its cells join those seq holds, which
        must end at p0 - 1 (the pieces before it were read)."""
        last = self.seq_pos_max(seq)
        if last != doc.span.p0 - 1:
            raise SnapshotIncompatible(
                f"this piece continues a sequence from position {doc.span.p0}, but sequence {seq}'s "
                f"{self._name()} cells here end at {last}: read the pieces in order, the first from position 0"
            )
        free = self.n_cells - self._n_used
        if len(pos) > free:
            raise MemoryFull(f"the piece needs {len(pos)} {self._name()} cells; {free} are free")

        def load() -> None:
            cells = self._find_free(len(pos))
            self._place(cells, pos, layers)
            self.owners[cells, seq] = True
            self._rebuild(seq)

        return load

    def _drop(self, seq: int) -> None:
        self.seq_rm(seq)

    def _read_table(self, doc: snapshot.Document) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cell table: positions [n], and owners as (owner seq ids, the cell row of each)."""
        table = doc.table(snapshot.CELL_TABLE, self.part)
        what = snapshot.PART_NAMES[self.part]
        if table is None:
            raise SnapshotIncompatible(f"the snapshot has no {what} cell table, which this memory needs")
        pos, counts, ids = table.arrays
        n = len(pos)
        if pos.ndim != 1 or counts.shape != (n,) or ids.ndim != 1 or int(counts.sum(dtype=np.int64)) != len(ids):
            raise SnapshotCorrupt(f"the {what} cell table's arrays disagree in length")
        if n and (pos.min() < 0 or counts.min() < 1):
            raise SnapshotCorrupt(f"the {what} cell table has a negative position or an unowned cell")
        rows = np.repeat(np.arange(n), counts)
        if len(ids) and int(ids.max()) >= self.n_seq_max:
            raise SnapshotIncompatible(
                f"the snapshot names sequence {int(ids.max())}; this memory's ids run 0 .. {self.n_seq_max - 1}"
            )
        same_cell = rows[1:] == rows[:-1]
        if np.any(same_cell & (ids[1:] <= ids[:-1])):
            raise SnapshotCorrupt(f"the {what} cell table lists an owner twice or out of order")
        if doc.seq is not None and np.any(ids != doc.seq):
            raise SnapshotCorrupt(f"a one-sequence snapshot's {what} table names other sequences")
        return pos.astype(np.int64), ids.astype(np.int64), rows

    def _read_layer(self, doc: snapshot.Document, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        section = doc.layer(layer)
        if section is None:
            raise SnapshotIncompatible(f"the snapshot lacks layer {layer}, which this memory holds")
        attn = self.spec.attention(layer)
        dtype = np.dtype(self.spec.dtype).newbyteorder("<")
        k, v = section.arrays
        if section.kind != snapshot.ATTENTION_LAYER or section.part != self.part:
            raise SnapshotIncompatible(f"the snapshot's layer {layer} is not a {snapshot.PART_NAMES[self.part]} layer")
        if k.shape != (n, *attn.k_shape) or v.shape != (n, *attn.v_shape) or k.dtype != dtype or v.dtype != dtype:
            raise SnapshotIncompatible(
                f"the snapshot's layer {layer} holds k {k.dtype}{k.shape} v {v.dtype}{v.shape}; expected "
                f"{self.spec.dtype} ({n}, {attn.k_shape}) and ({n}, {attn.v_shape})"
            )
        return k, v

    def _load_all(self, pos: np.ndarray, owner_seqs: np.ndarray, rows: np.ndarray, layers: dict[int, Any]) -> None:
        self.clear()
        cells = np.arange(len(pos), dtype=np.int64)
        self._place(cells, pos, layers)
        self.owners[rows, owner_seqs] = True
        for s in np.unique(owner_seqs):
            self._rebuild(int(s))

    def _load_one(self, seq: int, pos: np.ndarray, layers: dict[int, Any]) -> None:
        self.seq_rm(seq)
        cells = self._find_free(len(pos))
        self._place(cells, pos, layers)
        self.owners[cells, seq] = True
        self._rebuild(seq)

    def _place(self, cells: np.ndarray, pos: np.ndarray, layers: dict[int, Any]) -> None:
        self.pos[cells] = pos
        self.owners[cells] = False
        self.stamp[cells] = np.arange(self._next_stamp, self._next_stamp + len(cells))
        self._next_stamp += len(cells)
        self._n_used += len(cells)
        for layer, (k, v) in layers.items():
            self.backend.scatter_from_host(self._k[layer], cells, k)
            self.backend.scatter_from_host(self._v[layer], cells, v)


class _KVTransaction(Transaction):
    """Cells reserved micro-batch by micro-batch, with what they held before, to undo on error.

    Undo records hold the old values of every touched cell (restored newest first, so each cell
    ends as it was before its first touch) and the old index of every touched sequence. A real run
    of a windowed cache also backs up the rows of cells it reuses that held data at the start."""

    def __init__(self, cache: KVCache, real: bool):
        self.c = cache
        self.real = real
        self.cell_log: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.seq_log: dict[int, tuple[np.ndarray, int]] = {}
        self.data_log: list[tuple[np.ndarray, dict[int, tuple[Array, Array]]]] = []
        self.n_used = cache._n_used
        self.next_stamp = cache._next_stamp
        self.held_at_start = (cache.pos >= 0) if (real and cache.window is not None) else None

    def _touch(self, cells: np.ndarray) -> None:
        c = self.c
        self.cell_log.append((cells.copy(), c.pos[cells].copy(), c.owners[cells].copy(), c.stamp[cells].copy()))

    def _touch_seq(self, seq: int) -> None:
        if seq not in self.seq_log:
            cells = self.c._seq[seq]
            self.seq_log[seq] = (cells.buf, cells.n)

    def apply(self, ub: MicroBatch) -> None:
        c = self.c
        if c.window is not None:
            self._let_go_out_of_window(ub)
        cells = c._place_rows(ub.seq_ids, ub.seqs)
        if self.held_at_start is not None:
            self._back_up(cells[self.held_at_start[cells]])
        self._touch(cells)
        c.pos[cells] = ub.positions
        c.owners[cells] = False
        c.owners[cells, ub.seq_ids] = True
        c.stamp[cells] = np.arange(c._next_stamp, c._next_stamp + len(cells))
        c._next_stamp += len(cells)
        c._n_used += len(cells)
        for s in ub.seqs:
            self._touch_seq(s)
            new = cells[ub.seq_ids == s]
            held = c._seq[s]
            if held.n == 0 or c.pos[held.cells[-1]] < c.pos[new[0]]:
                held.append(new)  # the usual case: positions continue the sequence
            else:
                # A hybrid whose recurrent part was reset may restart below what this part holds:
                # keep the index sorted by (position, stamp) anyway.
                merged = np.concatenate([held.cells, new])
                held.set(merged[np.lexsort((c.stamp[merged], c.pos[merged]))])
        ub.slots[id(c)] = cells

    def _let_go_out_of_window(self, ub: MicroBatch) -> None:
        """Before ub, each of its sequences drops cells its first new query no longer sees: with
        window W and first new position p, keys at positions <= p - W (W=4, p=10: 0..6 go)."""
        for s in ub.seqs:
            first = int(ub.positions[ub.seq_ids == s].min())
            dead = self.c._out_of_window(s, first)
            if len(dead):
                self._touch(dead)
                self._touch_seq(s)
                self.c._let_go(s, dead)

    def _back_up(self, cells: np.ndarray) -> None:
        if len(cells) == 0:
            return
        assert self.held_at_start is not None
        idx = self.c.backend.index(cells)
        rows = {layer: (self.c._k[layer][idx], self.c._v[layer][idx]) for layer in self.c.layers}
        self.data_log.append((cells, rows))
        self.held_at_start[cells] = False

    def rollback(self) -> None:
        c = self.c
        for cells, pos, owners, stamp in reversed(self.cell_log):
            c.pos[cells], c.owners[cells], c.stamp[cells] = pos, owners, stamp
        for seq, (buf, n) in self.seq_log.items():
            if self.real:  # a dry run's rows were never read, so the dense copies stay valid
                c._seq[seq].restore(buf, n)
            else:
                c._seq[seq].buf, c._seq[seq].n = buf, n
        for cells, rows in reversed(self.data_log):
            idx = c.backend.index(cells)
            for layer, (k, v) in rows.items():
                c._k[layer][idx], c._v[layer][idx] = k, v
        c._n_used, c._next_stamp = self.n_used, self.next_stamp
        self.cell_log, self.seq_log, self.data_log = [], {}, []

    def commit(self) -> None:
        c = self.c
        if self.real and c.window is not None:
            # The next query of each sequence is at pos_max + 1: cells it won't see are reusable now,
            # so idle sequences hold at most window - 1 cells each.
            for s in self.seq_log:
                dead = c._out_of_window(s, c.seq_pos_max(s) + 1)
                c._let_go(s, dead)
        self.cell_log, self.seq_log, self.data_log = [], {}, []
