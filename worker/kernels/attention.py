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
from statemesh.worker.kernels import nn
from statemesh.worker.kernels.nn import xp_of
from statemesh.worker.kernels.threads import Threads

MIN_PART = 8  # sequences per thread, below which splitting attention costs more than it saves
QUERY_BLOCK = 64  # a prompt chunk's query rows per block (`attend_each`)


def attend(
    q: Any,
    ub: MicroBatch,
    layer: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    threads: Threads | None = None,
) -> Any:
    """q [n, H, D] for the rows of `ub` -> attention output [n, H, Dv], every row over its own
    sequence's keys (which `ub.store_kv` has already written for this micro-batch). `threads`
    share the dense decode attention of many sequences between the host's cores.

    Sequences with one new row (decoding) go together: through the memory's dense rows kept
    between steps (`attend_dense`, nothing gathered but the new rows), else padded (`attend_batched`).
    A sequence with a chunk of prompt goes alone (`attend_each`), so no decoding sequence is padded
    to a chunk's length."""
    decoding: tuple[int, ...] = ub.seqs  # as in a decode step: one row per sequence
    prefilling: tuple[int, ...] = ()
    if len(ub.seq_ids) != len(ub.seqs):
        seq_ids = np.sort(ub.seq_ids)
        single = np.ones(len(seq_ids), dtype=np.bool_)  # its sequence has just this row
        single[1:] &= seq_ids[1:] != seq_ids[:-1]
        single[:-1] &= seq_ids[1:] != seq_ids[:-1]
        one_row = set(seq_ids[single].tolist())
        decoding = tuple(seq for seq in ub.seqs if seq in one_row)
        prefilling = tuple(seq for seq in ub.seqs if seq not in one_row)
    out = None
    if decoding and window is None:
        out = attend_dense(q, ub, layer, scale, softcap, decoding, threads)
    if out is None and len(decoding) >= 2:
        out = attend_batched(q, ub, layer, scale, window, softcap, decoding)
    if out is None:
        return attend_each(q, ub, layer, scale, window, softcap, ub.seqs)
    if prefilling:
        out = attend_each(q, ub, layer, scale, window, softcap, prefilling, out)
    return out


def attend_dense(
    q: Any,
    ub: MicroBatch,
    layer: int,
    scale: float,
    softcap: float | None,
    seqs: tuple[int, ...],
    threads: Threads | None = None,
) -> Any | None:
    """The one query row of each of `seqs` (full attention, each at its sequence's last position)
    over the memory's dense rows `[R, Hkv, L, D]`: two batched matmuls, no gather; on the host,
    parts of the R rows on separate threads. Returns [n, H, Dv] filled for those rows, or None
    when the memory has no dense rows for them."""
    dense = ub.kv_dense(layer, seqs)
    if dense is None:
        return None
    # each sequence's one row in ub; all_rows: the micro-batch is exactly these rows, in order
    all_rows = len(ub.seq_ids) == len(seqs) and ub.seq_ids.tolist() == list(seqs)
    if all_rows:
        mine = np.arange(len(seqs))
    else:
        order = np.argsort(ub.seq_ids, kind="stable")
        mine = order[np.searchsorted(ub.seq_ids[order], seqs)]
    if np.any(ub.positions[mine] < dense.last_positions):
        return None  # a key beyond the query (a hybrid restarted below its cells): needs masks
    xp = xp_of(q)
    n, n_heads, head_dim = q.shape
    n_rows, n_kv, _, _ = dense.k.shape
    group = n_heads // n_kv
    mine_dev = xp.asarray(mine)
    queries = (q if all_rows else q[mine_dev]).reshape(len(seqs), n_kv, group, head_dim)  # [S, Hkv, G, D]
    rows_dev = xp.asarray(dense.rows)
    if not dense.in_order:  # rows of the range that no sequence asked for get zero queries
        padded = xp.zeros((n_rows, n_kv, group, head_dim), dtype=q.dtype)
        padded[rows_dev] = queries
        queries = padded
    hidden = None if dense.hidden is None else dense.hidden[:, None, None, :]  # [R, L] -> [R, 1, 1, L]
    parts = 1 if threads is None else min(threads.free, n_rows // MIN_PART)  # 1 within a part of a step
    if parts > 1:
        assert threads is not None
        chunks = [
            (queries[r], dense.k[r], dense.v[r], scale, softcap, None if hidden is None else hidden[r])
            for r in threads.spans(n_rows, parts)
        ]
        o = xp.concatenate(threads.map(weighted_values, chunks))
    else:
        o = weighted_values(queries, dense.k, dense.v, scale, softcap, hidden)
    if not dense.in_order:
        o = o[rows_dev]
    o = o.reshape(len(seqs), n_heads, -1)  # [S, H, Dv]
    if all_rows:
        return o
    out = xp.empty((n, n_heads, o.shape[-1]), dtype=q.dtype)
    out[mine_dev] = o
    return out


def weighted_values(queries: Any, k: Any, v: Any, scale: float, softcap: float | None, hidden: Any) -> Any:
    """queries [..., T, D] over k [..., L, D] and v [..., L, Dv] (leading axes broadcast) -> [..., T, Dv]:
    softmax(scale * q k^T, soft-capped (Gemma 2), the keys where `hidden` (broadcast to [..., T, L];
    None: none) masked out) @ v. The scale goes onto the queries (D numbers a row, not L) and the
    normalization onto the output (Dv, not L): two passes fewer over the scores than scaling and
    normalizing them; masking is in place. Every row must see at least one key."""
    xp = xp_of(queries)
    scores = (queries * xp.float32(scale)) @ xp.swapaxes(k, -1, -2)  # [..., T, D] @ [..., D, L] -> [..., T, L]
    if softcap is not None:
        scores = nn.softcap(scores, softcap)
    if hidden is not None:
        xp.copyto(scores, xp.float32(-np.inf), where=hidden)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = xp.exp(scores, out=scores)  # unnormalized
    o = weights @ v  # [..., T, L] @ [..., L, Dv] -> [..., T, Dv]
    o /= weights.sum(axis=-1, keepdims=True)
    return o


def attend_batched(
    q: Any,
    ub: MicroBatch,
    layer: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    seqs: tuple[int, ...],
) -> Any:
    """The rows of `seqs` in one padded computation: S sequences, up to T query rows and L keys
    each. Padded keys have position -1 and are masked; padded query rows see every real key (their
    output is discarded), so no softmax row is empty. Returns [n, H, Dv] for all rows of `ub`,
    filled for the rows of `seqs`."""
    xp = xp_of(q)
    n_heads = q.shape[1]
    k, v, key_pos, _ = ub.kv_batch(layer, seqs)  # [S, L, Hkv, D], [S, L, Hkv, Dv], [S, L]
    n_seqs, _, n_kv, _ = k.shape
    group = n_heads // n_kv
    # each of those rows' sequence (s) and its place among that sequence's rows (t)
    seq_index = {seq: i for i, seq in enumerate(seqs)}
    mine = np.flatnonzero(np.isin(ub.seq_ids, seqs))
    n = len(mine)
    s_of_row = np.array([seq_index[int(x)] for x in ub.seq_ids[mine]], dtype=np.int64)
    order = np.argsort(s_of_row, kind="stable")
    starts = np.searchsorted(s_of_row[order], np.arange(n_seqs))
    t_of_row = np.empty(n, dtype=np.int64)
    t_of_row[order] = np.arange(n) - starts[s_of_row[order]]
    width = int(t_of_row.max()) + 1
    s_dev, t_dev = xp.asarray(s_of_row), xp.asarray(t_of_row)
    queries = xp.zeros((n_seqs, width, n_heads, q.shape[2]), dtype=q.dtype)  # [S, T, H, D]
    queries[s_dev, t_dev] = q[xp.asarray(mine)]
    query_pos = np.full((n_seqs, width), np.iinfo(np.int64).max // 2, dtype=np.int64)  # padding sees all
    query_pos[s_of_row, t_of_row] = ub.positions[mine]
    query_pos_dev = xp.asarray(query_pos)[:, :, None]  # [S, T, 1]
    qs = queries.reshape(n_seqs, width, n_kv, group, -1).transpose(0, 2, 3, 1, 4)  # -> [S, Hkv, G, T, D]
    keys = key_pos[:, None, :]  # [S, 1, L]
    hidden = (keys < 0) | (keys > query_pos_dev)  # [S, T, L]: padded keys, and keys past the query
    if window is not None:
        real = xp.asarray(query_pos != np.iinfo(np.int64).max // 2)[:, :, None]  # [S, T, 1]: not padding
        hidden |= (keys <= query_pos_dev - window) & real
    k_heads, v_heads = k.transpose(0, 2, 1, 3)[:, :, None], v.transpose(0, 2, 1, 3)[:, :, None]  # [S, Hkv, 1, L, D]
    o = weighted_values(qs, k_heads, v_heads, scale, softcap, hidden[:, None, None])  # -> [S, Hkv, G, T, Dv]
    o = o.transpose(0, 3, 1, 2, 4).reshape(n_seqs, width, n_heads, -1)  # -> [S, T, H, Dv]
    out = xp.empty((q.shape[0], n_heads, o.shape[-1]), dtype=q.dtype)
    out[xp.asarray(mine)] = o[s_dev, t_dev]  # [n, H, Dv] for the rows of `seqs`
    return out


def attend_each(
    q: Any,
    ub: MicroBatch,
    layer: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    seqs: tuple[int, ...],
    out: Any = None,
) -> Any:
    """One sequence at a time (no padding to pay for); fills `out` [n, H, Dv] for their rows.

    A sequence's query rows go in blocks of `QUERY_BLOCK`, each over just the keys some row of it
    sees: keys come sorted by position, so those are one range. A prompt chunk of T rows after C
    cached ones then computes about T * (C + T/2 + QUERY_BLOCK/2) scores rather than T * (C + T),
    the causal triangle instead of the square (256 rows from scratch: 62% of them)."""
    xp = xp_of(q)
    n, n_heads, head_dim = q.shape
    for seq in seqs:
        rows = np.flatnonzero(ub.seq_ids == seq)
        k, v, key_pos = ub.kv(layer, seq)  # [L, Hkv, D], [L, Hkv, Dv], [L]
        keys = key_pos if isinstance(key_pos, np.ndarray) else xp.asnumpy(key_pos)  # sorted
        n_kv = k.shape[1]
        group = n_heads // n_kv
        t = len(rows)
        # [T, H, D] -> [Hkv, T * G, D]: a key head's G query heads of a row side by side, so each key
        # head is one product of T * G rows (three large ones beat nine of T rows)
        qs = xp.ascontiguousarray(q[rows].reshape(t, n_kv, group, head_dim).transpose(1, 0, 2, 3))
        qs = qs.reshape(n_kv, t * group, head_dim)
        k_heads, v_heads = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [Hkv, L, D], [Hkv, L, Dv]
        o = xp.empty((n_kv, t * group, v.shape[-1]), dtype=q.dtype)
        for first in range(0, t, QUERY_BLOCK):
            last = min(first + QUERY_BLOCK, t)
            query_pos = ub.positions[rows[first:last]]  # host
            lo = 0 if window is None else int(np.searchsorted(keys, query_pos.min() - window, side="right"))
            hi = int(np.searchsorted(keys, query_pos.max(), side="right"))
            seen = keys[lo:hi]
            hidden = seen[None, :] > query_pos[:, None]  # [Tb, Lb]
            if window is not None:
                hidden |= seen[None, :] <= query_pos[:, None] - window
            mask = xp.asarray(np.repeat(hidden, group, axis=0)) if hidden.any() else None  # [Tb * G, Lb]
            o[:, first * group : last * group] = weighted_values(
                qs[:, first * group : last * group], k_heads[:, lo:hi], v_heads[:, lo:hi], scale, softcap, mask
            )  # [Hkv, Tb * G, Dv]
        o = o.reshape(n_kv, t, group, -1).transpose(1, 0, 2, 3).reshape(t, n_heads, -1)  # -> [T, H, Dv]
        if out is None:
            out = xp.empty((n, n_heads, o.shape[-1]), dtype=q.dtype)
        out[rows] = o
    return out
