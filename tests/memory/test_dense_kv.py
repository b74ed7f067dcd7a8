"""`ub.kv_dense`: decoding sequences' rows kept dense between steps, never stale.

(`test_properties.py` also checks them after every random operation against the reference.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from statemesh.memory import Batch, Memory
from tests.memory.helpers import D, H, make, run_step, store_ubatch, token_rows


def dense_after_step(mem: Memory, positions: list[int], seq_ids: list[int], layer: int = 1) -> Any:
    """Run one step and return what kv_dense gave, with kv's rows for each sequence to compare."""
    got = {}
    with mem.batch(Batch(positions, seq_ids)) as plan:
        for ub in plan:
            store_ubatch(mem, ub, 0.0)
            got["dense"] = ub.kv_dense(layer)
            got["kv"] = {s: ub.kv(layer, s) for s in ub.seqs}
            got["seqs"] = ub.seqs
    return got["dense"], got["kv"], got["seqs"]


def assert_matches_kv(dense: Any, kv: dict[int, Any], seqs: tuple[int, ...]) -> None:
    for i, s in enumerate(seqs):
        r, (k, v, pos) = int(dense.rows[i]), kv[s]
        assert dense.lengths[r] == len(k) and dense.last_positions[i] == pos[-1]
        np.testing.assert_array_equal(dense.k[r, :, : len(k)], k.transpose(1, 0, 2))
        np.testing.assert_array_equal(dense.v[r, :, : len(v)], v.transpose(1, 0, 2))


def test_rows_follow_decoding_and_cover_a_range_of_sequence_ids() -> None:
    mem = make("kv", n_ctx=64, n_seq_max=6)
    run_step(mem, [0, 1, 2, 0, 0, 1], [1, 1, 1, 3, 4, 4])
    for p in range(3):
        dense, kv, seqs = dense_after_step(mem, [3 + p, 1 + p, 2 + p], [1, 3, 4])
        assert_matches_kv(dense, kv, seqs)
    # sequences 1, 3, 4 -> rows 0, 2, 3 of the range 1..4; row 1 (sequence 2) is not theirs
    assert dense.rows.tolist() == [0, 2, 3] and dense.lengths.tolist() == [6, 0, 4, 5]
    assert dense.k.shape == (4, H, 6, D)


@pytest.mark.parametrize(
    "change",
    [
        ("cut the tail, then reuse its cells", lambda m: m.seq_rm(1, 2)),
        ("shift positions (keys re-rotated)", lambda m: m.seq_add(1, 0, None, 5)),
        ("copy another sequence over it", lambda m: m.seq_cp(2, 1)),
        ("restore a snapshot", lambda m: m.state_read(m.state_write(2), seq=1)),
        ("clear", lambda m: (m.clear(), run_step(m, [0, 1], [1, 1]))),
    ],
    ids=lambda c: c[0],
)
def test_rows_are_rebuilt_after_any_change_other_than_an_append(change: Any) -> None:
    def k_shift(layer: int, k: Any, delta: Any) -> Any:
        return k + np.asarray(delta, dtype=np.float32)[:, None, None]

    mem = make("kv", n_ctx=64, n_seq_max=4, k_shift=k_shift)
    run_step(mem, [0, 1, 2, 3, 0, 1, 2], [1, 1, 1, 1, 2, 2, 2], salt=0.5)
    dense_after_step(mem, [4], [1])  # sequence 1's rows are now dense
    change[1](mem)
    nxt = mem.seq_pos_max(1) + 1
    dense, kv, seqs = dense_after_step(mem, [nxt], [1])
    assert_matches_kv(dense, kv, seqs)


def test_an_undone_batch_leaves_no_stale_rows() -> None:
    mem = make("kv", n_ctx=64, n_seq_max=2)
    run_step(mem, [0, 1], [0, 0])
    with pytest.raises(RuntimeError), mem.batch(Batch([2], [0])) as plan:
        for ub in plan:
            store_ubatch(mem, ub, 0.0)
            ub.kv_dense(1)  # copies the row of position 2, which the failure then undoes
            raise RuntimeError("the model failed")
    dense, kv, seqs = dense_after_step(mem, [2], [0])  # the same cell, different rows (no salt)
    assert_matches_kv(dense, kv, seqs)


def test_none_for_a_windowed_layer_or_beyond_the_budget() -> None:
    iswa = make("iswa", n_ctx=32, n_seq_max=2)
    run_step(iswa, [0, 1], [0, 0])
    with iswa.batch(Batch([2], [0])) as plan:
        for ub in plan:
            store_ubatch(iswa, ub, 0.0)
            assert ub.kv_dense(0) is None  # windowed
            assert ub.kv_dense(1) is not None  # full attention
    mem = make("kv", n_ctx=256, n_seq_max=2)
    mem._dense.budget = 128  # two sequence slots of up to 64 rows
    run_step(mem, [*range(60), 0], [0] * 60 + [1])
    dense_after_step(mem, [60, 1], [0, 1])  # two slots of up to 61 rows
    dense, _, _ = dense_after_step(mem, [61], [0])  # slot 1 stays: 2 * 62 rows still fit
    assert dense is not None and dense.rows.tolist() == [0]
    run_step(mem, list(range(62, 128)), [0] * 66)
    with mem.batch(Batch([128], [0])) as plan:
        for ub in plan:
            store_ubatch(mem, ub, 0.0)
            assert ub.kv_dense(1) is None  # 129 rows > 128, even in one slot
            k, _, _ = ub.kv(1, 0)
            np.testing.assert_array_equal(k[-1], token_rows(1, np.array([0]), np.array([128]), 0.0, (H, D))[0])


def test_slots_no_one_asked_for_give_their_room_back() -> None:
    """Regression (issue 4): 32 streams with a shared prompt prefix joined 17 and then 15 at once,
    the buffers grew to 34 slots, and from 363 rows on every step gathered instead (~2x slower)."""
    mem = make("kv", n_ctx=256, n_seq_max=2)
    mem._dense.budget = 128  # two slots of up to 64 rows, or one of 128
    run_step(mem, [*range(60), 0], [0] * 60 + [1])
    dense_after_step(mem, [60, 1], [0, 1])  # two slots of up to 64 rows
    dense_after_step(mem, [61], [0])  # slot 1 stays: 2 * 62 rows still fit
    assert mem._dense._k[1].shape[0] == 2
    run_step(mem, [62, 63], [0, 0])
    dense, kv, seqs = dense_after_step(mem, [64], [0])  # 2 * 65 > 128: slot 1 goes, sequence 0 alone fits
    assert dense is not None and mem._dense._k[1].shape[0] == 1
    assert_matches_kv(dense, kv, seqs)
    mem._dense.budget = 512  # sequence 1 again: its rows come back from the cells, not the dropped slot
    dense, kv, seqs = dense_after_step(mem, [65, 2], [0, 1])
    assert_matches_kv(dense, kv, seqs)


def test_sequences_joining_one_by_one_reallocate_the_buffers_a_few_times() -> None:
    mem = make("kv", n_ctx=2048, n_seq_max=32)
    length = [0] * 32
    for joining in range(32):
        run_step(mem, [0], [joining])  # its prompt, then every sequence so far decodes together
        length[joining] = 1
        seqs = list(range(joining + 1))
        dense, kv, got = dense_after_step(mem, [length[s] for s in seqs], seqs)
        assert_matches_kv(dense, kv, got)
        length[: joining + 1] = [n + 1 for n in length[: joining + 1]]
    # slots double (1, 2, 4, 8, 16, 32) rather than grow by one: each growth copies every held row
    assert mem._dense.reallocations <= 6
    assert mem._dense.allocations == len(mem.layers)  # all within the storage the cache took when made


def test_rows_take_the_budgets_last_room_at_once_rather_than_reallocate_for_it() -> None:
    mem = make("kv", n_ctx=32 * 96, n_seq_max=32)  # 96 rows a slot for 32 sequences
    run_step(mem, list(range(40)) * 32, [s for s in range(32) for _ in range(40)])
    dense_after_step(mem, [40] * 32, list(range(32)))  # 41 rows each: 64 wide, 96 fit, 128 never will
    assert mem._dense._k[1].shape[::2] == (32, 96)
    before = mem._dense.reallocations
    for n in range(41, 96):  # decoding on to the budget's width: no layer reallocates again
        dense, kv, seqs = dense_after_step(mem, [n] * 32, list(range(32)))
    assert mem._dense.reallocations == before
    assert_matches_kv(dense, kv, seqs)


def test_more_slots_in_a_full_budget_narrow_the_rows_and_drop_the_rows_cut_off() -> None:
    mem = make("kv", n_ctx=512, n_seq_max=4)
    mem._dense.budget = 256
    run_step(mem, list(range(100)), [0] * 100)
    run_step(mem, [0, 1, 2, 3, 0, 1, 2, 3], [1, 1, 1, 1, 2, 2, 2, 2])
    dense_after_step(mem, [100], [0])  # one slot of 128 rows holds sequence 0's 101
    dense, kv, seqs = dense_after_step(mem, [4, 4], [1, 2])  # three slots: 256 // 3 = 85 rows each
    assert_matches_kv(dense, kv, seqs)
    assert mem._dense._k[1].shape[2] == 85
    mem._dense.budget = 1024  # room again for sequence 0: its rows past 85 must come from the cells
    dense, kv, seqs = dense_after_step(mem, [101], [0])
    assert_matches_kv(dense, kv, seqs)


def test_a_host_cache_for_full_attention_takes_its_storage_when_made() -> None:
    """Fresh host memory page-faults on its first touch: 32 SmolLM2 sequences growing into 569 MB of
    dense rows stopped for ~0.8 s mid-decoding; the cache takes that storage when made instead."""
    mem = make("kv", n_ctx=512, n_seq_max=4)
    dense = mem._dense
    assert dense.allocations == len(mem.layers)
    row_bytes = sum(2 * int(np.prod(mem.spec.attention(i).k_shape)) * 4 for i in mem.layers)  # k and v
    assert mem.stats()["dense_bytes"] == dense.budget * row_bytes
    iswa = make("iswa", n_ctx=32, n_seq_max=2)
    assert iswa.windowed._dense.allocations == 0 and iswa.windowed._dense.nbytes == 0  # never dense
    assert iswa.full._dense.allocations == len(iswa.full.layers)


def test_rows_moved_within_the_storage_stay_the_sequences_own() -> None:
    """Growing rows (64 -> 128 wide) and slots (1 -> 2) within one storage moves each kept row to
    its new place, the old and new places overlapping; nothing is allocated."""
    mem = make("kv", n_ctx=512, n_seq_max=4)
    run_step(mem, list(range(60)), [0] * 60)
    dense_after_step(mem, [60], [0])  # one slot, 64 rows
    run_step(mem, list(range(61, 100)), [0] * 39)
    dense, kv, seqs = dense_after_step(mem, [100], [0])  # 101 rows: 128 wide
    assert_matches_kv(dense, kv, seqs)
    run_step(mem, list(range(30)), [1] * 30)
    dense, kv, seqs = dense_after_step(mem, [101, 30], [0, 1])  # a second slot
    assert_matches_kv(dense, kv, seqs)
    assert mem._dense.reallocations == 3 and mem._dense.allocations == len(mem.layers)  # layer 1: 3 layouts


def test_a_cleared_cache_keeps_its_storage_and_never_reads_the_rows_left_in_it() -> None:
    mem = make("kv", n_ctx=256, n_seq_max=2)
    run_step(mem, list(range(20)), [0] * 20)
    dense_after_step(mem, [20], [0])
    storage = mem._dense._k_storage[1]
    mem.clear()
    assert mem._dense._k_storage[1] is storage and mem.stats()["dense_bytes"] > 0
    run_step(mem, list(range(20)), [0] * 20, salt=5.0)  # other keys at the same positions
    with mem.batch(Batch([20], [0])) as plan:
        for ub in plan:
            store_ubatch(mem, ub, 5.0)
            dense, kv = ub.kv_dense(1), {0: ub.kv(1, 0)}
    assert_matches_kv(dense, kv, (0,))
