"""The small pieces every architecture shares: norms, activations, and checked weight loading.
Functions take NumPy or CuPy arrays and compute in float32."""

from __future__ import annotations

from typing import Any

import numpy as np

from statemesh.memory import Backend
from statemesh.worker.errors import MissingTensor, ShapeMismatch
from statemesh.worker.kernels.quantized import PackedMatrix
from statemesh.worker.kernels.row_blocks import RowBlocks
from statemesh.worker.kernels.threads import Threads
from statemesh.worker.loading.host_arena import HostArena


def xp_of(x: Any) -> Any:
    """The array module of x (NumPy, or CuPy for a device array)."""
    return np if isinstance(x, np.ndarray) else __import__("cupy")


def rms_norm(x: Any, w: Any, eps: float, plus_one: bool = False) -> Any:
    """x / sqrt(mean(x^2) + eps) * w over the last axis; Gemma scales by (1 + w) instead."""
    xp = xp_of(x)
    mean_square = xp.einsum("...e,...e->...", x, x) / xp.float32(x.shape[-1])
    scale = (xp.float32(1) + w) if plus_one else w
    return x * (xp.float32(1) / xp.sqrt(mean_square + xp.float32(eps)))[..., None] * scale


def silu(x: Any) -> Any:
    """x * sigmoid(x), as x / (1 + exp(-x)) in one new array. For x below about -88, exp(-x)
    overflows to inf and x / inf is the right limit (-0), so that overflow is expected, not reported."""
    xp = xp_of(x)
    with np.errstate(over="ignore"):
        d = xp.negative(x)
        xp.exp(d, out=d)
        d += xp.float32(1)
        return xp.divide(x, d, out=d)


def times_out_in(h: Any, w: Any, row_blocks: RowBlocks | None = None, threads: Threads | None = None) -> Any:
    """h [n, in] through w [out, in] (a checkpoint's own layout) -> [n, out]. BLAS streams w as it
    is stored and, for several rows, packs the small h: for SmolLM2's down projection [576, 1536]
    that is ~10% faster than h @ w[in, out] with one row and with 32 (a decode step of 32 streams
    ~4% faster); the [in, out] layout stays faster for the wide gate/up projection with one row.
    In a part of a micro-batch, small products (`in_part`). A packed w multiplies itself, on `threads`."""
    if isinstance(w, PackedMatrix):
        return w.times(h, threads)
    if (out := in_part(h, w, row_blocks)) is not None:
        return out
    return (w @ h[0])[None] if h.shape[0] == 1 else (w @ h.T).T


def times(
    h: Any, w: Any, w_out_in: Any = None, row_blocks: RowBlocks | None = None, threads: Threads | None = None
) -> Any:
    """h [n, in] @ w [in, out] -> [n, out]; in a part of a micro-batch, small products over the
    same weight laid out [out, in] (`in_part`), when the model keeps that copy. A packed w (laid out
    [out, in]) multiplies itself, on `threads`."""
    if isinstance(w, PackedMatrix):
        return w.times(h, threads)
    if w_out_in is not None and (out := in_part(h, w_out_in, row_blocks)) is not None:
        return out
    return h @ w


def in_part(h: Any, w_out_in: Any, row_blocks: RowBlocks | None) -> Any | None:
    """h [n, in] through w [out, in] as small products on this thread alone (`RowBlocks`), when
    this thread runs a part of a micro-batch (`Threads.inside`), else None. The parts run side by
    side, one per core: BLAS's own threaded products, called from two threads at once, run ~3x
    slower here (a 32-stream decode step 171 -> 455 ms), and its single-threaded ones for a part's
    16 rows are slower than the small products (30 SmolLM2 layers' projections, both parts
    at once: 79 against 47 ms)."""
    if row_blocks is None or h.shape[0] < 2 or not row_blocks.threads.inside:
        return None
    return row_blocks(h, w_out_in)


def gelu_tanh(x: Any) -> Any:
    """GELU, tanh approximation (PyTorch's gelu(approximate="tanh"))."""
    xp = xp_of(x)
    c = xp.float32(np.sqrt(2.0 / np.pi))
    return xp.float32(0.5) * x * (xp.float32(1) + xp.tanh(c * (x + xp.float32(0.044715) * x * x * x)))


def softcap(x: Any, cap: float) -> Any:
    """cap * tanh(x / cap): squashes values into (-cap, cap) smoothly (Gemma 2)."""
    xp = xp_of(x)
    return xp.tanh(x / xp.float32(cap)) * xp.float32(cap)


class Weights:
    """Checkpoint tensors by name, checked against the config's shapes, then put on the backend
    (on the host, into a `HostArena` of huge pages)."""

    def __init__(self, tensors: dict[str, np.ndarray], backend: Backend):
        self.tensors, self.backend = tensors, backend
        self.arena = HostArena() if backend.is_host else None
        # copies that only some steps read (`put(..., aside=True)`), apart from the weights every
        # step streams, so those lie together as they would without the copies
        self.arena_aside = HostArena() if backend.is_host else None

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise MissingTensor(f"the checkpoint has no tensor {name!r}")
        t = self.tensors[name]
        if t.shape != shape:
            raise ShapeMismatch(f"tensor {name!r} has shape {t.shape}; the config implies {shape}")
        return t

    def put(self, t: Any, aside: bool = False) -> Any:  # t: an array, or a PackedMatrix
        arena = self.arena_aside if aside else self.arena
        if isinstance(t, PackedMatrix):  # host only (`load_model`); its arrays keep their types
            assert arena is not None, "packed weights live on the host"
            return t.map_arrays(arena.copy)
        if arena is not None:
            return arena.copy(t, np.float32)
        return self.backend.asarray(np.ascontiguousarray(t, dtype=np.float32))

    def put_side_by_side(self, parts: list[np.ndarray], axis: int, aside: bool = False) -> Any:
        """`np.concatenate(parts, axis)` put on the backend; on the host written straight into the
        arena, with no concatenated temporary to copy from (fresh memory, which these machines are
        slow to hand out: `HostArena`)."""
        arena = self.arena_aside if aside else self.arena
        if arena is not None:
            return arena.concatenate(parts, axis, np.float32)
        return self.backend.asarray(np.ascontiguousarray(np.concatenate(parts, axis=axis), dtype=np.float32))

    def embedding_and_head(self, name: str, vocab: int, hidden: int, tied: bool) -> tuple[Any, LMHead]:
        """(embedding [V, E], the vocabulary head). The head is the embedding when the config ties
        them or the checkpoint has no lm_head.weight."""
        table = self.get(name, (vocab, hidden))
        embedding = self.put(table)
        if tied or "lm_head.weight" not in self.tensors:
            return embedding, self.lm_head(table, embedding)
        return embedding, self.lm_head(self.get("lm_head.weight", (vocab, hidden)))

    def lm_head(self, w: np.ndarray | PackedMatrix, put_w: Any = None) -> LMHead:
        """The vocabulary head over w [V, E] (`put_w`: w already put, e.g. the tied embedding): a
        float32 w in both layouts, a packed one once, as it is."""
        put_w = self.put(w) if put_w is None else put_w
        return LMHead(put_w, None if isinstance(w, PackedMatrix) else self.put(w.T))

    def qkv(self, prefix: str, hidden: int, q_dim: int, kv_dim: int, kind: str = "weight") -> Any:
        """q, k and v projections side by side, [E, q + 2 kv] (`kind="bias"`: [q + 2 kv]; `kind=
        "weight_out_in"`: [q + 2 kv, E], put aside): one matmul instead of three. Names are prefix +
        "q_proj.weight" and so on."""
        parts = [(n, d) for n, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))]
        if kind == "bias":
            return self.put(np.concatenate([self.get(prefix + f"{n}_proj.bias", (d,)) for n, d in parts]))
        weights = [self.get(prefix + f"{n}_proj.weight", (d, hidden)) for n, d in parts]  # each [d, E]
        if isinstance(weights[0], PackedMatrix):  # packed weights stay [out, in]: [q + 2 kv, E]
            return self.put(PackedMatrix.stack(weights))
        if kind == "weight_out_in":
            return self.put_side_by_side(weights, axis=0, aside=True)  # [q + 2 kv, E]
        return self.put_side_by_side([w.T for w in weights], axis=1)  # [E, q + 2 kv]


class LMHead:
    """h [n, E] -> logits [n, V] through w [V, E], which it keeps in both layouts: one row is a
    matrix-vector product, fastest over a contiguous [E, V] copy (3.2 ms against 4.4 for
    SmolLM2). Several rows go, where the host's BLAS has the kernels (`RowBlocks`), through small
    products over blocks of w's rows (32 rows: ~12 ms against ~17); else through w @ h.T, because
    BLAS then packs the small h, not the 113 MB matrix, a block of `ROWS_PER_BLOCK` vocabulary
    rows at a time, so that each [block, n] result is written transposed while it is in cache.
    A packed w (`PackedMatrix`) is kept once, and multiplies itself on `threads`."""

    ROWS_PER_BLOCK = 2048  # [2048, n] results: 256 KB for 32 rows, within a 2 MB L2

    def __init__(self, w: Any, w_t: Any):
        self.w, self.w_t = w, w_t  # [V, E] (the embedding itself when tied), [E, V] (None when packed)

    def __call__(self, h: Any, row_blocks: RowBlocks | None = None, threads: Threads | None = None) -> Any:
        if isinstance(self.w, PackedMatrix):
            return self.w.times(h, threads)
        if h.shape[0] == 1:
            return h @ self.w_t
        if row_blocks is not None and (logits := row_blocks(h, self.w)) is not None:
            return logits
        xp = xp_of(h)
        vocab, block = self.w.shape[0], self.ROWS_PER_BLOCK
        out = xp.empty((h.shape[0], vocab), dtype=xp.float32)
        for start in range(0, vocab, block):
            out[:, start : start + block] = (self.w[start : start + block] @ h.T).T  # [block, E] @ [E, n] -> [block, n]
        return out


class DenseMLP:
    """x -> (silu(x Wgate) * (x Wup)) Wdown, with gate and up side by side: w_gate_up [E, 2F]."""

    def __init__(self, w_gate_up: Any, w_down: Any):
        self.w_gate_up, self.w_down = w_gate_up, w_down  # [E, 2F], [F, E]

    def __call__(self, h: Any) -> Any:
        f = self.w_down.shape[0]
        gate_up = h @ self.w_gate_up  # [n, E] @ [E, 2F] -> [n, 2F]
        return (silu(gate_up[:, :f]) * gate_up[:, f:]) @ self.w_down  # [n, F] @ [F, E] -> [n, E]


class MixtureOfExperts:
    """Each row goes to its top_k experts by softmax router weight (X experts, each a DenseMLP),
    and their outputs are summed, weighted; `renormalize` rescales the top_k weights to sum to 1
    (Granite does, Jamba does not)."""

    def __init__(self, router: Any, experts: list[DenseMLP], top_k: int, renormalize: bool):
        self.router, self.experts, self.top_k, self.renormalize = router, experts, top_k, renormalize  # router [E, X]

    def __call__(self, h: Any) -> Any:
        xp = xp_of(h)
        logits = h @ self.router  # [n, E] @ [E, X] -> [n, X]
        probs = xp.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        top = xp.argsort(-probs, axis=-1, kind="stable")[:, : self.top_k]  # [n, k]
        weights = xp.take_along_axis(probs, top, axis=-1)  # [n, k]
        if self.renormalize:
            weights /= weights.sum(axis=-1, keepdims=True)
        out = xp.zeros_like(h)
        top_host = top if xp is np else xp.asnumpy(top)
        for expert in np.unique(top_host):
            rows, slot = np.nonzero(top_host == expert)
            out[rows] += self.experts[int(expert)](h[rows]) * weights[rows, slot][:, None]
        return out


class SharedAndRouted:
    """Granite's feed-forward: a mixture of experts plus a shared MLP every row goes through."""

    def __init__(self, routed: MixtureOfExperts, shared: DenseMLP):
        self.routed, self.shared = routed, shared

    def __call__(self, h: Any) -> Any:
        return self.routed(h) + self.shared(h)
