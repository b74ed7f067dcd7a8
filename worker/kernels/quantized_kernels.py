"""The compiled loops behind `PackedMatrix` (numba): packed weight rows times float32 activations,
and packed rows widened to float32 a tile at a time. `quantized.py` says what the layouts are and
when each loop runs; this file is only the loops.

Symbols: O rows of the weight (its output size), I its input size, B = 32 values per block,
nb = I / B blocks a row.

    q8: values int8 [O, I], scales float32 [O, nb]: w[o, i] = scales[o, i // B] * values[o, i]
    q4: nibbles uint8 [O, I / 2], scales and mins float32 [O, nb]: w = scales * q + mins, q in 0..15;
        byte j of block b holds value b*B + j in its low nibble and b*B + 16 + j in its high one
        (GGUF's Q4_0/Q4_1 order)

How the loops are written matters more than what they compute: LLVM vectorizes them or not by
their shape, and the difference is 5-10x. Measured on this project's AVX2 hosts (Zen 3, CPU time
of one core over SmolLM2's 134 M weights, medians): a per-block sum reduced to a scalar each block
(the obvious loop) ~65-200 ms, since LLVM then vectorizes across blocks with gathers or not at all;
32 accumulator lanes updated once a block ~20 ms, since each block must wait for the previous
block's store of the lanes; the same lanes updated once every 2 blocks (below) ~17.5 ms for either
layout, against ~13 ms for one int8 scale a row, the floor set by reading the memory. Two more rules
keep the vector code: block loops are `while` loops (a stepped `range` let LLVM pick the wrong loop
to vectorize), and a q4 high nibble is read as (byte - low nibble) against x / 16, which stays in
32-bit lanes where a shift made numba widen to 64-bit ones.

Each loop runs over a range of rows [lo, hi) on the calling thread and lets go of the GIL (`nogil`),
so that `PackedMatrix.times` can run spans of rows side by side on `Threads`. A row is always summed
whole, in one order, so the result does not depend on how the rows were split.

Compiling all of them takes ~3 s (q8) to ~7 s (q4, whose model also has a q8 head) at their first
calls; numba keeps them in `__pycache__` beside this file (~0.5 MB), from which a later process
loads them in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

BLOCK = 32  # values per scale (GGUF's Q8_0, Q4_0 and Q4_1 blocks)


def _compiled() -> Callable[[Callable[..., None]], Callable[..., None]]:
    """numba's njit with the options every loop here wants, compiled at first call and cached on
    disk (`cache=True`: next to this file, else in the user's cache directory). A read-only install
    with no writable cache directory has no cache: numba refuses `cache=True` there, so each process
    compiles again (~1-3 s a loop) instead of failing."""

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        try:
            return njit(cache=True, fastmath=True, nogil=True)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(cache=False, fastmath=True, nogil=True)(fn)

    return decorate


# ---- several rows: widened weight rows times h ----------------------------------------------------

GROUP = 6  # weight rows widened at a time into a buffer of [GROUP, I] floats (L1) for every row of h


@_compiled()
def group_times_matrix(group: Any, k: int, h: Any, out: Any, o: int) -> None:
    """out[:, o:o + k] = h [n, I] @ group[:k].T, group [GROUP, I] float32 (rows past k are zeros).

    6 weight rows against 2 rows of h at a time: 12 sums in registers, 8 loads (only 2 of them of h,
    the one operand that comes from L2) for 12 multiply-adds a step. Of the shapes tried (4 x 2,
    4 x 3, 8 x 1, 2 x 6, 6 x 2) this one measured fastest on one core, CPU time over SmolLM2-shaped
    weights: 32 rows of h 210 ms (4 x 3: 223; OpenBLAS's float32 GEMM, Haswell core: 170), 8 rows 107
    (121; 67). Float32 arithmetic cannot beat a float32 GEMM: what packing saves here is memory."""
    n, n_in = h.shape
    sums = np.empty((GROUP, 2), np.float32)
    r = 0
    while r + 2 <= n:
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = np.float32(0)
        for i in range(n_in):
            x0, x1 = h[r, i], h[r + 1, i]
            w0, w1, w2, w3, w4, w5 = group[0, i], group[1, i], group[2, i], group[3, i], group[4, i], group[5, i]
            a00 += w0 * x0
            a01 += w0 * x1
            a10 += w1 * x0
            a11 += w1 * x1
            a20 += w2 * x0
            a21 += w2 * x1
            a30 += w3 * x0
            a31 += w3 * x1
            a40 += w4 * x0
            a41 += w4 * x1
            a50 += w5 * x0
            a51 += w5 * x1
        sums[0, 0], sums[0, 1], sums[1, 0], sums[1, 1], sums[2, 0], sums[2, 1] = a00, a01, a10, a11, a20, a21
        sums[3, 0], sums[3, 1], sums[4, 0], sums[4, 1], sums[5, 0], sums[5, 1] = a30, a31, a40, a41, a50, a51
        for g in range(k):
            out[r, o + g] = sums[g, 0]
            out[r + 1, o + g] = sums[g, 1]
        r += 2
    if r < n:  # the last row of h, when n is odd
        a0 = a1 = a2 = a3 = a4 = a5 = np.float32(0)
        for i in range(n_in):
            x = h[r, i]
            a0 += group[0, i] * x
            a1 += group[1, i] * x
            a2 += group[2, i] * x
            a3 += group[3, i] * x
            a4 += group[4, i] * x
            a5 += group[5, i] * x
        sums[0, 0], sums[1, 0], sums[2, 0], sums[3, 0], sums[4, 0], sums[5, 0] = a0, a1, a2, a3, a4, a5
        for g in range(k):
            out[r, o + g] = sums[g, 0]


# ---- q8 -----------------------------------------------------------------------------------------


@_compiled()
def q8_rows_times_vector(values: Any, scales: Any, x: Any, out: Any, lo: int, hi: int) -> None:
    """out[o] = sum_i w[o, i] * x[i] for o in [lo, hi)."""
    nb = values.shape[1] // BLOCK
    lanes = np.zeros(BLOCK, np.float32)  # lanes[j]: the row's sum over values j, j + B, j + 2B, ...
    for o in range(lo, hi):
        lanes[:] = 0
        b = 0
        while b + 2 <= nb:  # two blocks per update of the lanes
            s0, s1 = scales[o, b], scales[o, b + 1]
            i = b * BLOCK
            for j in range(BLOCK):
                lanes[j] += s0 * (np.float32(values[o, i + j]) * x[i + j]) + s1 * (
                    np.float32(values[o, i + BLOCK + j]) * x[i + BLOCK + j]
                )
            b += 2
        while b < nb:
            s0 = scales[o, b]
            i = b * BLOCK
            for j in range(BLOCK):
                lanes[j] += s0 * (np.float32(values[o, i + j]) * x[i + j])
            b += 1
        out[o] = lanes.sum()


@_compiled()
def q8_rows_to_float(values: Any, scales: Any, lo: int, hi: int, out: Any) -> None:
    """out[o - lo] = w[o] as float32, for o in [lo, hi)."""
    nb = values.shape[1] // BLOCK
    for o in range(lo, hi):
        for b in range(nb):
            s, i = scales[o, b], b * BLOCK
            for j in range(BLOCK):
                out[o - lo, i + j] = s * np.float32(values[o, i + j])


@_compiled()
def q8_rows_times_matrix(values: Any, scales: Any, h: Any, out: Any, lo: int, hi: int) -> None:
    """out[:, lo:hi] = h [n, I] @ w[lo:hi].T, widening `GROUP` weight rows at a time."""
    group = np.zeros((GROUP, values.shape[1]), np.float32)
    for o in range(lo, hi, GROUP):
        k = min(GROUP, hi - o)
        q8_rows_to_float(values, scales, o, o + k, group)
        group[k:] = 0
        group_times_matrix(group, k, h, out, o)


# ---- q4 -----------------------------------------------------------------------------------------


@_compiled()
def q4_rows_times_vector(
    nibbles: Any, scales: Any, mins: Any, x: Any, x_16th: Any, x_block_sums: Any, out: Any, lo: int, hi: int
) -> None:
    """out[o] = sum_i w[o, i] * x[i] for o in [lo, hi), as sum_b scales[o, b] * (q . x over block b)
    + mins[o, b] * (sum of x over block b); x_16th = x / 16, x_block_sums [nb]."""
    half = BLOCK // 2
    nb = nibbles.shape[1] // half
    lanes = np.zeros(BLOCK, np.float32)  # [0, 16): low nibbles' sums; [16, 32): high nibbles'
    for o in range(lo, hi):
        lanes[:] = 0
        b = 0
        while b + 2 <= nb:  # two blocks per update of the lanes
            d0, d1 = scales[o, b], scales[o, b + 1]
            i, k = b * BLOCK, b * half
            for j in range(half):
                c0, c1 = nibbles[o, k + j], nibbles[o, k + half + j]
                low0, low1 = np.float32(c0 & np.uint8(15)), np.float32(c1 & np.uint8(15))
                lanes[j] += d0 * (low0 * x[i + j]) + d1 * (low1 * x[i + BLOCK + j])
                # (byte - low) = 16 * high nibble, hence x / 16
                lanes[half + j] += d0 * ((np.float32(c0) - low0) * x_16th[i + half + j]) + d1 * (
                    (np.float32(c1) - low1) * x_16th[i + BLOCK + half + j]
                )
            b += 2
        while b < nb:
            d0 = scales[o, b]
            i, k = b * BLOCK, b * half
            for j in range(half):
                c0 = nibbles[o, k + j]
                low0 = np.float32(c0 & np.uint8(15))
                lanes[j] += d0 * (low0 * x[i + j])
                lanes[half + j] += d0 * ((np.float32(c0) - low0) * x_16th[i + half + j])
            b += 1
        offset = np.float32(0)
        for b in range(nb):
            offset += mins[o, b] * x_block_sums[b]
        out[o] = lanes.sum() + offset


@_compiled()
def q4_rows_to_float(nibbles: Any, scales: Any, mins: Any, lo: int, hi: int, out: Any) -> None:
    """out[o - lo] = w[o] as float32, for o in [lo, hi)."""
    half = BLOCK // 2
    nb = nibbles.shape[1] // half
    for o in range(lo, hi):
        for b in range(nb):
            d, m = scales[o, b], mins[o, b]
            for j in range(half):
                c = nibbles[o, b * half + j]
                low = np.float32(c & np.uint8(15))
                out[o - lo, b * BLOCK + j] = d * low + m
                out[o - lo, b * BLOCK + half + j] = d * ((np.float32(c) - low) * np.float32(0.0625)) + m


@_compiled()
def q4_rows_times_matrix(nibbles: Any, scales: Any, mins: Any, h: Any, out: Any, lo: int, hi: int) -> None:
    """out[:, lo:hi] = h [n, I] @ w[lo:hi].T, widening `GROUP` weight rows at a time."""
    group = np.zeros((GROUP, 2 * nibbles.shape[1]), np.float32)
    for o in range(lo, hi, GROUP):
        k = min(GROUP, hi - o)
        q4_rows_to_float(nibbles, scales, mins, o, o + k, group)
        group[k:] = 0
        group_times_matrix(group, k, h, out, o)
