"""`DenseKV`: decoding sequences' keys and values as dense head-major rows, kept between steps.

A decoding sequence adds one token a step, yet its query reads every key it holds. Gathering
those rows out of the cells every step copies the whole history every step (32 sequences of 300
tokens: ~450 MB a step for SmolLM2). These buffers keep each sequence's rows in place between
steps, laid out as attention's matmuls want them, and copy in only the rows added since the last
call.

Layout, per layer: k `[slots, Hkv, L_cap, D]`, v `[slots, Hkv, L_cap, Dv]`; slot s holds sequence s
(ids are small and the engine hands out low ones first), its rows in the order of its cell index
(by position). A slot is valid for `count` rows while the sequence's index keeps the same `epoch`:
`_SeqCells` bumps its epoch on every change other than an append (a removal, a copy, a shift, a
restore, an undone batch), so a stale slot is rebuilt from the cells, never trusted.

The copies a micro-batch needs are the same for every layer, so they are planned once, at its
first call (`_Step`), and each layer's call then makes just its own copy (a layer that was not
called before the next plan is marked stale, and rebuilt when next asked for).

The buffers hold at most `budget` rows (slots * L_cap; by default the cache's own cell count, so
memory at most doubles, or one ROUND per sequence id for a tiny cache). Slots above the sequences a
call asks for give their room back when its rows need it; when the call alone would need more, it
returns None and the caller gathers. They grow by doubling (slots and L_cap alike, within
the budget): a growth of L_cap moves all of a layer's rows, and sequences joining one by one (32 of
them through chunked prefill) must not cost a move each. A growth that leaves L_cap less than
doubling room takes all of it at once: 32 decoding sequences would otherwise stop for a last, small
move of every layer's rows in the middle of decoding.

Each layer's [slots, Hkv, L_cap, D] is a view of the front of a flat storage buffer, so a growth
that the storage holds only moves the kept rows (or nothing, when L_cap stays), and one that it does
not allocates a larger storage. A cache whose memory wants it (`reserve`: the host's full-attention
caches) takes the whole budget's storage when it is made. On these machines fresh host memory costs
~1.4 ms a MB on its first touch: the growth to 32 slots of 386 rows (569 MB for SmolLM2) stopped
every sequence for ~0.8 s in the middle of serving; now the cache's creation pays it, once, as it
pays for its own cells. (A device allocates from its pool without that cost, and grows as before.)
Rows a relayout leaves behind hold other rows' keys, stale and finite, like a slot no one asks for.

The parts of a micro-batch (`MicroBatch.parts`) call at the same time from different threads, each
for its own sequences, so for its own range of slots: each part plans its own step, and the buffers
are laid out for all of them before they start (`prepare_parts`). A part never grows them (that
would move rows another part is reading); where they do not hold its rows it is told None and
gathers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from statemesh.memory.backend import Array

if TYPE_CHECKING:
    from statemesh.memory.kv_cache import KVCache

GROWTH = 2  # slots and L_cap grow by at least this factor (within the budget), so reallocations are rare
ROUND = 64  # L_cap is a whole multiple of this many rows


@dataclass(frozen=True)
class DenseRows:
    """What `ub.kv_dense` returns. R >= S rows cover the sequences asked for (a range of slots);
    `rows[i]` is the row of the i-th sequence asked for, and `lengths[r]` how many of row r's keys
    are real (0 for a row no sequence asked for: its contents are stale, finite, and to be ignored).
    k `[R, Hkv, L, D]`, v `[R, Hkv, L, Dv]` are views, valid until the memory next changes."""

    k: Array
    v: Array
    lengths: np.ndarray  # [R] int64, host
    rows: np.ndarray  # [S] int64, host
    last_positions: np.ndarray  # [S] int64, host: each sequence's last (largest) key position
    in_order: bool  # R == S and rows[i] == i: row i is the i-th sequence asked for
    # [R, L] bool on the backend: the keys each row's query must not attend, those past its real ones
    # (a row no sequence asked for hides none of its stale, finite keys, so its discarded softmax
    # stays finite); None: none
    hidden: Array | None


Copies = tuple[np.ndarray, np.ndarray, np.ndarray]  # cells, and the (slot, row) each one goes to


@dataclass
class _Step:
    """The plan for one micro-batch's calls with one set of sequences."""

    ub: Any  # the micro-batch (compared by identity)
    seqs: tuple[int, ...]
    version: int  # the cache's version when planned
    lo: int  # slots lo .. hi-1 cover seqs
    hi: int
    width: int  # the longest sequence's rows
    lengths: np.ndarray
    rows: np.ndarray
    last_positions: np.ndarray
    in_order: bool
    hidden: Array | None
    pending: dict[int, Copies]  # layer -> copies it has not made yet


class DenseKV:
    def __init__(self, cache: KVCache, budget: int, reserve: bool = False):
        self.cache = cache
        self.budget = budget
        self._k: dict[int, Array] = {}  # per layer: a view [slots, Hkv, L_cap, D] of the front of...
        self._v: dict[int, Array] = {}
        self._k_storage: dict[int, Array] = {}  # ...a flat buffer that may hold more rows
        self._v_storage: dict[int, Array] = {}
        self._layer_index = {layer: i for i, layer in enumerate(cache.layers)}
        # per layer and slot: the epoch of the sequence's index its rows were copied under, and how many
        self._epoch = np.full((len(cache.layers), cache.n_seq_max), -1, dtype=np.int64)
        self._count = np.zeros((len(cache.layers), cache.n_seq_max), dtype=np.int64)
        self._step: _Step | None = None
        self._part_steps: dict[int, _Step] = {}  # by id of a micro-batch's part (`prepare_parts`)
        self.reallocations = 0  # new layouts of one layer's buffers (each moves the rows it keeps)
        self.allocations = 0  # of one layer's storage (fresh memory)
        self.reserve = reserve
        if reserve:
            for layer in cache.layers:
                self._allocate(layer, budget)

    def forget(self) -> None:
        """Every row stale (the cache was cleared); reserved storage stays, grown storage goes."""
        self._epoch[:] = -1
        self._count[:] = 0
        self._step = None
        self._part_steps = {}
        self._k, self._v = {}, {}
        if not self.reserve:
            self._k_storage, self._v_storage = {}, {}

    @staticmethod
    def default_budget(n_cells: int, n_seq_max: int) -> int:
        return max(n_cells, n_seq_max * ROUND)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (*self._k_storage.values(), *self._v_storage.values()))

    def prepare_parts(self, seqs: tuple[int, ...]) -> None:
        """Before the parts of a micro-batch run side by side on threads: lay out every layer's
        buffers for all of their sequences `seqs`, so that no part's call moves rows another part
        is reading (a part never grows the buffers: `rows` gathers instead). Steps planned before
        are done with."""
        self._end_steps()
        held = [self.cache._seq[s] for s in seqs]
        hi, width = max(seqs) + 1, max(h.n for h in held)
        if hi * width <= self.budget:
            for layer in self._layer_index:
                self._fit(layer, hi, width)

    def rows(self, ub: Any, layer: int, seqs: tuple[int, ...]) -> DenseRows | None:
        """`seqs`' rows at `layer` for micro-batch `ub`, or None when the budget cannot hold them
        (or, for a part of a micro-batch, when the buffers laid out for the parts do not)."""
        part = ub.parent is not None
        step = self._part_steps.get(id(ub)) if part else self._step
        if step is None or step.ub is not ub or step.seqs != seqs or step.version != self.cache._version:
            step = self._plan(ub, seqs, part)
            if step is None:
                return None
        self._fit(layer, step.hi, step.width)
        k, v = self._k[layer], self._v[layer]
        copies = step.pending.pop(layer, None)
        if copies is not None and len(copies[0]):
            cells, slots, rows = (self.cache.backend.index(a) for a in copies)
            # advanced indices around a slice: the [m] axis comes first, as in the cache's [m, Hkv, D]
            k[slots, :, rows] = self.cache._k[layer][cells]
            v[slots, :, rows] = self.cache._v[layer][cells]
        lo, hi, width = step.lo, step.hi, step.width
        return DenseRows(
            k[lo:hi, :, :width], v[lo:hi, :, :width], step.lengths, step.rows, step.last_positions, step.in_order,
            step.hidden,
        )  # fmt: skip

    def _plan(self, ub: Any, seqs: tuple[int, ...], part: bool = False) -> _Step | None:
        """What each layer must copy for `seqs` in this micro-batch; None (nothing changed) when
        their rows would not fit the budget. A part of a micro-batch (`part`) touches only its own
        sequences' slots, and its step is its own, beside the other parts'."""
        cache = self.cache
        held = [cache._seq[s] for s in seqs]
        seq_ids = np.array(seqs, dtype=np.int64)
        n = np.array([h.n for h in held], dtype=np.int64)
        lo, hi, width = int(seq_ids.min()), int(seq_ids.max()) + 1, int(n.max())
        if hi * width > self.budget:  # slots beyond hi that no one asked for give their room back (`_fit`)
            return None
        if part:
            if not all(self._holds(layer, hi, width) for layer in self._layer_index):
                return None
            self._end(self._part_steps.pop(id(ub), None))
        else:
            self._end_steps()
        now = np.array([h.epoch for h in held], dtype=np.int64)
        epoch, count = self._epoch[:, seq_ids], self._count[:, seq_ids]  # [layers, S]
        start = np.where((epoch == now) & (count <= n), count, 0)
        self._epoch[:, seq_ids], self._count[:, seq_ids] = now, n
        if (start == start[0]).all():  # as usual, every layer starts where the others do: plan once
            same = self._copies(held, seq_ids, n, start[0])
            pending = dict.fromkeys(self._layer_index, same)
        else:
            pending = {layer: self._copies(held, seq_ids, n, start[i]) for layer, i in self._layer_index.items()}
        lengths = np.zeros(hi - lo, dtype=np.int64)
        lengths[seq_ids - lo] = n
        last = np.where(n > 0, cache.pos[[h.buf[max(h.n - 1, 0)] for h in held]], -1)
        rows = seq_ids - lo
        in_order = hi - lo == len(seqs) and bool(np.all(rows == np.arange(len(seqs))))
        hidden = None
        if np.any(lengths < width):  # once a step, not once a layer
            hidden = cache.backend.asarray((np.arange(width)[None, :] >= lengths[:, None]) & (lengths[:, None] > 0))
        step = _Step(ub, seqs, cache._version, lo, hi, width, lengths, rows, last, in_order, hidden, pending)
        if part:
            self._part_steps[id(ub)] = step
        else:
            self._step = step
        return step

    def _end_steps(self) -> None:
        """Done with every step planned so far."""
        for step in (self._step, *self._part_steps.values()):
            self._end(step)
        self._step, self._part_steps = None, {}

    def _end(self, step: _Step | None) -> None:
        """A layer that never made its copies for `step`: its rows are stale."""
        if step is not None:
            for layer, (_, slots, _) in step.pending.items():
                self._epoch[self._layer_index[layer], slots] = -1

    def _holds(self, layer: int, slots: int, width: int) -> bool:
        """Whether layer's buffers hold slots 0 .. slots-1 at least `width` rows wide."""
        k = self._k.get(layer)
        return k is not None and slots <= k.shape[0] and width <= k.shape[2]

    @staticmethod
    def _copies(held: list[Any], seq_ids: np.ndarray, n: np.ndarray, start: np.ndarray) -> Copies:
        """The cells from `start` to `n` of each sequence, and where they go (its slot, its row)."""
        added = n - start
        if not added.any():
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, empty
        cells = np.concatenate([h.buf[a:b] for h, a, b in zip(held, start, n, strict=True) if b > a])
        slots = np.repeat(seq_ids, added)
        rows = np.arange(len(cells)) - np.repeat(np.cumsum(added) - added - start, added)
        return cells, slots, rows

    def _fit(self, layer: int, slots: int, width: int) -> None:
        """Make layer's buffers hold slots 0 .. slots-1 at least `width` rows wide (the plan checked
        that this fits the budget), growing what must grow by GROWTH where the budget allows."""
        if self._holds(layer, slots, width):
            return
        k = self._k.get(layer)
        have_slots, have_width = (k.shape[0], k.shape[2]) if k is not None else (0, 0)
        width = max(width, 1)
        if slots > have_slots:
            slots = max(slots, min(GROWTH * have_slots, self.cache.n_seq_max, self.budget // width))
        # Keep the slots there are unless the rows need their room; then shrink to the slots asked
        # for, at once. (A growth to 32 sequences may take 34 slots, twice 17: 34 * 363 rows fill a
        # budget of 12352 rows that 32 sequences of 384 fit.)
        if have_slots * width <= self.budget:
            slots = max(slots, have_slots)
        wanted = ROUND * math.ceil(max(width, GROWTH * have_width) / ROUND) if width > have_width else have_width
        room = self.budget // slots  # rows per slot the budget allows
        width = max(width, min(wanted, room))  # below have_width only when more slots need it
        if room < GROWTH * width:  # the rows can never double again: take them all now, rather than
            width = room  # reallocate every layer later for a last small growth (256 -> 320 -> 386)
        self._reallocate(layer, slots, width)

    def _reallocate(self, layer: int, slots: int, width: int) -> None:
        """Buffers [slots, :, width] holding the old ones' rows; a slot that no longer fits, or whose
        rows no longer do, is marked stale (never one of the current step's: they fit)."""
        k_row, v_row = self._row_size(layer)
        old_k, old_v = self._k.get(layer), self._v.get(layer)
        fresh = len(self._k_storage.get(layer, ())) < slots * width * k_row
        if fresh:  # the old views keep the old storage alive for the copy below
            self._allocate(layer, slots * width)
        attn = self.cache.spec.attention(layer)
        k = self._k_storage[layer][: slots * width * k_row].reshape(slots, attn.n_kv_heads, width, attn.head_dim)
        v = self._v_storage[layer][: slots * width * v_row].reshape(slots, attn.n_kv_heads, width, attn.v_dim)
        if old_k is not None and old_v is not None:
            have_slots, have_width = old_k.shape[0], old_k.shape[2]
            kept, keep = min(have_slots, slots), min(have_width, width)
            if fresh:
                k[:kept, :, :keep] = old_k[:kept, :, :keep]
                v[:kept, :, :keep] = old_v[:kept, :, :keep]
            elif width != have_width:  # the same storage, rows moved: old and new places overlap (NumPy
                # would copy them first by itself, CuPy need not)
                k[:kept, :, :keep] = old_k[:kept, :, :keep].copy()
                v[:kept, :, :keep] = old_v[:kept, :, :keep].copy()
            # (the same storage and width: every kept row already is where the new view looks)
            i = self._layer_index[layer]
            self._epoch[i, slots:have_slots] = -1  # slots given back (new slots were planned for this step)
            if width < have_width:
                self._epoch[i, self._count[i] > width] = -1
        self._k[layer], self._v[layer] = k, v
        self.reallocations += 1

    def _allocate(self, layer: int, rows: int) -> None:
        """Fresh zeroed storage for `rows` rows of the layer (what it held before is not kept)."""
        k_row, v_row = self._row_size(layer)
        backend, dtype = self.cache.backend, self.cache.spec.dtype
        self._k_storage[layer] = backend.zeros((rows * k_row,), dtype)
        self._v_storage[layer] = backend.zeros((rows * v_row,), dtype)
        self.allocations += 1

    def _row_size(self, layer: int) -> tuple[int, int]:
        """Numbers in one row of k and of v: Hkv * D, Hkv * Dv."""
        attn = self.cache.spec.attention(layer)
        return attn.n_kv_heads * attn.head_dim, attn.n_kv_heads * attn.v_dim
