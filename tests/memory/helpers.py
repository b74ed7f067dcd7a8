"""Shared helpers for the memory tests: small specs, a stand-in model step, and observations."""

from __future__ import annotations

from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, Batch, Memory, MemorySpec, RecurrentSpec, create_memory

H, D = 2, 3  # KV heads and head dim of the test specs
CONV, SSM = (2, 3), (3, 2)  # recurrent state shapes of the test specs


def attention_spec(n_layers: int = 2, window: int | None = None) -> MemorySpec:
    return MemorySpec(tuple(AttentionSpec(H, D, window=window) for _ in range(n_layers)))


def iswa_spec(window: int = 3) -> MemorySpec:
    """Gemma-like: windowed, full, windowed."""
    return MemorySpec((AttentionSpec(H, D, window=window), AttentionSpec(H, D), AttentionSpec(H, D, window=window)))


def recurrent_spec(n_layers: int = 2) -> MemorySpec:
    return MemorySpec(tuple(RecurrentSpec(CONV, SSM) for _ in range(n_layers)))


def hybrid_spec(window: int | None = None) -> MemorySpec:
    """Jamba-like: recurrent, attention, recurrent, a layer with no state."""
    return MemorySpec((RecurrentSpec(CONV, SSM), AttentionSpec(H, D, window=window), RecurrentSpec(CONV, SSM), None))


def token_rows(
    layer: int, seq_ids: np.ndarray, positions: np.ndarray, salt: float, shape: tuple[int, ...]
) -> np.ndarray:
    """Distinct, exactly representable rows for each (layer, seq, position, salt)."""
    base = layer * 1000.0 + seq_ids * 100.0 + positions + salt
    return (
        np.broadcast_to(base[:, None, None], (len(seq_ids), *shape)).astype(np.float32)
        + np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 8
    )


def run_step(mem: Memory, positions: Any, seq_ids: Any, n_ubatch: int = 512, salt: float = 0.0) -> None:
    """A stand-in model step: every attention layer stores distinct rows; every recurrent layer
    folds its tokens into the state (conv += token values, ssm = ssm / 2 + 1)."""
    batch = Batch(positions, seq_ids)
    with mem.batch(batch, n_ubatch=n_ubatch) as plan:
        for ub in plan:
            store_ubatch(mem, ub, salt)


def store_ubatch(mem: Memory, ub: Any, salt: float) -> None:
    for layer in mem.layers:
        spec = mem.spec.layers[layer]
        if isinstance(spec, AttentionSpec):
            store_kv_rows(mem, ub, layer, salt)
        else:
            conv, ssm = ub.state(layer)
            conv, ssm = fold(conv, ssm, ub.seq_ids, ub.positions, ub.seqs)
            ub.store_state(layer, conv, ssm)


def store_kv_rows(mem: Memory, ub: Any, layer: int, salt: float = 0.0) -> None:
    """The stand-in step's rows for one attention layer: k distinct per (layer, seq, position), v = -k."""
    k = token_rows(layer, ub.seq_ids, ub.positions, salt, mem.spec.attention(layer).k_shape)
    ub.store_kv(layer, k, -k)


def fold(
    conv: np.ndarray, ssm: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray, seqs: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    conv, ssm = conv.copy(), ssm.copy()
    for i, s in enumerate(seqs):
        for p in positions[seq_ids == s]:
            conv[i] += np.float32(p + 1)
            ssm[i] = ssm[i] / np.float32(2) + np.float32(1)
    return conv, ssm


def observe(mem: Memory) -> tuple[bytes, dict[str, Any], list[tuple[int, int, int]]]:
    """Everything a caller can see: the content (a snapshot), the counters and each sequence's span.
    Not the size of the dense decode buffers (`DenseKV`): they are a cache of rows, not state."""
    stats = _without_dense_bytes(mem.stats())
    spans = [(s, mem.seq_pos_min(s), mem.seq_pos_max(s)) for s in mem.seq_ids()]
    return mem.state_write(), stats, spans


def _without_dense_bytes(stats: Any) -> Any:
    if isinstance(stats, dict):
        return {k: _without_dense_bytes(v) for k, v in stats.items() if k != "dense_bytes"}
    if isinstance(stats, list):
        return [_without_dense_bytes(v) for v in stats]
    return stats


def make(kind: str, n_ctx: int = 32, n_seq_max: int = 4, **kw: Any) -> Memory:
    specs = {
        "kv": attention_spec(),
        "iswa": iswa_spec(),
        "recurrent": recurrent_spec(),
        "hybrid": hybrid_spec(),
        "hybrid_iswa": hybrid_spec(window=3),
    }
    return create_memory(specs[kind], n_ctx=n_ctx, n_seq_max=n_seq_max, backend="numpy", **kw)


KINDS = ["kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"]
