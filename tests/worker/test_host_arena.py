"""`HostArena`: weights copied into huge-page mappings are exact, contiguous, aligned and apart."""

from __future__ import annotations

import gc

import numpy as np

from statemesh.worker.loading.host_arena import ALIGN, CHUNK, HostArena


def test_copies_are_exact_contiguous_aligned_and_independent() -> None:
    rng = np.random.default_rng(0)
    arena = HostArena()
    sources = [rng.standard_normal((37, 11)), rng.standard_normal((5, 7)).T, rng.standard_normal(3).astype(np.float16)]
    copies = [arena.copy(s, np.float32) for s in sources]
    for s, c in zip(sources, copies, strict=True):
        assert c.dtype == np.float32 and c.shape == s.shape and c.flags.c_contiguous and c.flags.writeable
        assert c.ctypes.data % ALIGN == 0
        np.testing.assert_array_equal(c, s.astype(np.float32))
    copies[0][...] = 0  # neighbours in one mapping do not overlap
    np.testing.assert_array_equal(copies[1], sources[1].astype(np.float32))
    np.testing.assert_array_equal(copies[2], sources[2].astype(np.float32))


def test_an_array_larger_than_a_chunk_gets_its_own_mapping_and_outlives_the_arena() -> None:
    arena = HostArena()
    small = arena.copy(np.arange(10, dtype=np.float32))
    big_source = np.ones(CHUNK // 4 + 1000, dtype=np.float32)
    big = arena.copy(big_source)
    after = arena.copy(np.full(4, 7, dtype=np.float32))
    del arena
    gc.collect()
    assert big.shape == big_source.shape and float(big[-1]) == 1.0 and float(big.sum()) == big_source.size
    np.testing.assert_array_equal(small, np.arange(10, dtype=np.float32))
    np.testing.assert_array_equal(after, np.full(4, 7, dtype=np.float32))
