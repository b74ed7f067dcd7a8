"""RecurrentMemory: one state per sequence, copy-on-write forks, the all-or-nothing seq_rm rule."""

from __future__ import annotations

import numpy as np
import pytest

from statemesh.memory import Batch, RecurrentMemory, create_memory

from .helpers import CONV, SSM, fold, observe, recurrent_spec, run_step


def rec(n_seq_max: int = 4) -> RecurrentMemory:
    mem = create_memory(recurrent_spec(), n_ctx=1, n_seq_max=n_seq_max, backend="numpy")
    assert isinstance(mem, RecurrentMemory)
    return mem


def expected_state(positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
    conv, ssm = np.zeros((1, *CONV), np.float32), np.zeros((1, *SSM), np.float32)
    conv, ssm = fold(conv, ssm, np.zeros(len(positions), np.int64), np.array(positions), (0,))
    return conv[0], ssm[0]


def test_state_folds_tokens_in_order_and_positions_are_the_last_one() -> None:
    mem = rec()
    run_step(mem, [0, 1, 2, 0, 1], [0, 0, 0, 1, 1], n_ubatch=4)
    for seq, pos in ((0, [0, 1, 2]), (1, [0, 1])):
        conv, ssm = mem.state(0, seq)
        want_conv, want_ssm = expected_state(pos)
        np.testing.assert_array_equal(conv, want_conv)
        np.testing.assert_array_equal(ssm, want_ssm)
        assert mem.seq_pos_min(seq) == mem.seq_pos_max(seq) == pos[-1]
    mem.check_integrity()


def test_micro_batches_hold_equal_runs_of_whole_sequences() -> None:
    mem = rec()
    shapes = []
    with mem.batch(Batch([0, 1, 2, 3, 4, 0, 1], [0, 0, 0, 0, 0, 1, 1]), n_ubatch=8) as plan:
        for ub in plan:
            shapes.append((ub.seqs, ub.n_seq_tokens, ub.positions.tolist()))
            for layer in mem.layers:
                ub.store_state(layer, *ub.state(layer))
    assert shapes == [((0, 1), 2, [0, 1, 0, 1]), ((0,), 3, [2, 3, 4])]


@pytest.mark.parametrize(
    ("p0", "p1", "result", "kept"),
    [
        (None, None, True, False),
        (0, None, True, False),
        (-5, 100, True, False),
        (6, None, True, True),  # past the last position (5): nothing to drop
        (5, None, False, True),  # p0 == L: a part of the state; refused
        (2, None, False, True),
        (0, 3, False, True),
        (None, 5, False, True),  # p1 == L leaves the last token: refused
    ],
)
def test_seq_rm_drops_everything_or_nothing(p0, p1, result, kept) -> None:  # type: ignore[no-untyped-def]
    mem = rec()
    run_step(mem, list(range(6)), [0] * 6)
    before = observe(mem)
    assert mem.seq_rm(0, p0, p1) is result
    assert (mem.seq_pos_max(0) == 5) is kept
    if not result:
        assert observe(mem) == before
    mem.check_integrity()


def test_seq_rm_of_every_sequence_is_all_or_nothing() -> None:
    mem = rec()
    run_step(mem, [0, 1, 2, 0], [0, 0, 0, 1])
    before = observe(mem)
    assert mem.seq_rm(None, 1, None) is False  # seq 0 would lose part of its state
    assert observe(mem) == before
    assert mem.seq_rm(None, 3, None) is True and mem.seq_ids() == [0, 1]


def test_fork_shares_the_slot_until_one_side_writes() -> None:
    mem = rec()
    run_step(mem, [0, 1, 2], [0, 0, 0])
    mem.seq_cp(0, 1)
    assert mem.stats()["cells_used"] == 1  # shared slot
    run_step(mem, [3], [1])
    assert mem.stats()["cells_used"] == 2
    np.testing.assert_array_equal(mem.state(0, 0)[0], expected_state([0, 1, 2])[0])
    np.testing.assert_array_equal(mem.state(0, 1)[0], expected_state([0, 1, 2, 3])[0])
    mem.check_integrity()


def test_a_failed_batch_restores_states_it_overwrote() -> None:
    mem = rec()
    run_step(mem, [0, 1, 0], [0, 0, 1])
    mem.seq_cp(1, 2)
    before = observe(mem)
    with pytest.raises(KeyError), mem.batch(Batch([2, 1, 1, 0], [0, 1, 2, 3])) as plan:
        for ub in plan:
            for layer in mem.layers:
                conv, ssm = ub.state(layer)
                ub.store_state(layer, conv + 5, ssm + 5)
        raise KeyError("late failure")
    assert observe(mem) == before
    mem.check_integrity()


def test_positions_move_and_a_state_moved_below_zero_is_dropped() -> None:
    mem = rec()
    run_step(mem, [0, 1, 2, 0], [0, 0, 0, 1])
    mem.seq_add(0, None, None, 10)
    assert mem.seq_pos_max(0) == 12 and mem.seq_pos_max(1) == 0
    mem.seq_div(0, 10, None, 4)
    assert mem.seq_pos_max(0) == 3
    mem.seq_add(1, 0, 1, -1)
    assert mem.seq_ids() == [0] and mem.can_shift
    mem.check_integrity()


def test_seq_keep_and_clear() -> None:
    mem = rec()
    run_step(mem, [0, 0, 0], [0, 1, 2])
    mem.seq_cp(1, 3)
    mem.seq_keep(3)
    assert mem.seq_ids() == [3] and mem.stats()["cells_used"] == 1
    mem.clear()
    assert mem.seq_ids() == [] and mem.stats()["cells_used"] == 0
    mem.check_integrity()
