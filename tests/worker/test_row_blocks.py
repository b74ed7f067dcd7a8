"""`RowBlocks`: small products over blocks of a weight's rows give h @ w.T, and step aside (None)
where they do not apply; the vocabulary head gives the same logits with them as without."""

from __future__ import annotations

import numpy as np
import pytest

from statemesh.worker.kernels.nn import LMHead
from statemesh.worker.kernels.row_blocks import RowBlocks, openblas_core
from statemesh.worker.kernels.threads import Threads


@pytest.fixture(scope="module")
def threads() -> Threads:
    return Threads(2)


@pytest.mark.parametrize(
    ("n", "n_out", "n_in", "expected"),
    [
        (1, 49152, 576, None),  # one row: a matrix-vector product is faster
        (2, 49152, 576, 64),
        (32, 49152, 576, 48),  # 32 * 48 * 576 = 884,736 multiply-adds, within 10^6
        (32, 576, 1536, 16),  # 32 * 16 * 1536 = 786,432
        (64, 576, 1536, 8),
        (32, 100, 576, None),  # no block size divides 100 rows
        (512, 49152, 576, None),  # a prefill's rows: each product would exceed the small kernels' limit
    ],
)
def test_block_rows(n: int, n_out: int, n_in: int, expected: int | None) -> None:
    assert RowBlocks.block_rows(n, n_out, n_in) == expected


@pytest.mark.parametrize(("n", "n_out", "n_in", "n_threads"), [(2, 4096, 64, 2), (7, 1000, 96, 2), (32, 576, 1536, 2),
                                                               (5, 3 * 64, 128, 1), (9, 64, 32, 3)])  # fmt: skip
def test_products_equal_the_plain_product(threads: Threads, n: int, n_out: int, n_in: int, n_threads: int) -> None:
    rng = np.random.default_rng(n)
    h = rng.standard_normal((n, n_in), dtype=np.float32)
    w = rng.standard_normal((n_out, n_in), dtype=np.float32)
    pool = threads if n_threads == 2 else Threads(n_threads)
    got = RowBlocks(pool)(h, w)
    assert got is not None and got.shape == (n, n_out) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, h.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_steps_aside_where_small_products_do_not_apply(threads: Threads) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 64), dtype=np.float32)
    blocks = RowBlocks(threads)
    assert blocks(rng.standard_normal((1, 64), dtype=np.float32), w) is None  # one row
    assert blocks(rng.standard_normal((4, 256), dtype=np.float32), np.ascontiguousarray(w.T).T) is None  # a view
    assert blocks(rng.standard_normal((4000, 64), dtype=np.float32), w) is None  # too many rows


def test_the_head_gives_the_same_logits_with_and_without_them(threads: Threads) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3000, 48), dtype=np.float32)  # 3000 rows: blocks of 8, none of the larger sizes
    head = LMHead(w, np.ascontiguousarray(w.T))
    for n in (1, 3, 32):
        h = rng.standard_normal((n, 48), dtype=np.float32)
        np.testing.assert_allclose(head(h, RowBlocks(threads)), head(h), rtol=1e-5, atol=1e-5)


def test_numpy_s_openblas_names_its_core() -> None:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    core = openblas_core()
    if "openblas" in blas:
        assert isinstance(core, str) and core, f"NumPy uses {blas}, yet no OpenBLAS core was found"
        assert RowBlocks.available() == (core.lower() in {"skylakex", "cooperlake", "sapphirerapids"})
    else:
        assert not RowBlocks.available()
