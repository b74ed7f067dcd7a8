"""HybridMemory: pure delegation to an attention part and a recurrent part."""

from __future__ import annotations

import pytest

from statemesh.memory import Batch, HybridMemory, MemoryFull, create_memory

from .helpers import hybrid_spec, observe, run_step


def hybrid(window: int | None = None, n_ctx: int = 16) -> HybridMemory:
    mem = create_memory(hybrid_spec(window), n_ctx=n_ctx, n_seq_max=3, backend="numpy")
    assert isinstance(mem, HybridMemory)
    return mem


def test_layers_route_to_their_part_and_a_stateless_layer_is_not_held() -> None:
    mem = hybrid()
    assert mem.layers == (0, 1, 2)
    run_step(mem, [0, 1, 2], [0, 0, 0])
    assert mem.kv(1, 0)[2].tolist() == [0, 1, 2]
    assert mem.state(0, 0)[0].sum() > 0
    with pytest.raises(ValueError, match="layer 0 is a recurrent layer"):
        mem.kv(0, 0)
    with pytest.raises(ValueError, match="layer 3 is not held"):
        mem.kv(3, 0)


def test_seq_rm_is_refused_when_the_recurrent_part_would_refuse_and_nothing_changes() -> None:
    mem = hybrid()
    run_step(mem, [0, 1, 2, 3], [0] * 4)
    before = observe(mem)
    assert mem.seq_rm(0, 2, None) is False
    assert observe(mem) == before
    assert mem.seq_rm(0) is True and mem.seq_ids() == []


def test_positions_combine_as_the_larger_minimum_and_the_smaller_maximum() -> None:
    mem = hybrid(window=2)
    run_step(mem, list(range(6)), [0] * 6)
    # attention (windowed) holds 5 only (next query at 6 sees > 4); recurrent is at 5
    assert (mem.seq_pos_min(0), mem.seq_pos_max(0)) == (5, 5)
    plain = hybrid()
    run_step(plain, list(range(6)), [0] * 6)
    assert (plain.seq_pos_min(0), plain.seq_pos_max(0)) == (5, 5)
    assert plain.attention.seq_pos_min(0) == 0


def test_memory_full_in_the_attention_part_leaves_the_recurrent_part_alone() -> None:
    mem = hybrid(n_ctx=4)
    run_step(mem, [0, 1, 2], [0, 0, 0])
    before = observe(mem)
    with pytest.raises(MemoryFull):
        mem.batch(Batch([0, 1], [1, 1]))
    with pytest.raises(MemoryFull):
        mem.seq_cp(0, 1) or mem.seq_add(1, None, None, 1)  # copies of 3 shared cells need 3 free
    mem.seq_rm(1)
    assert observe(mem) == before
    mem.check_integrity()


def test_fork_shares_cells_and_state_then_both_continue() -> None:
    mem = hybrid()
    run_step(mem, [0, 1], [0, 0])
    mem.seq_cp(0, 1)
    stats = mem.stats()
    assert stats["cells_used"] == 2 and stats["state_slots_used"] == 1
    run_step(mem, [2, 2], [0, 1])
    assert mem.kv(1, 0)[0][:2].tolist() == mem.kv(1, 1)[0][:2].tolist()  # the shared cells
    assert mem.stats()["state_slots_used"] == 2
    mem.check_integrity()
