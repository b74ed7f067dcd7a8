"""`PackedMatrix`: a weight kept quantized in memory, multiplied without widening it whole to float32.

Single-stream decode streams every weight once a token, so its speed is the weights' bytes: SmolLM2
in float32 is 538 MB a token, in the layouts here 151 MB (q8) or 112 MB (q4 layers, q8 head).

Layouts (symbols: O output rows, I inputs, blocks of B = 32 inputs along a row, nb = I / B):
- "q8": int8 values [O, I] and a float32 scale per block [O, nb] (GGUF's Q8_0 with a float32 scale):
  a Q8_0 tensor maps onto it exactly; any other is widened to float32 and rounded to it at load
  (`pack_q8`), which adds ~0.6% relative error to SmolLM2's Q4_1 weights.
- "q4": 4-bit codes q in 0..15, two a byte [O, I / 2] in GGUF's order, a float32 scale and minimum
  per block [O, nb] each: w = scale * q + min. GGUF's Q4_1 maps onto it exactly, and Q4_0 too (its
  w = scale * (q - 8): min = -8 scale).

The product h [n, I] -> h @ w.T [n, O] (`PackedMatrix.times`), by the compiled loops of
`quantized_kernels` (numba) or BLAS, never widening a whole matrix to float32:
- one row (single-stream decode): a loop over the packed rows, reading each weight once;
- 2 to `TILE_ROWS_MIN` - 1 rows (batched decode): a loop that widens 6 weight rows at a time into a
  buffer in L1 and multiplies them with every row of h;
- more (prefill): tiles of `TILE_VALUES` weights widened to float32 and multiplied by BLAS.
`reference_times` is the same product in plain NumPy, which the tests hold the loops to.

Threads: a large product (`SPLIT_MIN_MACS`) has its weight rows split over the model's `Threads`,
one span per free core; the others run on the calling thread. Not numba's own threads (`prange`):
its OpenMP workers spin between products, which made the fastest single-stream decode on a quiet
2-core host (q8 43.5 tokens/s, against 35.2 this way and 26.4 for float32, medians, nice -20) and
the slowest on a busy one (2.5 against ~30 this way and 7.2 for float32: every product waits for a
worker that another process holds). A hand-off to `Threads` costs ~230 us on the AVX2 hosts (a map
of two empty parts), so only products of several milliseconds are split: one row through the
vocabulary head (3.6 -> 2.3 ms), not through the [3072, 576] gate/up projection (195 -> 185 us).

Packed weights live on the host only (NumPy backend).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from statemesh.worker.kernels.threads import Threads

BLOCK = 32  # values per scale
SPLIT_MIN_MACS = 4_000_000  # products of fewer multiply-adds run on the calling thread (see above)
# From this many rows of h (a prefill), tiles of the weight widened to float32 go through BLAS, whose
# GEMM kernels beat the compiled loops once the widening is shared by enough rows. One core, CPU time
# over SmolLM2-shaped weights: 512 rows, float32 GEMM 850 ms, tiles 776-808, loops 943; 64 rows: 87,
# 118-127, 128; 32 rows: 170, ~240, 210 (two cores: 119, ~220, 148, so the loops keep up to 127 rows).
TILE_ROWS_MIN = 128
TILE_VALUES = 1 << 20  # weights widened at a time: a 4 MB float32 tile, within L3 (1 M values: as fast as 4 M)
SPAN_ROWS = 48  # rows split between threads in chunks of this many: whole groups of the matrix loop (6 rows)
PACKED_NAMES = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")  # matrices `packs` takes
GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # per block of 32 values


@dataclass(frozen=True)
class PackedMatrix:
    """A weight w [O, I] (`shape`) in `layout`: `data` int8 values [O, I] (q8) or uint8 4-bit codes
    [O, I / 2] (q4); `scales` float32 [O, nb]; `mins` float32 [O, nb] for q4, else None."""

    layout: str
    shape: tuple[int, int]
    data: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays())

    def arrays(self) -> list[np.ndarray]:
        return [self.data, self.scales] + ([] if self.mins is None else [self.mins])

    def map_arrays(self, fn: Callable[[np.ndarray], np.ndarray]) -> PackedMatrix:
        """The same matrix with each array replaced by fn(array) (e.g. a copy into a `HostArena`)."""
        return replace(
            self, data=fn(self.data), scales=fn(self.scales), mins=None if self.mins is None else fn(self.mins)
        )

    # ---- widening to float32 (plain NumPy) ------------------------------------------------------

    def rows(self, ids: Any) -> np.ndarray:
        """w[ids] as float32 [len(ids), I]: an embedding lookup widens only the rows it reads."""
        ids = np.asarray(ids)
        scales = np.repeat(self.scales[ids], BLOCK, axis=1)  # [n, I]
        if self.layout == "q8":
            rows: np.ndarray = self.data[ids].astype(np.float32) * scales
            return rows
        assert self.mins is not None
        rows = q4_codes(self.data[ids]).astype(np.float32) * scales + np.repeat(self.mins[ids], BLOCK, axis=1)
        return rows

    def to_float(self) -> np.ndarray:
        """w as float32 [O, I] (the reference; the products never widen a whole matrix)."""
        return self.rows(np.arange(self.shape[0]))

    # ---- the product ----------------------------------------------------------------------------

    def times(self, h: np.ndarray, threads: Threads | None = None) -> np.ndarray:
        """h [n, I] -> h @ w.T [n, O], float32. With `threads`, a product of `SPLIT_MIN_MACS` or more
        has w's rows cut into one span per free core (`Threads.spans`: one inside a part of a
        micro-batch, whose cores are taken), the spans multiplied side by side."""
        n_out, n_in = self.shape
        h = np.ascontiguousarray(h, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != n_in:
            raise ValueError(f"a product with a packed [{n_out}, {n_in}] weight takes [n, {n_in}], got {h.shape}")
        out = np.empty((h.shape[0], n_out), dtype=np.float32)
        if h.shape[0] >= TILE_ROWS_MIN and (threads is None or not threads.inside):
            self._times_by_tiles(h, out)
            return out
        rows_into = self._rows_into(h, out)
        parts = 1 if threads is None or h.shape[0] * n_out * n_in < SPLIT_MIN_MACS else threads.free
        if parts == 1:
            rows_into(0, n_out)
            return out
        assert threads is not None
        chunks = threads.spans(-(-n_out // SPAN_ROWS), parts)  # spans of whole chunks of `SPAN_ROWS` rows
        threads.map(rows_into, [(c.start * SPAN_ROWS, min(n_out, c.stop * SPAN_ROWS)) for c in chunks])
        return out

    def _rows_into(self, h: np.ndarray, out: np.ndarray) -> Callable[[int, int], None]:
        """The compiled loop (`quantized_kernels`) that writes out[:, lo:hi] = h @ w[lo:hi].T, as a
        function of (lo, hi): for one row of h the vector loop, for several the matrix loop."""
        from statemesh.worker.kernels import quantized_kernels as k  # numba, imported when first needed

        if h.shape[0] == 1 and self.layout == "q8":
            return partial(k.q8_rows_times_vector, self.data, self.scales, h[0], out[0])
        if h.shape[0] == 1:
            x = h[0]
            x_16th = x * np.float32(1 / 16)  # the high nibbles' inputs (`quantized_kernels`)
            block_sums = x.reshape(-1, BLOCK).sum(axis=1)  # [nb]: what each block's minimum multiplies
            return partial(k.q4_rows_times_vector, self.data, self.scales, self.mins, x, x_16th, block_sums, out[0])
        if self.layout == "q8":
            return partial(k.q8_rows_times_matrix, self.data, self.scales, h, out)
        return partial(k.q4_rows_times_matrix, self.data, self.scales, self.mins, h, out)

    def _times_by_tiles(self, h: np.ndarray, out: np.ndarray) -> None:
        """out = h @ w.T through BLAS, `TILE_VALUES` weights at a time widened to float32 on this thread
        (the widening is 1 step for every `h.shape[0]` multiply-adds of the product that follows)."""
        from statemesh.worker.kernels import quantized_kernels as k

        n_out, n_in = self.shape
        rows = max(1, min(n_out, TILE_VALUES // n_in))
        tile = np.empty((rows, n_in), dtype=np.float32)
        for lo in range(0, n_out, rows):
            hi = min(n_out, lo + rows)
            if self.layout == "q8":
                k.q8_rows_to_float(self.data, self.scales, lo, hi, tile)
            else:
                k.q4_rows_to_float(self.data, self.scales, self.mins, lo, hi, tile)
            np.matmul(h, tile[: hi - lo].T, out=out[:, lo:hi])  # [n, I] @ [I, hi - lo] -> [n, hi - lo]

    # ---- building -------------------------------------------------------------------------------

    @staticmethod
    def stack(parts: Sequence[PackedMatrix]) -> PackedMatrix:
        """The parts' rows one after another (q, k and v side by side; gate and up). Parts of
        different layouts all become q8 (`pack_q8` of the 4-bit ones: their exact values rounded)."""
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError(f"stacked rows need one input size, got {[p.shape for p in parts]}")
        if len({p.layout for p in parts}) > 1:
            parts = [p if p.layout == "q8" else pack_q8(p.to_float()) for p in parts]
        first = parts[0]
        return PackedMatrix(
            first.layout,
            (sum(p.shape[0] for p in parts), first.shape[1]),
            np.concatenate([p.data for p in parts]),
            np.concatenate([p.scales for p in parts]),
            None if first.mins is None else np.concatenate([p.mins for p in parts if p.mins is not None]),
        )


def q4_codes(nibbles: np.ndarray) -> np.ndarray:
    """uint8 [..., I / 2] two 4-bit codes a byte (GGUF's order: a block's 16 bytes hold its values
    0..15 in their low nibbles and 16..31 in their high ones) -> uint8 codes [..., I]."""
    blocks = nibbles.reshape(*nibbles.shape[:-1], -1, BLOCK // 2)  # [..., nb, 16]
    codes = np.concatenate([blocks & 15, blocks >> 4], axis=-1)  # [..., nb, 32]
    return codes.reshape(*nibbles.shape[:-1], -1)


def reference_times(h: np.ndarray, w: PackedMatrix) -> np.ndarray:
    """h [n, I] @ w.T -> [n, O] in plain NumPy float32 math: what `PackedMatrix.times` computes."""
    product: np.ndarray = np.asarray(h, dtype=np.float32) @ w.to_float().T
    return product


def pack_q8(w: np.ndarray) -> PackedMatrix:
    """w [O, I] (I a multiple of 32) rounded to q8: per block, scale = max |w| / 127 and values =
    round(w / scale), so the largest value of each block is exact and the error at most scale / 2."""
    n_out, n_in = w.shape
    if n_in % BLOCK:
        raise ValueError(f"q8 packs rows of a multiple of {BLOCK} values, got a [{n_out}, {n_in}] matrix")
    blocks = np.asarray(w, dtype=np.float32).reshape(n_out, n_in // BLOCK, BLOCK)
    scales = np.abs(blocks).max(axis=2) / np.float32(127)  # [O, nb]
    safe = np.where(scales > 0, scales, np.float32(1))  # an all-zero block: values 0, any scale
    values = np.rint(blocks / safe[:, :, None]).astype(np.int8).reshape(n_out, n_in)
    return PackedMatrix("q8", (n_out, n_in), values, scales.astype(np.float32))


def packs(name: str) -> bool:
    """Whether a checkpoint tensor of this (Hugging Face) name is one that packed weights keep packed:
    the projections, the token embedding and the vocabulary head. Norms and biases stay float32."""
    return name.endswith(PACKED_NAMES)


def from_gguf_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, ...], layout: str) -> PackedMatrix | None:
    """A GGUF tensor's bytes [O, bytes a row] -> a PackedMatrix with exactly its values, where one
    maps onto `layout` ("q8": Q8_0; "q4": Q8_0, and Q4_0 and Q4_1 as q4); None for the others, which
    the caller widens (`pack_q8` then rounds them). Scales go from float16 to float32, exactly."""
    if len(shape) != 2 or type_name not in GGUF_BLOCK_BYTES or (type_name != "Q8_0" and layout != "q4"):
        return None
    n_out, n_in = shape
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(n_out, n_in // BLOCK, GGUF_BLOCK_BYTES[type_name])
    scales = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)  # [O, nb]
    if type_name == "Q8_0":  # d (f16), 32 int8 values
        values = blocks[:, :, 2:].copy().view(np.int8).reshape(n_out, n_in)
        return PackedMatrix("q8", (n_out, n_in), values, scales)
    if type_name == "Q4_0":  # d (f16), 16 bytes of codes: w = d * (q - 8)
        nibbles, mins = blocks[:, :, 2:], -8 * scales
    else:  # Q4_1: d (f16), m (f16), 16 bytes of codes: w = d * q + m
        nibbles, mins = blocks[:, :, 4:], blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
    return PackedMatrix("q4", (n_out, n_in), np.ascontiguousarray(nibbles).reshape(n_out, n_in // 2), scales, mins)
