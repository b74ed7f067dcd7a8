"""`RecurrentMemory`: one fixed-size state per sequence (Mamba, Mamba-2, RWKV), whatever its length.

Each layer keeps `n_seq_max` state slots: a rolling convolution state and an SSM state. A sequence
points at a slot (`slot_of`); `seq_cp` makes dst point at src's slot (copy-on-write: the slot is
copied when one of them next writes), so a fork costs nothing until the branches diverge. There are
as many slots as sequences, so a writer always finds a free slot.

A state has folded in every token up to its position, so it cannot forget a tail: `seq_rm` drops
everything or nothing and refuses anything else (see `seq_rm`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from statemesh.memory import snapshot
from statemesh.memory.backend import Array, Backend, get_backend
from statemesh.memory.base import Leaf, Loader, Memory
from statemesh.memory.errors import (
    InvalidInput,
    InvalidLayer,
    InvalidShape,
    SnapshotCorrupt,
    SnapshotIncompatible,
)
from statemesh.memory.plan import MicroBatch, Transaction
from statemesh.memory.specs import MemorySpec, RecurrentSpec


def _in_range(pos: np.ndarray, p0: int | None, p1: int | None) -> np.ndarray:
    lo = np.iinfo(np.int64).min if p0 is None else p0
    hi = np.iinfo(np.int64).max if p1 is None else p1
    return (pos >= lo) & (pos < hi)


class RecurrentMemory(Memory, Leaf):
    kind = "recurrent"

    def __init__(
        self,
        spec: MemorySpec,
        *,
        n_seq_max: int,
        layers: tuple[int, ...] | None = None,
        backend: str | Backend = "auto",
    ):
        if not isinstance(n_seq_max, int) or n_seq_max <= 0:
            raise InvalidInput(f"n_seq_max must be a positive integer, got {n_seq_max!r}")
        self.spec = spec
        self.layers = tuple(spec.recurrent_layers if layers is None else layers)
        for layer in self.layers:
            if not 0 <= layer < len(spec.layers) or not isinstance(spec.layers[layer], RecurrentSpec):
                raise InvalidLayer(f"layer {layer} is not a recurrent layer of this spec")
        self.n_seq_max = n_seq_max
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend)
        n = n_seq_max
        self._conv = {i: self.backend.zeros((n, *spec.recurrent(i).conv_shape), spec.dtype) for i in self.layers}
        self._ssm = {i: self.backend.zeros((n, *spec.recurrent(i).ssm_shape), spec.dtype) for i in self.layers}
        self.slot_of = np.full(n, -1, dtype=np.int64)  # seq -> its state slot, -1 when empty
        self.pos = np.full(n, -1, dtype=np.int64)  # seq -> last position folded in
        self.refs = np.zeros(n, dtype=np.int64)  # slot -> how many sequences point at it
        self._txn: _RecurrentTransaction | None = None  # the real transaction, while one is open

    # ---- sequence operations -------------------------------------------------------------------

    def _targets(self, seq: int | None) -> list[int]:
        return self.seq_ids() if seq is None else [seq]

    def _release(self, seq: int) -> None:
        slot = self.slot_of[seq]
        if slot >= 0:
            self.refs[slot] -= 1
        self.slot_of[seq] = -1
        self.pos[seq] = -1

    def clear(self) -> None:
        self._mutate()
        self.slot_of[:] = -1
        self.pos[:] = -1
        self.refs[:] = 0

    def seq_rm(self, seq: int | None, p0: int | None = None, p1: int | None = None) -> bool:
        """With L the last position: drop all when p0 is None or <= 0 and p1 is None or > L; keep
        all when p0 > L; anything else (a part of the state, p0 == L included) is refused."""
        self._mutate()
        targets = self._targets(self._check_seq_or_all(seq))
        drop = []
        for s in targets:
            last = int(self.pos[s])
            if last < 0 or (p0 is not None and p0 > last):
                continue
            if (p0 is None or p0 <= 0) and (p1 is None or p1 > last):
                drop.append(s)
            else:
                return False  # before any change: all or nothing across `targets`
        for s in drop:
            self._release(s)
        return True

    def seq_cp(self, src: int, dst: int, p0: int | None = None, p1: int | None = None) -> None:
        self._mutate()
        src, dst = self._check_seq(src), self._check_seq(dst)
        if src == dst:
            return
        self._release(dst)
        if self.slot_of[src] >= 0:
            self.slot_of[dst] = self.slot_of[src]
            self.refs[self.slot_of[src]] += 1
            self.pos[dst] = self.pos[src]

    def seq_keep(self, seq: int) -> None:
        self._mutate()
        seq = self._check_seq(seq)
        for s in self.seq_ids():
            if s != seq:
                self._release(s)

    def seq_add(self, seq: int | None, p0: int | None, p1: int | None, delta: int) -> None:
        self._mutate()
        if not isinstance(delta, (int, np.integer)):
            raise InvalidInput(f"seq_add delta must be an integer, got {delta!r}")
        self._move(self._check_seq_or_all(seq), p0, p1, lambda p: p + int(delta))

    def seq_div(self, seq: int | None, p0: int | None, p1: int | None, d: int) -> None:
        self._mutate()
        if not isinstance(d, (int, np.integer)) or d < 1:
            raise InvalidInput(f"seq_div divisor must be an integer >= 1, got {d!r}")
        self._move(self._check_seq_or_all(seq), p0, p1, lambda p: p // int(d))

    def _move(self, seq: int | None, p0: int | None, p1: int | None, move: Any) -> None:
        for s in self._targets(seq):
            if self.pos[s] >= 0 and _in_range(self.pos[s : s + 1], p0, p1)[0]:
                new = int(move(int(self.pos[s])))
                if new < 0:
                    self._release(s)  # moved below 0: dropped, as an attention cell would be
                else:
                    self.pos[s] = new

    def seq_pos_min(self, seq: int) -> int:
        return int(self.pos[self._check_seq(seq)])

    def seq_pos_max(self, seq: int) -> int:
        return int(self.pos[self._check_seq(seq)])

    def seq_ids(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(self.slot_of >= 0)]

    @property
    def can_shift(self) -> bool:
        return True  # a state does not depend on positions; moving them is bookkeeping

    def room_to_grow(self) -> int | None:
        return None  # one fixed-size state a sequence, whatever its length

    def stats(self) -> dict[str, Any]:
        nbytes = sum(a.nbytes for a in self._conv.values()) + sum(a.nbytes for a in self._ssm.values())
        return {
            "kind": "recurrent",
            "cells_total": self.n_seq_max,
            "cells_used": int((self.refs > 0).sum()),
            "seqs": len(self.seq_ids()),
            "bytes": int(nbytes),
            "device": self.backend.name,
            "layers": list(self.layers),
        }

    def check_integrity(self) -> None:
        live = self.slot_of >= 0
        counts = np.bincount(self.slot_of[live], minlength=self.n_seq_max)
        if not np.array_equal(counts, self.refs):
            bad = np.flatnonzero(counts != self.refs)
            raise AssertionError(
                f"recurrent memory: slot reference counts {self.refs[bad].tolist()} but "
                f"{counts[bad].tolist()} sequences point at slots {bad.tolist()}"
            )
        if not np.array_equal(live, self.pos >= 0):
            raise AssertionError(
                f"recurrent memory: {int(live.sum())} sequences hold a slot but "
                f"{int((self.pos >= 0).sum())} have a position"
            )

    # ---- the leaf ----------------------------------------------------------------------------------

    def _leaf(self, layer: int) -> Leaf:
        if layer not in self._conv:
            raise InvalidLayer(f"layer {layer} is not held by this recurrent memory (it holds {list(self.layers)})")
        return self

    def _state(self, ub: MicroBatch, layer: int) -> tuple[Array, Array]:
        idx = self.backend.index(ub.slots[id(self)])
        return self._conv[layer][idx], self._ssm[layer][idx]

    def _store_state(self, ub: MicroBatch, layer: int, conv: Array, ssm: Array) -> None:
        rec = self.spec.recurrent(layer)
        self._check_rows("conv", conv, (len(ub.seqs), *rec.conv_shape), layer)
        self._check_rows("ssm", ssm, (len(ub.seqs), *rec.ssm_shape), layer)
        slots = ub.slots[id(self)]
        if self._txn is not None:
            self._txn.before_write(layer, slots)
        idx = self.backend.index(slots)
        self._conv[layer][idx] = conv
        self._ssm[layer][idx] = ssm

    def _check_rows(self, name: str, a: Any, shape: tuple[int, ...], layer: int) -> None:
        if not isinstance(a, self.backend.xp.ndarray):
            raise InvalidShape(f"layer {layer} {name} must be a {self.backend.name} array, got {type(a).__name__}")
        if a.shape != shape or a.dtype != np.dtype(self.spec.dtype):
            raise InvalidShape(
                f"layer {layer} {name} must be {self.spec.dtype} of shape {shape}, got {a.dtype} {a.shape}"
            )

    def _read_state(self, layer: int, seq: int) -> tuple[Array, Array]:
        self._leaf(layer)
        slot = int(self.slot_of[seq])
        if slot < 0:
            rec = self.spec.recurrent(layer)
            return self.backend.zeros(rec.conv_shape, self.spec.dtype), self.backend.zeros(
                rec.ssm_shape, self.spec.dtype
            )
        return self._conv[layer][slot].copy(), self._ssm[layer][slot].copy()

    # ---- batches -------------------------------------------------------------------------------------

    @property
    def _equal_split(self) -> bool:
        return True

    @property
    def _attention_cells(self) -> int:
        return 0

    def _transaction(self, real: bool) -> Transaction:
        return _RecurrentTransaction(self, real)

    def _free_slot(self) -> int:
        free = np.flatnonzero(self.refs == 0)
        assert len(free), "as many slots as sequences: a writer always finds one"
        return int(free[0])

    # ---- snapshots -------------------------------------------------------------------------------------

    def _snapshot_sections(self, seq: int | None, span: snapshot.Span) -> list[snapshot.Section]:
        if not span.ends:
            return []  # a state changes every token: it travels with the piece that ends the sequence
        seqs = np.array(self._targets(seq) if seq is None or self.slot_of[seq] >= 0 else [], dtype=np.int64)
        slots, index = np.unique(self.slot_of[seqs], return_inverse=True)
        first_use = np.array([np.flatnonzero(index == i)[0] for i in range(len(slots))], dtype=np.int64)
        order = np.argsort(first_use)  # states numbered by the first sequence that uses them
        slots = slots[order]
        renumber = np.empty(len(order), dtype=np.int64)
        renumber[order] = np.arange(len(order))
        table = snapshot.Section(
            snapshot.STATE_TABLE,
            snapshot.PART_RECURRENT,
            snapshot.NO_LAYER,
            [
                snapshot.ArraySource.of(seqs.astype("<u4")),
                snapshot.ArraySource.of(self.pos[seqs].astype("<i8")),
                snapshot.ArraySource.of(renumber[index].astype("<u4")),
            ],
        )
        return [table] + [
            snapshot.layer_section(
                snapshot.RECURRENT_LAYER,
                snapshot.PART_RECURRENT,
                layer,
                [self._conv[layer], self._ssm[layer]],
                slots,
                self.backend,
            )
            for layer in self.layers
        ]

    def _snapshot_prepare(self, doc: snapshot.Document, seq: int | None) -> list[Loader]:
        table = doc.table(snapshot.STATE_TABLE, snapshot.PART_RECURRENT)
        if not doc.span.ends:
            if table is not None:
                raise SnapshotCorrupt("a piece that does not end its sequence carries recurrent states")
            assert seq is not None
            return [lambda: self._drop(seq)] if doc.span.p0 == 0 else []  # a first piece starts the sequence anew
        if table is None:
            raise SnapshotIncompatible("the snapshot has no recurrent state table, which this memory needs")
        seqs, pos, index = (a.astype(np.int64) for a in table.arrays)
        n_states = int(index.max()) + 1 if len(index) else 0
        if pos.shape != seqs.shape or index.shape != seqs.shape or seqs.ndim != 1:
            raise SnapshotCorrupt("the recurrent state table's arrays disagree in length")
        if len(seqs) and (pos.min() < 0 or len(np.unique(seqs)) != len(seqs)):
            raise SnapshotCorrupt("the recurrent state table has a negative position or a sequence twice")
        if len(np.unique(index)) != n_states:
            raise SnapshotCorrupt("the recurrent state table skips a state index")
        if len(seqs) and int(seqs.max()) >= self.n_seq_max:
            raise SnapshotIncompatible(
                f"the snapshot names sequence {int(seqs.max())}; this memory's ids run 0 .. {self.n_seq_max - 1}"
            )
        if doc.seq is not None and (len(seqs) > 1 or (len(seqs) == 1 and seqs[0] != doc.seq)):
            raise SnapshotCorrupt("a one-sequence snapshot's state table names other sequences")
        layers = {layer: self._read_layer(doc, layer, n_states) for layer in self.layers}
        if seq is None:
            return [lambda: self._load_all(seqs, pos, index, layers)]
        return [lambda: self._load_one(seq, pos, layers)]

    def _drop(self, seq: int) -> None:
        self.seq_rm(seq)

    def _read_layer(self, doc: snapshot.Document, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        section = doc.layer(layer)
        if section is None:
            raise SnapshotIncompatible(f"the snapshot lacks layer {layer}, which this memory holds")
        rec = self.spec.recurrent(layer)
        dtype = np.dtype(self.spec.dtype).newbyteorder("<")
        conv, ssm = section.arrays
        if section.kind != snapshot.RECURRENT_LAYER:
            raise SnapshotIncompatible(f"the snapshot's layer {layer} is not a recurrent layer")
        if (
            conv.shape != (n, *rec.conv_shape)
            or ssm.shape != (n, *rec.ssm_shape)
            or conv.dtype != dtype
            or ssm.dtype != dtype
        ):
            raise SnapshotIncompatible(
                f"the snapshot's layer {layer} holds conv {conv.dtype}{conv.shape} ssm {ssm.dtype}{ssm.shape}; "
                f"expected {self.spec.dtype} ({n}, {rec.conv_shape}) and ({n}, {rec.ssm_shape})"
            )
        return conv, ssm

    def _load_all(self, seqs: np.ndarray, pos: np.ndarray, index: np.ndarray, layers: dict[int, Any]) -> None:
        self.clear()
        slots = np.arange(len(np.unique(index)), dtype=np.int64)
        self._place(slots, layers)
        self.slot_of[seqs] = index
        self.pos[seqs] = pos
        self.refs[:] = np.bincount(index, minlength=self.n_seq_max)

    def _load_one(self, seq: int, pos: np.ndarray, layers: dict[int, Any]) -> None:
        self._release(seq)
        if len(pos) == 0:
            return  # the snapshot is of an empty sequence
        slot = self._free_slot()
        self._place(np.array([slot], dtype=np.int64), layers)
        self.slot_of[seq] = slot
        self.refs[slot] = 1
        self.pos[seq] = int(pos[0])

    def _place(self, slots: np.ndarray, layers: dict[int, Any]) -> None:
        for layer, (conv, ssm) in layers.items():
            self.backend.scatter_from_host(self._conv[layer], slots, conv)
            self.backend.scatter_from_host(self._ssm[layer], slots, ssm)


class _RecurrentTransaction(Transaction):
    """Before each micro-batch: a sequence that starts gets a zeroed slot; one that shares its slot
    gets its own copy (copy-on-write). A real run backs up a slot's rows the first time a layer
    writes them, unless the slot was taken during this batch (then it held nothing)."""

    def __init__(self, memory: RecurrentMemory, real: bool):
        self.m = memory
        self.real = real
        self.saved = (memory.slot_of.copy(), memory.pos.copy(), memory.refs.copy())
        self.taken: set[int] = set()  # slots taken during this batch
        self.backups: dict[tuple[int, int], tuple[Array, Array]] = {}  # (layer, slot) -> old rows
        if real:
            memory._txn = self

    def apply(self, ub: MicroBatch) -> None:
        m = self.m
        slots = np.empty(len(ub.seqs), dtype=np.int64)
        for i, s in enumerate(ub.seqs):
            slot = int(m.slot_of[s])
            if slot < 0 or m.refs[slot] > 1:
                new = m._free_slot()
                if slot >= 0:
                    m.refs[slot] -= 1
                self._fill(new, slot)
                m.refs[new] = 1
                m.slot_of[s] = slot = new
                self.taken.add(new)
            slots[i] = slot
            m.pos[s] = int(ub.positions[ub.seq_ids == s].max())
        ub.slots[id(m)] = slots

    def _fill(self, slot: int, source: int) -> None:
        """Zero a new sequence's slot, or copy the shared state it forks from."""
        if not self.real:
            return
        for layer in self.m.layers:
            for states in (self.m._conv, self.m._ssm):
                if source < 0:
                    states[layer][slot] = 0
                else:
                    states[layer][slot] = states[layer][source]

    def before_write(self, layer: int, slots: np.ndarray) -> None:
        for slot in slots:
            key = (layer, int(slot))
            if int(slot) not in self.taken and key not in self.backups:
                self.backups[key] = (self.m._conv[layer][slot].copy(), self.m._ssm[layer][slot].copy())

    def rollback(self) -> None:
        m = self.m
        m.slot_of[:], m.pos[:], m.refs[:] = self.saved
        for (layer, slot), (conv, ssm) in self.backups.items():
            m._conv[layer][slot] = conv
            m._ssm[layer][slot] = ssm
        self._close()

    def commit(self) -> None:
        self._close()

    def _close(self) -> None:
        self.backups = {}
        if self.m._txn is self:
            self.m._txn = None
