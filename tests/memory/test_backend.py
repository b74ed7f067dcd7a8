"""The array backend's gathers: block copies of cell runs give exactly what a per-row gather gives."""

from __future__ import annotations

import numpy as np
import pytest

from statemesh.memory import get_backend
from statemesh.memory.backend import _runs


@pytest.mark.parametrize(
    "cells",
    [
        np.arange(40),  # one run
        np.r_[np.arange(5, 37), np.arange(100, 132), np.arange(0, 20)],  # a few long runs
        np.r_[np.arange(50, 90), [3], np.arange(7, 30)],  # a run, a lone cell, a run
        np.random.default_rng(0).permutation(200)[:64],  # no runs: per-row gather
        np.array([4, 5]),  # too short for runs
    ],
)
def test_take_rows_equals_a_per_row_gather(cells: np.ndarray) -> None:
    backend = get_backend("numpy")
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal((200, 2, 3)).astype(np.float32), rng.standard_normal((200, 2, 5)).astype(np.float32)
    got_k, got_v = backend.take_rows([k, v], cells)
    np.testing.assert_array_equal(got_k, k[cells])
    np.testing.assert_array_equal(got_v, v[cells])


def test_runs_are_found_only_where_they_pay() -> None:
    assert _runs(np.r_[np.arange(5, 25), np.arange(40, 60)]) == [(0, 20), (20, 40)]
    assert _runs(np.arange(0, 64, 2)) is None  # every cell its own run
    assert _runs(np.arange(10)) is None  # too few cells to bother
