"""Splitting a batch into micro-batches."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from statemesh.memory import Batch
from statemesh.memory.plan import split_equal, split_simple


@st.composite
def batches(draw: st.DrawFn) -> tuple[Batch, int]:
    """Up to 5 sequences of 0..9 tokens, interleaved at random, each in position order."""
    lengths = draw(st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(lambda xs: sum(xs) > 0))
    seq_ids = draw(st.permutations([s for s, n in enumerate(lengths) for _ in range(n)]))
    positions = [seq_ids[:i].count(s) for i, s in enumerate(seq_ids)]
    return Batch(positions, seq_ids), draw(st.integers(1, 12))


@given(batches())
def test_simple_split_covers_the_batch_in_order(case: tuple[Batch, int]) -> None:
    batch, n_ubatch = case
    ubs = split_simple(batch, n_ubatch)
    assert np.concatenate([ub.rows for ub in ubs]).tolist() == list(range(batch.n_tokens))
    assert all(len(ub) <= n_ubatch for ub in ubs)


@given(batches())
def test_equal_split_holds_equal_runs_of_each_sequence_in_order(case: tuple[Batch, int]) -> None:
    batch, n_ubatch = case
    ubs = split_equal(batch, n_ubatch)
    assert sorted(np.concatenate([ub.rows for ub in ubs]).tolist()) == list(range(batch.n_tokens))
    last = {}
    for ub in ubs:
        assert len(ub) <= n_ubatch and ub.n_seq_tokens is not None
        assert len(ub) == len(ub.seqs) * ub.n_seq_tokens
        grid = ub.seq_ids.reshape(len(ub.seqs), ub.n_seq_tokens)  # [S, T], sequence-major
        assert (grid == np.array(ub.seqs)[:, None]).all()
        for i, s in enumerate(ub.seqs):
            run = ub.positions.reshape(len(ub.seqs), -1)[i]
            assert run.tolist() == list(range(last.get(s, -1) + 1, last.get(s, -1) + 1 + len(run)))
            last[s] = int(run[-1])
