"""`RowBlocks`: a few rows through a large weight, as many small products instead of one large one.

Symbols: n rows of h, I the weight's input size, O its output size, c rows of the weight per block.

To multiply a large matrix, OpenBLAS first copies ("packs") panels of it into a buffer laid out for
its kernel, then runs the kernel over the buffer. With a decode step's few rows on the other side,
the arithmetic per weight is small and the copy is most of the work: a [32, 576] x [576, 3072]
product spends 30-40% of its time in the packing routines, reading the weight from memory while the
arithmetic units wait. OpenBLAS's AVX-512 builds (cores SkylakeX, Cooperlake, SapphireRapids, which
AMD Zen 4 runs too) also have "small matrix" kernels that work on the operands where they lie, for
products of at most `SMALL_PRODUCT` multiply-adds (n * c * I), streaming the weight in the same
loop as the arithmetic.

A weight stored [O, I] (a checkpoint's own layout) already is, without a copy, a stack of blocks of
c whole rows [O / c, c, I], each contiguous. NumPy's matmul runs a stack against h^T [I, n] as one
call, a small product per block; the blocks are split between the host's cores (`Threads`).

Used for the vocabulary head, whose [V, E] matrix is there anyway (the embedding). Measured on this
project's 2-core Zen 4 machines against the head's best single products, medians of 9: 2 rows
7.9 -> 5.0 ms, 8 rows 9.8 -> 6.5, 32 rows 16.4 -> 11.1, 64 rows 26.4 -> 19.8. Not used for the
layers' projections: SmolLM2's down projection [576, 1536] is slower this way (32 rows: 14.5
against 13.0 ms for 30 layers), and its gate/up projection, faster (23.8 against 28.6), would need
a second copy of the weight, since one row wants it [in, out].

Where the small kernels lose — one row (a matrix-vector product is faster), many rows (packing pays
for itself when each weight panel meets hundreds of rows), a BLAS without them — `RowBlocks` says
so by returning None, and the caller keeps its plain product.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

import numpy as np

from statemesh.worker.kernels.threads import Threads

SMALL_PRODUCT = 1_000_000  # OpenBLAS's SkylakeX kernels take products with M * N * K up to 100^3
BLOCK_ROWS = (64, 48, 32, 16, 8)  # c, largest first: fewer, longer small products
CHUNK_ROWS = 2048  # weight rows per staging buffer: [2048, n] float32 is 256 KB at n = 32, within L2
SHARED_LIBRARY = re.compile(r"\.so(\.\d+)*$")
CORES_WITH_SMALL_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


class RowBlocks:
    def __init__(self, threads: Threads):
        self.threads = threads

    @staticmethod
    def available() -> bool:
        """Whether the BLAS NumPy uses has OpenBLAS's AVX-512 small-matrix kernels."""
        core = openblas_core()
        return core is not None and core.lower() in CORES_WITH_SMALL_KERNELS

    @staticmethod
    def block_rows(n: int, n_out: int, n_in: int) -> int | None:
        """c for n rows through a weight [n_out, n_in]: the largest of `BLOCK_ROWS` that divides
        n_out and keeps each product within `SMALL_PRODUCT` (n=32, I=576: 48; I=1536: 16); None
        for one row, or when none fits."""
        if n < 2:
            return None
        return next((c for c in BLOCK_ROWS if n_out % c == 0 and n * c * n_in <= SMALL_PRODUCT), None)

    def __call__(self, h: Any, w: Any) -> np.ndarray | None:
        """h [n, I] through w [O, I] -> [n, O] (h @ w.T), or None where small products do not apply."""
        if not (isinstance(h, np.ndarray) and isinstance(w, np.ndarray) and w.flags.c_contiguous):
            return None
        n, n_in = h.shape
        n_out = w.shape[0]
        c = self.block_rows(n, n_out, n_in)
        if c is None:
            return None
        blocks = w.reshape(n_out // c, c, n_in)  # [O/c, c, I]: a view, each block contiguous
        h_t = np.ascontiguousarray(h.T, dtype=np.float32)  # [I, n]
        out = np.empty((n, n_out), dtype=np.float32)
        parts = [(blocks, h_t, out, span.start, span.stop) for span in self.threads.spans(len(blocks))]
        self.threads.map(_blocks_into, parts)
        return out


def _blocks_into(blocks: np.ndarray, h_t: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    """out[:, rows of blocks lo..hi) = h @ those rows^T, `CHUNK_ROWS` weight rows at a time: the
    products land [rows, n] in a small buffer that stays in cache while it is written transposed."""
    c, n = blocks.shape[1], h_t.shape[1]
    per_chunk = max(1, CHUNK_ROWS // c)
    staged = np.empty((per_chunk, c, n), dtype=np.float32)  # [blocks, c, n]
    for first in range(lo, hi, per_chunk):
        last = min(first + per_chunk, hi)
        part = staged[: last - first]
        np.matmul(blocks[first:last], h_t, out=part)  # [b, c, I] @ [I, n] -> [b, c, n]
        out[:, first * c : last * c] = part.reshape(-1, n).T  # [b*c, n] -> [n, b*c]


def openblas_core() -> str | None:
    """The core OpenBLAS picked for this CPU (e.g. "SkylakeX"), from the library NumPy loaded;
    None when NumPy's BLAS is not an OpenBLAS this process can find (or not on Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if SHARED_LIBRARY.search(line) and "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        library = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                       "openblas_get_corename"):  # fmt: skip
            corename = getattr(library, symbol, None)
            if corename is not None:
                corename.restype = ctypes.c_char_p
                name: bytes = corename()
                return name.decode()
    return None
