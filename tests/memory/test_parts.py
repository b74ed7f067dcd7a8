"""`ub.parts`: a micro-batch cut into parts of whole sequences that run side by side on threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from statemesh.memory import Batch, BatchStateError, Memory
from tests.memory.helpers import KINDS, make, observe, run_step, store_kv_rows, store_ubatch

LAYERS = (0, 1)


def history(mem: Memory, lengths: list[int]) -> None:
    """Sequence s holds positions 0 .. lengths[s]-1."""
    seq_ids = [s for s, n in enumerate(lengths) for _ in range(n)]
    run_step(mem, [p for n in lengths for p in range(n)], seq_ids)


def step_of(lengths: list[int], rows: list[int]) -> Batch:
    """rows[s] new rows for each sequence s, continuing `lengths`."""
    seq_ids = [s for s, n in enumerate(rows) for _ in range(n)]
    return Batch([lengths[s] + i for s, n in enumerate(rows) for i in range(n)], seq_ids)


def run_part(part: Any, mem: Memory) -> dict[int, Any]:
    """What a model's part does: store every layer, read its decoding sequences' dense rows and
    every sequence's keys. Returns per layer (dense rows, {seq: kv})."""
    got = {}
    for layer in LAYERS:
        store_kv_rows(mem, part, layer)
        one_row = tuple(s for s in part.seqs if np.count_nonzero(part.seq_ids == s) == 1)
        dense = part.kv_dense(layer, one_row) if one_row else None
        got[layer] = (dense, {s: part.kv(layer, s) for s in part.seqs})
    return got


def test_parts_are_whole_sequences_of_consecutive_ids_with_near_equal_rows() -> None:
    lengths = [3, 5, 2, 4, 1, 6]
    mem = make("kv", n_ctx=128, n_seq_max=8)
    history(mem, lengths)
    with mem.batch(step_of(lengths, [1, 1, 1, 1, 6, 2])) as plan:
        for ub in plan:
            parts = ub.parts(2)
            # rows 1,1,1,1 | 6,2: cutting after four sequences (4 rows) is nearer half of 12 than after five (10)
            assert [p.seqs for p in parts] == [(0, 1, 2, 3), (4, 5)]
            assert sorted(np.concatenate([p.index for p in parts]).tolist()) == list(range(len(ub)))
            for p in parts:
                assert p.rows.tolist() == ub.rows[p.index].tolist()
                assert p.seq_ids.tolist() == ub.seq_ids[p.index].tolist()
                assert p.positions.tolist() == ub.positions[p.index].tolist()
                assert len(p) == len(p.index)
            for p in parts:
                store_ubatch(mem, p, 0.0)


def test_parts_on_two_threads_leave_memory_as_the_whole_micro_batch_does() -> None:
    """Eight decoding sequences and a prompt chunk: the parts run at once on two threads; each
    sees its own sequences' keys, dense rows included, and the memory ends byte for byte as it does
    when the micro-batch runs whole."""
    lengths = [3, 70, 2, 4, 1, 6, 5, 2, 9]
    step = step_of(lengths, [1] * 8 + [7])  # sequences 0..7 decode, 8 takes a chunk
    whole, cut = make("kv", n_ctx=1024, n_seq_max=9), make("kv", n_ctx=1024, n_seq_max=9)
    for mem in (whole, cut):
        history(mem, lengths)
    with whole.batch(step) as plan:
        for ub in plan:
            expected = run_part(ub, whole)
    with cut.batch(step) as plan, ThreadPoolExecutor(2) as pool:
        for ub in plan:
            parts = ub.parts(2)
            assert [p.seqs for p in parts] == [(0, 1, 2, 3, 4, 5, 6, 7), (8,)]  # 8 rows | 7 rows
            laid_out = cut._dense.reallocations  # the parts' dense rows are laid out before they run
            results = list(pool.map(run_part, parts, [cut, cut]))
            assert cut._dense.reallocations == laid_out > 0  # and no part moved them
    assert observe(cut) == observe(whole)
    for part, got in zip(parts, results, strict=True):
        for layer in LAYERS:
            dense, kv = got[layer]
            want_dense, want_kv = expected[layer]
            for s in part.seqs:
                for a, b in zip(kv[s], want_kv[s], strict=True):
                    np.testing.assert_array_equal(a, b)
            decoding = [s for s in part.seqs if s < 8]
            assert (dense is None) == (not decoding)
            for i, s in enumerate(decoding):  # whole: sequence s is the s-th that asked
                r, w, n = int(dense.rows[i]), int(want_dense.rows[s]), len(kv[s][0])
                assert int(dense.lengths[r]) == int(want_dense.lengths[w]) == n
                np.testing.assert_array_equal(dense.k[r, :, :n], want_dense.k[w, :, :n])
                np.testing.assert_array_equal(dense.v[r, :, :n], kv[s][1].transpose(1, 0, 2))


def test_a_part_never_grows_the_dense_rows_it_reads_but_gathers_instead() -> None:
    """When the budget cannot lay out every part's rows, a part's `kv_dense` says None (the caller
    gathers) rather than moving rows that the other part may be reading."""
    mem = make("kv", n_ctx=256, n_seq_max=8)
    history(mem, [4] * 8)
    mem._dense.budget = 4 * 5  # slots 0..3 of 5 rows fit, not all 8 sequences
    reallocations = mem._dense.reallocations
    with mem.batch(step_of([4] * 8, [1] * 8)) as plan:
        for ub in plan:
            low, high = ub.parts(2)
            for part in (low, high):
                for layer in LAYERS:
                    store_kv_rows(mem, part, layer)
                    assert part.kv_dense(layer) is None
    assert mem._dense.reallocations == reallocations


def test_a_part_that_skips_a_layer_undoes_the_batch() -> None:
    mem = make("kv", n_ctx=64, n_seq_max=4)
    history(mem, [2, 3, 1, 2])
    before = observe(mem)
    skipped = "part 1 of micro-batch 0 ended without storing layers \\[1\\]"
    with pytest.raises(BatchStateError, match=skipped), mem.batch(step_of([2, 3, 1, 2], [1, 1, 1, 1])) as plan:
        for ub in plan:
            first, second = ub.parts(2)
            store_ubatch(mem, first, 0.0)
            store_kv_rows(mem, second, 0)
    assert observe(mem) == before


def test_parts_are_cut_once_from_a_current_micro_batch_and_live_while_it_does() -> None:
    mem = make("kv", n_ctx=64, n_seq_max=4)
    history(mem, [2, 3, 1, 2])
    with mem.batch(step_of([2, 3, 1, 2], [1, 1, 1, 1])) as plan:
        for ub in plan:
            parts = ub.parts(2)
            with pytest.raises(BatchStateError, match="cut into parts once"):
                ub.parts(2)
            with pytest.raises(BatchStateError, match="cut into parts once"):
                parts[0].parts(2)
            for p in parts:
                store_ubatch(mem, p, 0.0)
    with pytest.raises(BatchStateError, match="no longer current"):
        parts[0].kv(0, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_micro_batch_of_one_sequence_or_of_a_memory_that_cannot_cut_runs_whole(kind: str) -> None:
    """Only the plain KV cache cuts (its parts touch disjoint cells); the others give [ub], as does
    a micro-batch of one sequence, or n = 1."""
    mem = make(kind, n_ctx=64, n_seq_max=4)
    history(mem, [2, 3, 1, 2])
    with mem.batch(step_of([2, 3, 1, 2], [1, 1, 1, 1])) as plan:
        for ub in plan:
            assert ub.parts(1) == [ub]
            parts = ub.parts(2)
            assert len(parts) == (2 if kind == "kv" else 1)
            if len(parts) == 1:
                assert parts == [ub]
            for p in parts:
                store_ubatch(mem, p, 0.0)
    with mem.batch(step_of([3, 4, 1, 2], [3, 0, 0, 0])) as plan:
        for ub in plan:
            assert ub.parts(2) == [ub]
            store_ubatch(mem, ub, 0.0)
