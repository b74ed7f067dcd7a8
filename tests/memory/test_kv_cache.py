"""KVCache: cells, sharing, the per-sequence index, shifts with copy-on-write, the batch plan."""

from __future__ import annotations

import numpy as np
import pytest

from statemesh.memory import Batch, KVCache, MemoryFull, create_memory

from .helpers import D, H, attention_spec, observe, run_step, token_rows


def kv(n_ctx: int = 16, n_seq_max: int = 4, k_shift=None) -> KVCache:  # type: ignore[no-untyped-def]
    mem = create_memory(attention_spec(), n_ctx=n_ctx, n_seq_max=n_seq_max, backend="numpy", k_shift=k_shift)
    assert isinstance(mem, KVCache)
    return mem


def positions(mem: KVCache, seq: int, layer: int = 0) -> list[int]:
    return mem.kv(layer, seq)[2].tolist()


def test_store_and_gather_reads_back_each_sequence_in_position_order() -> None:
    mem = kv()
    run_step(mem, [0, 0, 1, 1, 2], [0, 1, 0, 1, 0])  # interleaved sequences
    for seq, expected in ((0, [0, 1, 2]), (1, [0, 1])):
        for layer in (0, 1):
            k, v, pos = mem.kv(layer, seq)
            want = token_rows(layer, np.full(len(expected), seq), np.array(expected), 0.0, (H, D))
            assert pos.tolist() == expected
            np.testing.assert_array_equal(k, want)
            np.testing.assert_array_equal(v, -want)
    mem.check_integrity()


def test_kv_inside_a_micro_batch_sees_earlier_and_current_tokens_only() -> None:
    mem = kv()
    seen = []
    with mem.batch(Batch([0, 1, 2, 3, 4], [0] * 5), n_ubatch=2) as plan:
        for ub in plan:
            for layer in (0, 1):
                k = token_rows(layer, ub.seq_ids, ub.positions, 0.0, (H, D))
                ub.store_kv(layer, k, k)
            seen.append(ub.kv(0, 0)[2].tolist())
    assert seen == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    ("op", "expected_0", "expected_1"),
    [
        (lambda m: m.seq_rm(0, 2, 4), [0, 1, 4, 5], [0, 1, 2]),
        (lambda m: m.seq_rm(0, None, 3), [3, 4, 5], [0, 1, 2]),
        (lambda m: m.seq_rm(0, 3, None), [0, 1, 2], [0, 1, 2]),
        (lambda m: m.seq_rm(None, 1, 2), [0, 2, 3, 4, 5], [0, 2]),
        (lambda m: m.seq_rm(0), [], [0, 1, 2]),
        (lambda m: m.seq_keep(1), [], [0, 1, 2]),
        (lambda m: m.seq_cp(1, 0, 0, 2), [0, 1, 2, 3, 4, 5], [0, 1, 2]),
        (lambda m: m.seq_add(0, 4, None, -2), [0, 1, 2, 2, 3, 3], [0, 1, 2]),
        (lambda m: m.seq_add(0, None, None, -2), [0, 1, 2, 3], [0, 1, 2]),
        (lambda m: m.seq_div(0, 2, None, 2), [0, 1, 1, 1, 2, 2], [0, 1, 2]),
    ],
)
def test_sequence_operations(op, expected_0, expected_1) -> None:  # type: ignore[no-untyped-def]
    mem = kv()
    run_step(mem, list(range(6)) + list(range(3)), [0] * 6 + [1] * 3)
    op(mem)
    assert positions(mem, 0) == expected_0
    assert positions(mem, 1) == expected_1
    mem.check_integrity()


def test_seq_cp_shares_cells_and_costs_no_new_cells() -> None:
    mem = kv()
    run_step(mem, list(range(8)), [0] * 8)
    mem.seq_cp(0, 1)
    mem.seq_cp(0, 2, 0, 4)
    assert mem.stats()["cells_used"] == 8
    assert positions(mem, 1) == list(range(8)) and positions(mem, 2) == [0, 1, 2, 3]
    np.testing.assert_array_equal(mem.kv(1, 1)[0], mem.kv(1, 0)[0])
    # the fork continues on its own cells; the source is untouched
    run_step(mem, [4, 5], [2, 2], salt=0.5)
    assert mem.stats()["cells_used"] == 10
    np.testing.assert_array_equal(mem.kv(0, 2)[0][:4], mem.kv(0, 0)[0][:4])
    assert not np.array_equal(mem.kv(0, 2)[0][4:], mem.kv(0, 0)[0][4:6])
    mem.check_integrity()


def test_seq_rm_of_a_shared_cell_keeps_it_for_the_other_owner() -> None:
    mem = kv()
    run_step(mem, [0, 1, 2], [0, 0, 0])
    mem.seq_cp(0, 1)
    mem.seq_rm(0)
    assert mem.stats()["cells_used"] == 3 and positions(mem, 1) == [0, 1, 2]
    mem.seq_rm(1)
    assert mem.stats()["cells_used"] == 0
    mem.check_integrity()


def test_seq_add_copies_shared_cells_and_re_rotates_keys_of_the_moved_ones_only() -> None:
    shifts = []

    def k_shift(layer, k, delta):  # type: ignore[no-untyped-def]
        shifts.append((layer, delta.tolist()))
        return k + delta[:, None, None].astype(np.float32)

    mem = kv(k_shift=k_shift)
    run_step(mem, [0, 1, 2, 3], [0] * 4)
    mem.seq_cp(0, 1)
    before = mem.kv(0, 0)[0].copy()
    mem.seq_add(1, 2, None, 3)
    assert positions(mem, 0) == [0, 1, 2, 3] and positions(mem, 1) == [0, 1, 5, 6]
    np.testing.assert_array_equal(mem.kv(0, 0)[0], before)  # the other owner is untouched
    np.testing.assert_array_equal(mem.kv(0, 1)[0][2:], before[2:] + 3)
    assert mem.stats()["cells_used"] == 6  # two copies made
    assert shifts == [(0, [3, 3]), (1, [3, 3])]
    mem.check_integrity()


def test_seq_add_without_room_for_copies_is_memory_full_and_changes_nothing() -> None:
    mem = kv(n_ctx=6)
    run_step(mem, [0, 1, 2, 3], [0] * 4)
    mem.seq_cp(0, 1)
    before = observe(mem)
    with pytest.raises(MemoryFull, match="needs 4 free cells"):
        mem.seq_add(1, None, None, 1)
    assert observe(mem) == before
    mem.check_integrity()


def test_a_batch_that_cannot_fit_is_memory_full_before_anything_changes() -> None:
    mem = kv(n_ctx=8)
    run_step(mem, list(range(6)), [0] * 6)
    before = observe(mem)
    with pytest.raises(MemoryFull, match="needs 3 free cells but has 2"):
        mem.batch(Batch([0, 1, 2], [1, 1, 1]))
    assert observe(mem) == before


def test_an_exception_after_the_last_micro_batch_undoes_the_whole_batch() -> None:
    mem = kv()
    run_step(mem, [0, 1], [0, 0])
    before = observe(mem)
    with (
        pytest.raises(RuntimeError, match="model failed"),
        mem.batch(Batch([2, 3, 4, 0], [0, 0, 0, 1]), n_ubatch=2) as plan,
    ):
        for ub in plan:
            for layer in (0, 1):
                k = np.full((len(ub), H, D), 7, np.float32)
                ub.store_kv(layer, k, k)
        raise RuntimeError("model failed")
    assert observe(mem) == before
    mem.check_integrity()


def test_gather_cost_follows_the_sequence_not_the_cache() -> None:
    """kv(layer, seq) gathers exactly the sequence's cells through its index: with 15 long
    sequences beside it, a short sequence's read returns its own rows only."""
    mem = kv(n_ctx=16 * 64, n_seq_max=16)
    run_step(mem, [p for _ in range(15) for p in range(64)], [s for s in range(15) for _ in range(64)])
    run_step(mem, [0, 1], [15, 15])
    k, _, pos = mem.kv(0, 15)
    assert k.shape == (2, H, D) and pos.tolist() == [0, 1]
    assert mem._seq[15].n == 2  # the index holds that sequence's cells, nothing to scan


def test_kv_batch_pads_each_sequence_and_zeroes_the_padding() -> None:
    mem = kv()
    run_step(mem, [0, 1, 2, 0], [0, 0, 0, 1])
    with mem.batch(Batch([3, 1], [0, 1])) as plan:
        for ub in plan:
            for layer in (0, 1):
                ub.store_kv(layer, *(2 * [token_rows(layer, ub.seq_ids, ub.positions, 0.0, (H, D))]))
            k, v, pos, lengths = ub.kv_batch(1)
            assert ub.seqs == (0, 1)
            assert lengths.tolist() == [4, 2] and pos.tolist() == [[0, 1, 2, 3], [0, 1, -1, -1]]
            assert k.shape == (2, 4, H, D) and not k[1, 2:].any() and not v[1, 2:].any()
            np.testing.assert_array_equal(k[0], ub.kv(1, 0)[0])
            np.testing.assert_array_equal(k[1, :2], ub.kv(1, 1)[0])


def test_stats_count_cells_sequences_and_bytes() -> None:
    mem = kv(n_ctx=16, n_seq_max=4)
    run_step(mem, [0, 1, 0], [0, 0, 3])
    stats = mem.stats()
    assert (stats["cells_total"], stats["cells_used"], stats["seqs"]) == (16, 3, 2)
    assert stats["bytes"] == 16 * mem.spec.bytes_per_token
    assert stats["device"] == "numpy" and mem.seq_ids() == [0, 3]
    assert mem.can_shift


def test_sequences_decoding_in_turns_keep_their_cells_together() -> None:
    """Placement follows a block table's locality without reserving anything: two sequences
    decoding in turns each fill their own block of cells."""
    from statemesh.memory.kv_cache import BLOCK

    mem = kv(n_ctx=4 * BLOCK, n_seq_max=2)
    for p in range(BLOCK + 2):
        run_step(mem, [p, p], [0, 1])
    assert mem._cells(0).tolist() == [*range(BLOCK), 2 * BLOCK, 2 * BLOCK + 1]
    assert mem._cells(1).tolist() == [*range(BLOCK, 2 * BLOCK), 3 * BLOCK, 3 * BLOCK + 1]
    # when no whole block is free, any free cell is used: no room is lost to placement
    run_step(mem, list(range(BLOCK + 2, 2 * BLOCK + 2)), [0] * BLOCK)
    run_step(mem, list(range(BLOCK + 2, 2 * BLOCK - 2)), [1] * (BLOCK - 4))
    assert mem.stats()["cells_used"] == mem.n_cells
    mem.check_integrity()


def test_a_run_that_continues_a_sequence_into_a_free_block_does_not_get_that_block_again() -> None:
    """Issue 13: a micro-batch that continued a sequence right after its last cell into a wholly
    free 16-cell block, and needed more, was given that same block again: two rows in one cell,
    and the cell counter drifted from the cells (KV cache: 136 occupied cells, counter says 149)."""
    mem = kv(n_ctx=64, n_seq_max=2)
    run_step(mem, list(range(16)), [0] * 16)  # seq 0: cells 0..15
    run_step(mem, list(range(32)), [1] * 32)  # seq 1: cells 16..47
    assert mem.seq_rm(1, 0, 16)  # cells 16..31 free again: a free block right after seq 0's last cell
    run_step(mem, list(range(16, 36)), [0] * 20)  # continues into 16..31, then needs 4 more
    mem.check_integrity()
    for layer in (0, 1):
        k, v, pos = mem.kv(layer, 0)
        assert pos.tolist() == list(range(36))
        want = token_rows(layer, np.zeros(36), np.arange(36), 0.0, (H, D))
        np.testing.assert_array_equal(k, want)
        np.testing.assert_array_equal(v, -want)
    assert mem.stats()["cells_used"] == 36 + 16
