"""`create_memory`: the one place that picks the memory strategy for a model's layers.

only full attention                 -> KVCache
attention with some windowed layers -> ISWACache (full cache + small windowed cache)
only recurrent                      -> RecurrentMemory
attention and recurrent             -> HybridMemory (its attention part a KVCache or an ISWACache)
"""

from __future__ import annotations

from collections.abc import Iterable

from statemesh.memory.backend import get_backend
from statemesh.memory.base import Memory
from statemesh.memory.errors import InvalidInput, InvalidLayer
from statemesh.memory.hybrid import HybridMemory
from statemesh.memory.iswa_cache import ISWACache
from statemesh.memory.kv_cache import KShift, KVCache
from statemesh.memory.recurrent import RecurrentMemory
from statemesh.memory.specs import AttentionSpec, MemorySpec, RecurrentSpec


def create_memory(
    spec: MemorySpec,
    *,
    n_ctx: int,
    n_seq_max: int,
    n_ubatch: int = 512,
    layers: Iterable[int] | None = None,
    backend: str = "auto",
    k_shift: KShift | None = None,
) -> Memory:
    """Memory for the global layers `layers` of `spec` (all of them by default; a pipeline shard
    passes its own). `n_ctx`: token cells of the full-attention cache, shared by all sequences.
    `n_seq_max`: sequence ids run 0 .. n_seq_max-1. `n_ubatch` sizes the windowed cache.
    `k_shift(layer, k, delta)` re-rotates stored keys when positions move (RoPE models)."""
    if not isinstance(spec, MemorySpec):
        raise InvalidInput(f"spec must be a MemorySpec, got {type(spec).__name__}")
    for name, value in (("n_ctx", n_ctx), ("n_seq_max", n_seq_max), ("n_ubatch", n_ubatch)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
    held = _held_layers(spec, layers)
    attention = tuple(i for i in held if isinstance(spec.layers[i], AttentionSpec))
    recurrent = tuple(i for i in held if isinstance(spec.layers[i], RecurrentSpec))
    if not attention and not recurrent:
        raise InvalidLayer(f"layers {list(held)} keep no state: there is no memory to create")
    chosen = get_backend(backend)
    attention_part: KVCache | ISWACache | None = None
    if any(spec.attention(i).window is not None for i in attention):
        attention_part = ISWACache(
            spec, n_ctx=n_ctx, n_seq_max=n_seq_max, n_ubatch=n_ubatch, layers=attention, backend=chosen, k_shift=k_shift
        )
    elif attention:
        attention_part = KVCache(
            spec, n_cells=n_ctx, n_seq_max=n_seq_max, layers=attention, backend=chosen, k_shift=k_shift
        )
    recurrent_part = RecurrentMemory(spec, n_seq_max=n_seq_max, layers=recurrent, backend=chosen) if recurrent else None
    if attention_part is not None and recurrent_part is not None:
        return HybridMemory(attention_part, recurrent_part)
    memory = attention_part or recurrent_part
    assert memory is not None
    return memory


def _held_layers(spec: MemorySpec, layers: Iterable[int] | None) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(len(spec.layers)))
    held = tuple(layers)
    for layer in held:
        if not isinstance(layer, int) or not 0 <= layer < len(spec.layers):
            raise InvalidLayer(f"layer {layer!r} is not a layer of this spec (0 .. {len(spec.layers) - 1})")
    if len(set(held)) != len(held):
        raise InvalidLayer(f"layers {list(held)} names a layer twice")
    return tuple(sorted(held))
