"""`Memory`: the one interface every kind of model state implements (after llama.cpp's
`llama_memory_i`). The inference loop, scheduler and migration talk to this and never ask which kind
they hold.

Sequence ids are `0 .. n_seq_max-1`; `seq=None` means every sequence; ranges are half-open `[p0, p1)`
over token positions with `None` for an open end. Every operation either does all of what it says
or, when it refuses (`False`, `MemoryFull`) or raises, changes nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from statemesh.memory import snapshot
from statemesh.memory.backend import Array, Backend
from statemesh.memory.batch import Batch
from statemesh.memory.dense_kv import DenseRows
from statemesh.memory.errors import (
    BatchStateError,
    InvalidInput,
    InvalidLayer,
    InvalidSequence,
    SnapshotIncompatible,
)
from statemesh.memory.plan import (
    BatchPlan,
    MicroBatch,
    Transaction,
    check_continuation,
    split_equal,
    split_simple,
)
from statemesh.memory.specs import MemorySpec

Loader = Callable[[], None]  # a prepared, validated change that cannot fail


class Memory(ABC):
    """The state of many sequences for the layers `layers` of a model described by `spec`."""

    spec: MemorySpec
    layers: tuple[int, ...]  # global layer ids this memory holds (a pipeline shard holds some)
    n_seq_max: int
    backend: Backend
    _plan: BatchPlan | None = None
    _version = 0  # bumped by every change, so a plan made before a change is refused

    # ---- sequence operations -------------------------------------------------------------------

    @abstractmethod
    def clear(self) -> None:
        """Drop every sequence; capacity is kept."""

    @abstractmethod
    def seq_rm(self, seq: int | None, p0: int | None = None, p1: int | None = None) -> bool:
        """Remove `seq`'s tokens at positions in [p0, p1). Returns False, having changed nothing, when
        this memory cannot (a recurrent state can only drop everything or nothing)."""

    @abstractmethod
    def seq_cp(self, src: int, dst: int, p0: int | None = None, p1: int | None = None) -> None:
        """Replace dst's tokens in [p0, p1) by src's. Attention cells are shared, not copied; a
        recurrent state is copied whole (copy-on-write), whatever the range."""

    @abstractmethod
    def seq_keep(self, seq: int) -> None:
        """Drop every sequence but `seq`."""

    @abstractmethod
    def seq_add(self, seq: int | None, p0: int | None, p1: int | None, delta: int) -> None:
        """Move `seq`'s positions in [p0, p1) by `delta`. Cells shared with another sequence are
        copied first (MemoryFull, nothing changed, if there is no room); a cell moved below 0 is
        dropped; stored keys are re-rotated through `k_shift` when one was given."""

    @abstractmethod
    def seq_div(self, seq: int | None, p0: int | None, p1: int | None, d: int) -> None:
        """Divide `seq`'s positions in [p0, p1) by `d` (integer division); as `seq_add` otherwise."""

    @abstractmethod
    def seq_pos_min(self, seq: int) -> int:
        """The first position every layer still holds for `seq`; -1 when it holds nothing."""

    @abstractmethod
    def seq_pos_max(self, seq: int) -> int:
        """The last position of `seq`; -1 when it holds nothing."""

    @abstractmethod
    def seq_ids(self) -> list[int]:
        """The live sequences, ascending."""

    @property
    @abstractmethod
    def can_shift(self) -> bool:
        """Whether positions can move (`seq_add`, `seq_div`) without breaking attention."""

    @abstractmethod
    def room_to_grow(self) -> int | None:
        """How many more tokens the live sequences can add, all together, before this memory is
        full: the free cells of the full-attention cache. None where tokens take no lasting room (a
        windowed cache keeps at most `window - 1` cells a sequence between batches; a recurrent
        state has a fixed size). A batch also needs room while it runs (a windowed cache holds a
        micro-batch's rows beside what its sequences keep), which only `batch` can tell. Changes
        nothing."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """`cells_total`, `cells_used`, `seqs`, `bytes`, plus a breakdown by component and device."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Raise AssertionError naming the actual counts if an internal invariant is broken."""

    # ---- reading without a batch (inspection, tests, the engine's bookkeeping) -------------------

    def kv(self, layer: int, seq: int) -> tuple[Array, Array, Array]:
        """What `seq` holds at attention `layer`: k, v and positions, sorted by position."""
        self._check_seq(seq)
        return self._leaf(layer)._kv(layer, seq)

    def state(self, layer: int, seq: int) -> tuple[Array, Array]:
        """`seq`'s recurrent state at `layer`: conv `conv_shape`, ssm `ssm_shape` (zeros when empty)."""
        self._check_seq(seq)
        return self._leaf(layer)._read_state(layer, seq)

    # ---- the batch plan --------------------------------------------------------------------------

    def batch(self, batch: Batch, n_ubatch: int = 512) -> BatchPlan:
        """Plan `batch` in micro-batches of at most `n_ubatch` rows. MemoryFull if it cannot fit,
        a typed InvalidInput for bad input; in both cases nothing changed. See `plan.py`."""
        self._check_idle()
        if not isinstance(batch, Batch):
            raise InvalidInput(f"batch must be a statemesh.memory.Batch, got {type(batch).__name__}")
        if not isinstance(n_ubatch, int) or n_ubatch <= 0:
            raise InvalidInput(f"n_ubatch must be a positive integer, got {n_ubatch!r}")
        seqs = np.unique(batch.seq_ids)
        if seqs[0] < 0 or seqs[-1] >= self.n_seq_max:
            bad = int(seqs[0] if seqs[0] < 0 else seqs[-1])
            raise InvalidSequence(f"batch names sequence {bad}; ids run 0 .. {self.n_seq_max - 1}")
        check_continuation(batch, {int(s): self.seq_pos_max(int(s)) for s in seqs})
        split = split_equal if self._equal_split else split_simple
        ubatches = split(batch, n_ubatch)
        dry_run = self._transaction(real=False)
        try:
            for ub in ubatches:
                dry_run.apply(ub)
        finally:
            dry_run.rollback()
        return BatchPlan(self, ubatches, n_ubatch, self._version)

    # ---- snapshots -------------------------------------------------------------------------------

    def state_write(self, seq: int | None = None, p0: int | None = None, p1: int | None = None) -> bytes:
        """The snapshot of `seq` (or of every sequence) as bytes; see docs/snapshot-format.md. With
        p0 or p1, a piece of `seq`: its full-attention cells at positions [p0, p1) (p1 None: to its
        end, windowed cells and recurrent states included): `snapshot.Span` says what reading
        pieces in order does. A migration sends a long sequence's cells while it keeps running,
        and at the pause only the piece since (its size does not grow with the sequence)."""
        return self.state_write_buffer(seq, p0, p1).tobytes()

    def state_write_buffer(self, seq: int | None = None, p0: int | None = None, p1: int | None = None) -> memoryview:
        """The same bytes as `state_write`, as a read-only view of the buffer they were written
        into, without the extra copy into a `bytes` object (for large snapshots that are streamed
        in chunks, written to a file or handed to Ray)."""
        self._check_idle()
        span = self._span(seq, p0, p1)
        if seq is not None:
            self._check_seq(seq)
        return snapshot.encode(self.spec, seq, self._snapshot_sections(seq, span), span)

    @staticmethod
    def _span(seq: int | None, p0: int | None, p1: int | None) -> snapshot.Span:
        if p0 is None and p1 is None:
            return snapshot.WHOLE
        if seq is None:
            raise InvalidInput("a piece of a snapshot (p0, p1) is of one sequence: give seq")
        for name, value in (("p0", p0), ("p1", p1)):
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
                raise InvalidInput(f"{name} must be an integer position or None, got {value!r}")
        first = 0 if p0 is None else int(p0)
        if first < 0 or (p1 is not None and int(p1) <= first):
            raise InvalidInput(f"a piece covers positions [p0, p1) with 0 <= p0 < p1, got [{p0}, {p1})")
        return snapshot.Span(first, None if p1 is None else int(p1))

    def state_read(self, data: Any, seq: int | None = None) -> None:
        """Restore a snapshot (bytes-like). One of every sequence replaces the whole memory; one of
        a single sequence restores it under its own id, or under `seq`, replacing what that id held
        and touching nothing else. SnapshotError (or MemoryFull when the content cannot fit) if it
        cannot be read; the memory is then exactly as it was."""
        self._mutate()
        if seq is not None:
            self._check_seq(seq)
        doc = snapshot.decode(data, max_bytes=self.max_snapshot_bytes)
        snapshot.check_compatible(doc, self.spec)
        if doc.seq is None and seq is not None:
            raise SnapshotIncompatible(
                f"this snapshot holds every sequence; it cannot be read into sequence {seq} (read it with seq=None)"
            )
        target = doc.seq if seq is None else seq
        if target is not None and target >= self.n_seq_max:
            raise SnapshotIncompatible(
                f"the snapshot's sequence {target} is out of range; this memory's ids run "
                f"0 .. {self.n_seq_max - 1} (pass seq= to restore it under another id)"
            )
        for load in self._snapshot_prepare(doc, target):
            load()

    @property
    def max_snapshot_bytes(self) -> int:
        """The largest snapshot this memory accepts: its every cell and state slot filled for every
        layer of the model (a snapshot may hold layers of other pipeline stages), plus tables."""
        per_cell = self.spec.bytes_per_token + 8 + 4 + 4 * self.n_seq_max
        per_seq = self.spec.bytes_per_sequence_state + 16
        tables_and_headers = 4096 * (len(self.spec.layers) + 8)
        return self._attention_cells * per_cell + self.n_seq_max * per_seq + tables_and_headers

    # ---- hooks for the implementations ------------------------------------------------------------

    @property
    @abstractmethod
    def _attention_cells(self) -> int:
        """Token cells across this memory's attention caches."""

    @property
    @abstractmethod
    def _equal_split(self) -> bool:
        """Whether micro-batches must hold equal runs of whole sequences (recurrent layers)."""

    @abstractmethod
    def _leaf(self, layer: int) -> Leaf:
        """The part that stores `layer`; InvalidLayer if this memory does not hold it."""

    def _parts(self, ub: MicroBatch, n: int) -> list[MicroBatch]:
        """`ub` cut into at most n parts that may run at the same time (`MicroBatch.parts`); by
        default not cut: [ub]."""
        return [ub]

    @abstractmethod
    def _transaction(self, real: bool) -> Transaction:
        """A transaction over this memory; `real=False` for a dry run (metadata only, no data)."""

    @abstractmethod
    def _snapshot_sections(self, seq: int | None, span: snapshot.Span) -> list[snapshot.Section]:
        """The tables and layer sections that describe `seq` (or everything), or the piece `span`
        of `seq`."""

    @abstractmethod
    def _snapshot_prepare(self, doc: snapshot.Document, seq: int | None) -> list[Loader]:
        """Validate what this memory needs from `doc` and return the changes that load it, which
        cannot fail; raise SnapshotError or MemoryFull without changing anything. A piece
        (`doc.span`) loads as `snapshot.Span` says."""

    # ---- shared checks ------------------------------------------------------------------------------

    def _check_seq(self, seq: object) -> int:
        if not isinstance(seq, (int, np.integer)) or isinstance(seq, bool):
            raise InvalidSequence(f"a sequence id must be an integer, got {seq!r}")
        if not 0 <= seq < self.n_seq_max:
            raise InvalidSequence(f"sequence id {seq} is out of range; ids run 0 .. {self.n_seq_max - 1}")
        return int(seq)

    def _check_seq_or_all(self, seq: object) -> int | None:
        return None if seq is None else self._check_seq(seq)

    def _check_idle(self) -> None:
        if self._plan is not None:
            raise BatchStateError("a batch is open on this memory: finish its `with` block first")

    def _mutate(self) -> None:
        """Every change starts here: none while a batch is open, and plans made before it expire."""
        self._check_idle()
        self._version += 1

    def _open(self, plan: BatchPlan) -> None:
        self._check_idle()
        self._plan = plan

    def _close(self, plan: BatchPlan) -> None:
        assert self._plan is plan
        self._plan = None
        self._version += 1


class Leaf(ABC):
    """A part that stores layers itself (a KV cache or a recurrent memory). The micro-batch routes
    each layer's calls to its leaf; a call of the wrong kind names the layer's kind."""

    kind: str

    def _wrong(self, layer: int, call: str) -> InvalidLayer:
        article = "an" if self.kind[0] in "aeiou" else "a"
        return InvalidLayer(f"layer {layer} is {article} {self.kind} layer; {call} is not available for it")

    def _store_kv(self, ub: MicroBatch, layer: int, k: Array, v: Array) -> None:
        raise self._wrong(layer, "store_kv")

    def _kv(self, layer: int, seq: int) -> tuple[Array, Array, Array]:
        raise self._wrong(layer, "kv")

    def _kv_batch(self, layer: int, seqs: tuple[int, ...]) -> tuple[Array, Array, Array, Array]:
        raise self._wrong(layer, "kv_batch")

    def _kv_dense(self, ub: MicroBatch, layer: int, seqs: tuple[int, ...]) -> DenseRows | None:
        raise self._wrong(layer, "kv_dense")

    def _state(self, ub: MicroBatch, layer: int) -> tuple[Array, Array]:
        raise self._wrong(layer, "state")

    def _store_state(self, ub: MicroBatch, layer: int, conv: Array, ssm: Array) -> None:
        raise self._wrong(layer, "store_state")

    def _read_state(self, layer: int, seq: int) -> tuple[Array, Array]:
        raise self._wrong(layer, "state")
