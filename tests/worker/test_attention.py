"""Attention paths agree: dense decode rows (one thread or several) and the padded gather; prompt
chunks in query blocks against row-by-row attention."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from statemesh.memory import AttentionSpec, Batch, MemorySpec, create_memory
from statemesh.worker.kernels.attention import attend, attend_batched, attend_dense, attend_each
from statemesh.worker.kernels.threads import Threads
from statemesh.worker.runtime import missing_settings, worker_environment

HKV, G, D = 2, 3, 8


def decode_step_outputs(lengths: list[int], threads: Threads | None, softcap: float | None = None) -> list[np.ndarray]:
    """Prefill sequences of the given lengths (ids 0..), then one decode step; returns attention
    outputs of that step: dense rows (with `threads`), dense without threads, and padded."""
    rng = np.random.default_rng(7)
    spec = MemorySpec((AttentionSpec(HKV, D),))
    mem = create_memory(spec, n_ctx=sum(lengths) + len(lengths), n_seq_max=len(lengths), backend="numpy")
    seqs = [s for s, n in enumerate(lengths) for _ in range(n)]
    with mem.batch(Batch([p for n in lengths for p in range(n)], seqs)) as plan:
        for ub in plan:
            ub.store_kv(0, *rng.standard_normal((2, len(ub), HKV, D), dtype=np.float32))
    order = list(rng.permutation(len(lengths)))  # rows in another order than the sequence ids
    q = rng.standard_normal((len(order), HKV * G, D), dtype=np.float32)
    outputs = []
    with mem.batch(Batch([lengths[s] for s in order], order)) as plan:
        for ub in plan:
            ub.store_kv(0, *rng.standard_normal((2, len(ub), HKV, D), dtype=np.float32))
            outputs = [
                attend_dense(q, ub, 0, 0.3, softcap, ub.seqs, threads),
                attend_dense(q, ub, 0, 0.3, softcap, ub.seqs, None),
                attend_batched(q, ub, 0, 0.3, None, softcap, ub.seqs),
                attend(q, ub, 0, 0.3, softcap=softcap, threads=threads),
            ]
    return outputs


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_dense_rows_on_threads_match_one_thread_and_the_padded_gather(softcap: float | None) -> None:
    lengths = [5 + (7 * s) % 23 for s in range(19)]  # unequal: padding is masked
    threads = Threads(3)
    try:
        on_threads, one_thread, padded, routed = decode_step_outputs(lengths, threads, softcap)
    finally:
        threads.close()
    np.testing.assert_array_equal(on_threads, one_thread)  # the same arithmetic per row
    np.testing.assert_array_equal(routed, on_threads)
    np.testing.assert_allclose(on_threads, padded, rtol=1e-5, atol=1e-6)


def test_threads_run_parts_beside_the_caller_and_keep_their_order() -> None:
    threads = Threads(2)
    try:
        out = threads.map(lambda i: (i, threading.get_ident()), [(0,), (1,), (2,)])
    finally:
        threads.close()
    assert [i for i, _ in out] == [0, 1, 2]
    assert out[0][1] == threading.get_ident() and out[1][1] != threading.get_ident()
    assert Threads(1).map(lambda i: i * 2, [(1,), (2,)]) == [2, 4]


def test_threads_cut_a_range_into_near_equal_non_empty_spans() -> None:
    threads = Threads(2)
    try:
        assert threads.spans(7) == [slice(0, 3), slice(3, 7)]
        assert threads.spans(1) == [slice(0, 1)]  # never an empty part
        assert threads.spans(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    finally:
        threads.close()


def test_worker_settings_are_named_when_missing() -> None:
    assert missing_settings({}) == list(worker_environment())
    assert missing_settings(worker_environment()) == []
    assert worker_environment()["OPENBLAS_THREAD_TIMEOUT"] == "20"


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
                        scale: float, window: int | None, softcap: float | None) -> np.ndarray:  # fmt: skip
    """q [T, H, D] over k [L, Hkv, D], v [L, Hkv, Dv] in float64, one query row at a time."""
    group = q.shape[1] // k.shape[1]
    out = np.zeros((len(q), q.shape[1], v.shape[2]))
    for t, p in enumerate(q_pos):
        seen = (k_pos <= p) & ((k_pos > p - window) if window is not None else True)
        for h in range(q.shape[1]):
            scores = k[seen, h // group].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            if softcap is not None:
                scores = softcap * np.tanh(scores / softcap)
            weights = np.exp(scores - scores.max())
            out[t, h] = weights / weights.sum() @ v[seen, h // group]
    return out


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (None, 5.0), (40, None), (200, 5.0)])
def test_prompt_chunks_in_query_blocks_match_row_by_row_attention(window: int | None, softcap: float | None) -> None:
    """A chunk of 150 rows after 70 cached ones (blocks of 64 rows, each over its own range of keys),
    beside another sequence's chunk in the same micro-batch, rows interleaved."""
    rng = np.random.default_rng(3)
    spec = MemorySpec((AttentionSpec(HKV, D),))
    mem = create_memory(spec, n_ctx=512, n_seq_max=2, backend="numpy")
    with mem.batch(Batch(list(range(70)), [0] * 70)) as plan:
        for ub in plan:
            ub.store_kv(0, *rng.standard_normal((2, len(ub), HKV, D), dtype=np.float32))
    positions = [p for i in range(150) for p in ((70 + i, i) if i < 40 else (70 + i,))]
    seq_ids = [s for i in range(150) for s in ((0, 1) if i < 40 else (0,))]
    q = rng.standard_normal((len(positions), HKV * G, D), dtype=np.float32)
    with mem.batch(Batch(positions, seq_ids)) as plan:
        for ub in plan:
            ub.store_kv(0, *rng.standard_normal((2, len(ub), HKV, D), dtype=np.float32))
            got = attend_each(q, ub, 0, 0.3, window, softcap, ub.seqs)
            for seq in (0, 1):
                rows = np.flatnonzero(ub.seq_ids == seq)
                k, v, k_pos = ub.kv(0, seq)
                want = reference_attention(q[rows], k, v, ub.positions[rows], k_pos, 0.3, window, softcap)
                np.testing.assert_allclose(got[rows], want, rtol=1e-4, atol=1e-5)
