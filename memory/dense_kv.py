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

The buffers hold at most `budget` rows (slots * L_cap; by default the cache's own cell count, so
memory at most doubles, or one ROUND per sequence id for a tiny cache). When a call would need
more, it returns None and the caller gathers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from statemesh.memory.backend import Array

if TYPE_CHECKING:
    from statemesh.memory.kv_cache import KVCache

GROWTH = 1.25  # L_cap grows by at least this factor, so reallocations are rare
ROUND = 64  # ... and in whole multiples of this many rows


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


class DenseKV:
    def __init__(self, cache: KVCache, budget: int):
        self.cache = cache
        self.budget = budget
        self._k: dict[int, Array] = {}
        self._v: dict[int, Array] = {}
        self._epoch = {layer: np.full(cache.n_seq_max, -1, dtype=np.int64) for layer in cache.layers}
        self._count = {layer: np.zeros(cache.n_seq_max, dtype=np.int64) for layer in cache.layers}

    @staticmethod
    def default_budget(n_cells: int, n_seq_max: int) -> int:
        return max(n_cells, n_seq_max * ROUND)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (*self._k.values(), *self._v.values()))

    def rows(self, layer: int, seqs: tuple[int, ...]) -> DenseRows | None:
        cache = self.cache
        held = [cache._seq[s] for s in seqs]
        seq_ids = np.array(seqs, dtype=np.int64)
        lo, hi = int(seq_ids.min()), int(seq_ids.max()) + 1
        width = max(h.n for h in held)
        if not self._fit(layer, hi, width):
            return None
        epoch, count = self._epoch[layer], self._count[layer]
        n = np.array([h.n for h in held], dtype=np.int64)
        now = np.array([h.epoch for h in held], dtype=np.int64)
        start = np.where((epoch[seq_ids] == now) & (count[seq_ids] <= n), count[seq_ids], 0)
        epoch[seq_ids], count[seq_ids] = now, n
        k, v = self._k[layer], self._v[layer]
        added = n - start
        if added.any():
            # the usual step: one new row per sequence; a rebuilt sequence brings all of its rows
            cells = np.concatenate([h.buf[a:b] for h, a, b in zip(held, start, n, strict=True) if b > a])
            slots = np.repeat(seq_ids, added)
            rows = np.arange(len(cells)) - np.repeat(np.cumsum(added) - added - start, added)
            k_rows, v_rows = cache.backend.take_rows([cache._k[layer], cache._v[layer]], cells)  # [m, Hkv, D]
            slots_dev, rows_dev = cache.backend.index(slots), cache.backend.index(rows)
            k[slots_dev, :, rows_dev] = k_rows  # advanced indices around a slice: the [m] axis comes first
            v[slots_dev, :, rows_dev] = v_rows
        lengths = np.zeros(hi - lo, dtype=np.int64)
        lengths[seq_ids - lo] = n
        last = cache.pos[[h.buf[h.n - 1] if h.n else 0 for h in held]]
        last[[h.n == 0 for h in held]] = -1
        return DenseRows(k[lo:hi, :, :width], v[lo:hi, :, :width], lengths, seq_ids - lo, last)

    def _fit(self, layer: int, slots: int, width: int) -> bool:
        """Make layer's buffers at least [slots, :, width] within the budget; False if they can't be."""
        k = self._k.get(layer)
        have_slots, have_width = (k.shape[0], k.shape[2]) if k is not None else (0, 0)
        if slots <= have_slots and width <= have_width:
            return True
        slots = max(slots, have_slots)
        if slots * width > self.budget:
            return False
        if width > have_width:
            wanted = ROUND * math.ceil(max(width, GROWTH * have_width) / ROUND)
            width = max(width, min(wanted, self.budget // slots))
        else:
            width = have_width
        attn = self.cache.spec.attention(layer)
        backend, dtype = self.cache.backend, self.cache.spec.dtype
        grown_k = backend.zeros((slots, attn.n_kv_heads, width, attn.head_dim), dtype)
        grown_v = backend.zeros((slots, attn.n_kv_heads, width, attn.v_dim), dtype)
        if k is not None:
            grown_k[:have_slots, :, :have_width] = k
            grown_v[:have_slots, :, :have_width] = self._v[layer]
        self._k[layer], self._v[layer] = grown_k, grown_v
        return True
