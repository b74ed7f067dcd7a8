"""What each layer of a model needs from memory, as frozen specs with derived sizes.

A model builds one `MemorySpec` from its config: `layers[i]` is the spec of global layer `i`
(`AttentionSpec`, `RecurrentSpec`, or `None` for a layer that keeps no state).

Worked example, SmolLM2-135M (30 layers, 3 KV heads, head dim 64, float32):
    AttentionSpec(3, 64).elements_per_token == 2 * 3 * 64 == 384      # K and V
    MemorySpec([AttentionSpec(3, 64)] * 30).bytes_per_token == 30 * 384 * 4 == 46_080
so 4,096 tokens of one sequence hold 4096 * 46_080 bytes ~= 189 MB.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from statemesh.memory.errors import InvalidInput

DTYPES = {"float32": 4, "float16": 2}


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInput(f"{name} must be a positive integer, got {value!r}")


def _shape(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not value:
        raise InvalidInput(f"{name} must be a non-empty tuple of positive integers, got {value!r}")
    for i, d in enumerate(value):
        _positive(f"{name}[{i}]", d)
    return tuple(value)


@dataclass(frozen=True)
class AttentionSpec:
    """An attention layer: keys `[n_kv_heads, head_dim]` and values `[n_kv_heads, v_head_dim]` per
    token. `window` is the sliding window in tokens (a query at position p sees keys at positions
    > p - window), `None` for full attention."""

    n_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        _positive("n_kv_heads", self.n_kv_heads)
        _positive("head_dim", self.head_dim)
        if self.v_head_dim is not None:
            _positive("v_head_dim", self.v_head_dim)
        if self.window is not None:
            _positive("window", self.window)

    @property
    def v_dim(self) -> int:
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    @property
    def k_shape(self) -> tuple[int, int]:
        return (self.n_kv_heads, self.head_dim)

    @property
    def v_shape(self) -> tuple[int, int]:
        return (self.n_kv_heads, self.v_dim)

    @property
    def elements_per_token(self) -> int:
        return self.n_kv_heads * (self.head_dim + self.v_dim)


@dataclass(frozen=True)
class RecurrentSpec:
    """A recurrent layer: per sequence, a rolling convolution state of `conv_shape` and an SSM (or
    WKV) state of `ssm_shape`, whatever the sequence's length."""

    conv_shape: tuple[int, ...]
    ssm_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_shape", _shape("conv_shape", self.conv_shape))
        object.__setattr__(self, "ssm_shape", _shape("ssm_shape", self.ssm_shape))

    @property
    def elements_per_sequence(self) -> int:
        return math.prod(self.conv_shape) + math.prod(self.ssm_shape)


LayerSpec = AttentionSpec | RecurrentSpec | None


@dataclass(frozen=True)
class MemorySpec:
    """Every global layer's needs, the storage dtype, and a model identity for snapshots.

    `model` names the model whose state this is (e.g. a hash of its weights); it goes into the
    fingerprint, so a snapshot of one model is refused by another with the same shapes."""

    layers: tuple[LayerSpec, ...]
    dtype: str = "float32"
    model: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        for i, layer in enumerate(self.layers):
            if layer is not None and not isinstance(layer, (AttentionSpec, RecurrentSpec)):
                raise InvalidInput(f"layers[{i}] must be an AttentionSpec, a RecurrentSpec or None, got {layer!r}")
        if self.dtype not in DTYPES:
            raise InvalidInput(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.layers) if isinstance(s, AttentionSpec))

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.layers) if isinstance(s, RecurrentSpec))

    def attention(self, layer: int) -> AttentionSpec:
        spec = self.layers[layer]
        assert isinstance(spec, AttentionSpec)
        return spec

    def recurrent(self, layer: int) -> RecurrentSpec:
        spec = self.layers[layer]
        assert isinstance(spec, RecurrentSpec)
        return spec

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes one token takes across all attention layers."""
        return self.itemsize * sum(self.attention(i).elements_per_token for i in self.attention_layers)

    @property
    def bytes_per_sequence_state(self) -> int:
        """Recurrent state bytes one sequence takes across all recurrent layers."""
        return self.itemsize * sum(self.recurrent(i).elements_per_sequence for i in self.recurrent_layers)

    @property
    def fingerprint(self) -> bytes:
        """16 bytes that identify the model and every layer's shapes; the same for every pipeline
        shard of one model, since it covers all layers, not the ones a shard holds."""
        parts = [f"dtype={self.dtype}", f"model={self.model}"]
        for i, s in enumerate(self.layers):
            if isinstance(s, AttentionSpec):
                parts.append(f"{i}:attn:{s.n_kv_heads}:{s.head_dim}:{s.v_dim}:{s.window}")
            elif isinstance(s, RecurrentSpec):
                parts.append(f"{i}:rec:{s.conv_shape}:{s.ssm_shape}")
            else:
                parts.append(f"{i}:none")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).digest()
