"""ISWACache: a full cache plus a windowed cache that lets go of what fell out of every window."""

from __future__ import annotations

import numpy as np
import pytest

from statemesh.memory import Batch, ISWACache, create_memory

from .helpers import D, H, iswa_spec, observe, run_step, token_rows

WINDOW = 3


def iswa(n_ctx: int = 32, n_seq_max: int = 2, n_ubatch: int = 4) -> ISWACache:
    mem = create_memory(iswa_spec(WINDOW), n_ctx=n_ctx, n_seq_max=n_seq_max, n_ubatch=n_ubatch, backend="numpy")
    assert isinstance(mem, ISWACache)
    return mem


def test_windowed_cache_is_sized_from_windows_sequences_and_ubatch() -> None:
    mem = iswa(n_ctx=100, n_seq_max=2, n_ubatch=4)
    assert mem.full is not None and mem.full.n_cells == 100
    assert mem.windowed.n_cells == 2 * WINDOW + 4
    assert iswa(n_ctx=8, n_seq_max=4, n_ubatch=8).windowed.n_cells == 8  # never more than n_ctx


def test_full_layers_keep_everything_and_windowed_layers_keep_the_window() -> None:
    mem = iswa()
    run_step(mem, list(range(10)), [0] * 10, n_ubatch=4)
    assert mem.kv(1, 0)[2].tolist() == list(range(10))  # layer 1 is full attention
    # the next query is at 10 and sees keys > 10 - 3: positions 8 and 9
    assert mem.kv(0, 0)[2].tolist() == [8, 9] and mem.kv(2, 0)[2].tolist() == [8, 9]
    assert (mem.seq_pos_min(0), mem.seq_pos_max(0)) == (8, 9)
    mem.check_integrity()


def test_every_query_in_a_micro_batch_sees_its_whole_window() -> None:
    mem = iswa(n_ubatch=4)
    with mem.batch(Batch(list(range(10)), [0] * 10), n_ubatch=4) as plan:
        for ub in plan:
            for layer in mem.layers:
                k = token_rows(layer, ub.seq_ids, ub.positions, 0.0, (H, D))
                ub.store_kv(layer, k, k)
            held = set(ub.kv(0, 0)[2].tolist())
            for p in ub.positions:  # a query at p sees keys at p-2 .. p
                assert {q for q in range(p - WINDOW + 1, p + 1) if q >= 0} <= held


def test_cells_out_of_every_owners_window_are_reused() -> None:
    mem = iswa(n_ctx=64, n_seq_max=2, n_ubatch=4)
    for start in range(0, 48, 4):  # 48 tokens through a windowed cache of 10 cells
        run_step(mem, list(range(start, start + 4)), [0] * 4, n_ubatch=4)
    assert mem.windowed.stats()["cells_used"] == WINDOW - 1
    mem.check_integrity()


def test_a_shared_windowed_cell_stays_while_one_owner_still_sees_it() -> None:
    mem = iswa()
    run_step(mem, list(range(4)), [0] * 4)
    mem.seq_cp(0, 1)
    run_step(mem, [4, 5, 6, 7], [0] * 4)  # seq 0 moves on; seq 1 still needs 2 and 3
    assert mem.kv(0, 1)[2].tolist() == [2, 3] and mem.kv(0, 0)[2].tolist() == [6, 7]
    mem.check_integrity()


def test_after_cutting_the_tail_the_window_may_be_short_and_pos_min_says_so() -> None:
    mem = iswa()
    run_step(mem, list(range(10)), [0] * 10)
    assert mem.seq_rm(0, 8, None)
    # the full layers hold 0..7, the windowed ones nothing: recompute from 8 - window
    assert (mem.seq_pos_min(0), mem.seq_pos_max(0)) == (8, 7)
    mem.check_integrity()


def test_iswa_cannot_shift_but_a_failed_batch_still_restores_reused_cells() -> None:
    mem = iswa(n_ctx=32, n_seq_max=1, n_ubatch=2)  # windowed cache: 1 * 3 + 2 = 5 cells
    run_step(mem, list(range(6)), [0] * 6, n_ubatch=2)
    before = observe(mem)
    with pytest.raises(ValueError, match="boom"), mem.batch(Batch(list(range(6, 12)), [0] * 6), n_ubatch=2) as plan:
        for ub in plan:
            for layer in mem.layers:
                ub.store_kv(layer, *(2 * [np.full((len(ub), H, D), 9, np.float32)]))
        raise ValueError("boom")
    assert observe(mem) == before
    assert not mem.can_shift
    mem.check_integrity()
