"""The batch plan: split a batch into micro-batches, reserve memory for each in turn, undo on error.

    with mem.batch(batch, n_ubatch=512) as plan:   # MemoryFull here if it cannot fit; nothing changed
        for ub in plan:                             # cells / state slots for ub are now reserved
            ub.store_kv(layer, k, v); k, v, pos = ub.kv(layer, seq)
            conv, ssm = ub.state(layer); ub.store_state(layer, conv, ssm)
    # leaving normally commits; leaving by an exception undoes every cell and state the batch touched

A micro-batch of many sequences can be cut into parts that run side by side on threads
(`ub.parts(n)`, where the memory can: each part touches only its own sequences).

Planning never mutates: `Memory.batch` dry-runs every micro-batch through a transaction and rolls
it back (as llama.cpp's `prepare` does), so the real run cannot run out of room.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from itertools import pairwise
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from statemesh.memory.backend import Array
from statemesh.memory.batch import Batch
from statemesh.memory.errors import BatchStateError, InvalidBatch

if TYPE_CHECKING:
    from statemesh.memory.base import Memory
    from statemesh.memory.dense_kv import DenseRows


class MicroBatch:
    """A slice of a batch that memory has reserved room for.

    `rows`: int64 indices into the batch. `positions`, `seq_ids`: those rows' values. `seqs`: the
    sequences present, in the order `state` uses. `n_seq_tokens`: for an equal split, every sequence
    has exactly this many rows, laid out sequence-major in `seqs` order (so a model can view the rows
    as [len(seqs), n_seq_tokens]); None for a simple split, where rows keep batch order."""

    def __init__(
        self,
        rows: np.ndarray,
        positions: np.ndarray,
        seq_ids: np.ndarray,
        seqs: tuple[int, ...],
        n_seq_tokens: int | None,
        parent: MicroBatch | None = None,
        index: np.ndarray | None = None,
    ):
        self.rows = rows
        self.positions = positions
        self.seq_ids = seq_ids
        self.seqs = seqs
        self.n_seq_tokens = n_seq_tokens
        self.slots: dict[int, Any] = {}  # id(leaf part) -> what that part reserved for this ub
        self.stored: set[int] = set()  # layers written during this micro-batch
        self._memory: Memory | None = None  # set while this micro-batch is the current one
        self.parent = parent  # for a part (`parts`): the micro-batch it was cut from
        self.index = index  # for a part: its rows' places among the parent's rows
        self._parts: list[MicroBatch] = []

    @staticmethod
    def of(batch: Batch, rows: np.ndarray, seqs: tuple[int, ...], n_seq_tokens: int | None) -> MicroBatch:
        """The rows `rows` of `batch`."""
        return MicroBatch(rows, batch.positions[rows], batch.seq_ids[rows], seqs, n_seq_tokens)

    def __len__(self) -> int:
        return len(self.rows)

    def _live(self) -> Memory:
        if self.parent is not None:
            return self.parent._live()
        if self._memory is None:
            raise BatchStateError("this micro-batch is no longer current: use each ub inside its loop turn")
        return self._memory

    def parts(self, n: int) -> list[MicroBatch]:
        """This micro-batch cut into at most `n` parts of whole sequences, which may run at the same
        time on different threads: each reads and writes only its own sequences' memory, in the
        room this micro-batch reserved. Calls on one part stay on one thread, and every part must
        store every layer, as a micro-batch does. [self] when the memory cannot cut it (then run
        it whole). Parts hold `rows` of the batch as a micro-batch does; `index` says where their
        rows sit among this micro-batch's."""
        memory = self._live()
        if self.parent is not None or self._parts:
            raise BatchStateError("a micro-batch is cut into parts once, and a part is not cut again")
        parts = memory._parts(self, n) if n > 1 and len(self.seqs) > 1 else [self]
        self._parts = [p for p in parts if p is not self]
        return parts

    def _cut(self, n: int) -> list[MicroBatch]:
        """This micro-batch's sequences in at most n groups of consecutive ids with near-equal rows,
        each as a part whose slots the memory fills (`Memory._parts`); [self] when it holds too few.
        Consecutive ids: a group is one range of a cache's dense slots."""
        seqs, counts = np.unique(self.seq_ids, return_counts=True)
        ends = np.cumsum(counts)  # rows up to and including each sequence
        cuts = [0]
        for k in range(1, n):
            target = ends[-1] * k / n
            i = int(np.searchsorted(ends, target))  # the first sequence that reaches the target
            cut = i if i > 0 and target - ends[i - 1] < ends[i] - target else i + 1  # the nearer end
            if cuts[-1] < cut < len(seqs):
                cuts.append(cut)
        if len(cuts) < 2:
            return [self]
        parts = []
        for a, b in pairwise([*cuts, len(seqs)]):
            index = np.flatnonzero(np.isin(self.seq_ids, seqs[a:b]))
            group = set(seqs[a:b].tolist())
            own = tuple(s for s in self.seqs if s in group)
            parts.append(MicroBatch(self.rows[index], self.positions[index], self.seq_ids[index], own,
                                    self.n_seq_tokens, parent=self, index=index))  # fmt: skip
        return parts

    def store_kv(self, layer: int, k: Array, v: Array) -> None:
        """Store this micro-batch's keys `[len(ub), n_kv_heads, head_dim]` and values at `layer`."""
        self._live()._leaf(layer)._store_kv(self, layer, k, v)
        self.stored.add(layer)

    def kv(self, layer: int, seq: int) -> tuple[Array, Array, Array]:
        """What `seq` sees at `layer` now (earlier tokens and this micro-batch's), sorted by position:
        k `[n, n_kv_heads, head_dim]`, v `[n, n_kv_heads, v_head_dim]`, positions `[n]` int64."""
        memory = self._live()
        memory._check_seq(seq)
        return memory._leaf(layer)._kv(layer, seq)

    def kv_batch(self, layer: int, seqs: tuple[int, ...] | None = None) -> tuple[Array, Array, Array, Array]:
        """Several sequences at once (all of `self.seqs` by default), padded: k `[S, L, Hkv, D]`,
        v `[S, L, Hkv, Dv]`, positions `[S, L]` (-1 on padding, whose k/v rows are zero), lengths
        `[S]`; S = len(seqs)."""
        memory = self._live()
        return memory._leaf(layer)._kv_batch(layer, self._chosen(memory, seqs))

    def kv_dense(self, layer: int, seqs: tuple[int, ...] | None = None) -> DenseRows | None:
        """For decoding: every key and value of `seqs` (default `self.seqs`), head-major and padded,
        from buffers kept between calls, so only rows added since the last call are copied (see
        `DenseKV`). Rows are sorted by position, so a query at a sequence's last position sees all
        of its `lengths[r]` keys. None when these buffers are unavailable (a windowed layer, or
        more rows than their budget): then use `kv_batch`."""
        memory = self._live()
        return memory._leaf(layer)._kv_dense(self, layer, self._chosen(memory, seqs))

    def _chosen(self, memory: Memory, seqs: tuple[int, ...] | None) -> tuple[int, ...]:
        """`seqs`, each checked, or this micro-batch's sequences when None (or when `seqs` are just
        those, checked already: decode attention asks for them at every layer)."""
        if seqs is None or seqs == self.seqs:
            return self.seqs
        return tuple(memory._check_seq(s) for s in seqs)

    def state(self, layer: int) -> tuple[Array, Array]:
        """The recurrent state before this micro-batch: conv `[len(seqs), *conv_shape]`, ssm
        `[len(seqs), *ssm_shape]`, rows in `seqs` order (zeros for a sequence that starts here)."""
        return self._live()._leaf(layer)._state(self, layer)

    def store_state(self, layer: int, conv: Array, ssm: Array) -> None:
        """Store the state after this micro-batch, shaped as `state` returned it."""
        self._live()._leaf(layer)._store_state(self, layer, conv, ssm)
        self.stored.add(layer)


def split_simple(batch: Batch, n_ubatch: int) -> list[MicroBatch]:
    """Consecutive chunks of `n_ubatch` rows in batch order (enough for attention-only memories)."""
    ubatches: list[MicroBatch] = []
    for start in range(0, batch.n_tokens, n_ubatch):
        rows = np.arange(start, min(start + n_ubatch, batch.n_tokens), dtype=np.int64)
        seqs = tuple(int(s) for s in np.unique(batch.seq_ids[rows]))
        ubatches.append(MicroBatch.of(batch, rows, seqs, None))
    return ubatches


def split_equal(batch: Batch, n_ubatch: int) -> list[MicroBatch]:
    """Micro-batches that hold an equal-length run of each of their sequences' tokens, in order
    (llama.cpp's equal split), since a recurrent scan is sequential per sequence.

    Example: seq 0 has 5 tokens, seq 1 has 2, n_ubatch=8: first ub = 2 tokens of each (rows
    seq-major, n_seq_tokens=2), then ub = seq 0's remaining 3."""
    order = np.argsort(batch.seq_ids, kind="stable")
    seq_sorted = batch.seq_ids[order]
    starts = np.flatnonzero(np.r_[True, seq_sorted[1:] != seq_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    runs = {int(seq_sorted[s]): order[s:e] for s, e in zip(starts, ends, strict=True)}  # seq -> its rows in order
    taken = {seq: 0 for seq in runs}
    ubatches: list[MicroBatch] = []
    while True:
        active = [seq for seq in sorted(runs) if taken[seq] < len(runs[seq])][:n_ubatch]
        if not active:
            return ubatches
        n_seq_tokens = min(min(len(runs[s]) - taken[s] for s in active), n_ubatch // len(active))
        rows = np.concatenate([runs[s][taken[s] : taken[s] + n_seq_tokens] for s in active])
        for s in active:
            taken[s] += n_seq_tokens
        ubatches.append(MicroBatch.of(batch, rows.astype(np.int64), tuple(active), n_seq_tokens))


class Transaction(ABC):
    """One batch's changes to one memory: applied micro-batch by micro-batch, then kept or undone."""

    @abstractmethod
    def apply(self, ub: MicroBatch) -> None:
        """Reserve room for `ub` and record how to undo it; MemoryFull if there is none."""

    @abstractmethod
    def rollback(self) -> None:
        """Undo every change since the transaction began, data included."""

    @abstractmethod
    def commit(self) -> None:
        """Keep the changes; the undo records are dropped."""


class CompositeTransaction(Transaction):
    """Parts in order; the part that can refuse goes first. Undone in reverse order."""

    def __init__(self, parts: list[Transaction]):
        self.parts = parts

    def apply(self, ub: MicroBatch) -> None:
        for p in self.parts:
            p.apply(ub)

    def rollback(self) -> None:
        for p in reversed(self.parts):
            p.rollback()

    def commit(self) -> None:
        for p in self.parts:
            p.commit()


class BatchPlan:
    """What `Memory.batch` returns: a context manager that yields the micro-batches."""

    def __init__(self, memory: Memory, ubatches: list[MicroBatch], n_ubatch: int, version: int):
        self._memory = memory
        self._version = version  # the memory's version when this plan was made
        self._ubatches = ubatches
        self.n_ubatch = n_ubatch
        self._txn: Transaction | None = None
        self._done = 0
        self._iterated = False

    def __len__(self) -> int:
        return len(self._ubatches)

    def __enter__(self) -> BatchPlan:
        if self._txn is not None or self._iterated:
            raise BatchStateError("a batch plan can be entered once")
        if self._memory._version != self._version:
            raise BatchStateError("the memory changed since this batch was planned: plan it again with mem.batch")
        self._memory._open(self)
        self._txn = self._memory._transaction(real=True)
        return self

    def __iter__(self) -> Iterator[MicroBatch]:
        if self._txn is None:
            raise BatchStateError("iterate a batch plan inside `with mem.batch(...) as plan:`")
        if self._iterated:
            raise BatchStateError("a batch plan can be iterated once")
        self._iterated = True
        for ub in self._ubatches:
            ub.slots.clear()
            ub._parts = []
            self._txn.apply(ub)
            ub._memory = self._memory
            try:
                yield ub
            finally:
                ub._memory = None
            self._check_stored(ub)
            self._done += 1

    def _check_stored(self, ub: MicroBatch) -> None:
        for i, part in enumerate(ub._parts or [ub]):
            missing = sorted(set(self._memory.layers) - part.stored)
            if missing:
                what = f"part {i} of micro-batch {self._done}" if ub._parts else f"micro-batch {self._done}"
                raise BatchStateError(
                    f"{what} ended without storing layers {missing}: every layer this "
                    "memory holds must call store_kv / store_state once per micro-batch"
                )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._txn is not None
        try:
            if exc_type is None and self._done == len(self._ubatches):
                self._txn.commit()
                return
            self._txn.rollback()
        finally:
            self._memory._close(self)
        if exc_type is None:
            raise BatchStateError(
                f"the batch was left after {self._done} of {len(self._ubatches)} micro-batches; "
                "it was undone: process every micro-batch before leaving the block"
            )


def check_continuation(batch: Batch, pos_max: dict[int, int]) -> None:
    """Each sequence's positions in the batch continue it: the first is `seq_pos_max + 1` (anything
    for an empty sequence, pos_max -1) and they rise by one in batch order."""
    order = np.argsort(batch.seq_ids, kind="stable")
    seq_sorted = batch.seq_ids[order]
    pos_sorted = batch.positions[order]
    first = np.r_[True, seq_sorted[1:] != seq_sorted[:-1]]
    steps = np.diff(pos_sorted)
    bad = np.flatnonzero(~first[1:] & (steps != 1))
    if len(bad):
        i = int(bad[0]) + 1
        raise InvalidBatch(
            f"positions of sequence {int(seq_sorted[i])} must rise by one in batch order: got "
            f"{int(pos_sorted[i - 1])} then {int(pos_sorted[i])}"
        )
    for start in np.flatnonzero(first):
        seq, pos = int(seq_sorted[start]), int(pos_sorted[start])
        last = int(pos_max[seq])
        if last >= 0 and pos != last + 1:
            raise InvalidBatch(
                f"sequence {seq} holds positions up to {last}, so its batch must start at {last + 1}, got {pos}"
            )
