"""Causal attention of a micro-batch's queries over what memory holds, for any attention layer.

Symbols: T query rows of one sequence, L keys it sees, H query heads, Hkv key/value heads,
G = H / Hkv query heads per key head (grouped-query attention), D head dim.

A query at position p sees the keys at positions <= p, and with a window W only those > p - W
(W=3, p=10: keys 8, 9, 10).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from statemesh.memory import MicroBatch
from statemesh.worker.nn import xp_of


def attend(
    q: Any,
    ub: MicroBatch,
    layer: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> Any:
    """q [n, H, D] for the rows of `ub` -> attention output [n, H, Dv], every row over its own
    sequence's keys (which `ub.store_kv` has already written for this micro-batch)."""
    xp = xp_of(q)
    n, n_heads, _ = q.shape
    out = None
    for seq in ub.seqs:
        rows = np.flatnonzero(ub.seq_ids == seq)
        k, v, key_pos = ub.kv(layer, seq)  # [L, Hkv, D], [L, Hkv, Dv], [L]
        n_kv = k.shape[1]
        group = n_heads // n_kv
        t = len(rows)
        qs = q[rows].reshape(t, n_kv, group, -1).transpose(1, 2, 0, 3)  # [T, H, D] -> [Hkv, G, T, D]
        scores = qs @ k.transpose(1, 2, 0)[:, None]  # [Hkv, G, T, D] @ [Hkv, 1, D, L] -> [Hkv, G, T, L]
        scores *= xp.float32(scale)
        if softcap is not None:
            scores = xp.tanh(scores / xp.float32(softcap)) * xp.float32(softcap)
        first, last = int(ub.positions[rows].min()), int(ub.positions[rows].max())
        if window is not None or int(key_pos.max()) > first:  # else every query sees every key
            query_pos = xp.asarray(ub.positions[rows])[:, None]  # [T, 1]
            visible = key_pos[None, :] <= query_pos  # [T, L]
            if window is not None and int(key_pos.min()) <= last - window:
                visible &= key_pos[None, :] > query_pos - window
            scores = xp.where(visible, scores, xp.float32(-np.inf))
        scores -= scores.max(axis=-1, keepdims=True)
        probs = xp.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        o = probs @ v.transpose(1, 0, 2)[:, None]  # [Hkv, G, T, L] @ [Hkv, 1, L, Dv] -> [Hkv, G, T, Dv]
        o = o.transpose(2, 0, 1, 3).reshape(t, n_heads, -1)  # [Hkv, G, T, Dv] -> [T, H, Dv]
        if out is None:
            out = xp.empty((n, n_heads, o.shape[-1]), dtype=q.dtype)
        out[rows] = o
    return out
