"""Rotary position embeddings, Hugging Face layout: dimension d is paired with d + rotary_dim/2.

    inv_freq[i] = theta ** (-2i / rotary_dim)            i = 0 .. rotary_dim/2 - 1
    angle[t, i] = position[t] * inv_freq[i]
    x' = x * cos(angle) + rotate_half(x) * sin(angle)    rotate_half(x1, x2) = (-x2, x1)

Rotations add: rotating by p and then by delta equals rotating by p + delta, which is how stored keys
are re-rotated when positions move (`k_shift`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from statemesh.worker.errors import ModelError
from statemesh.worker.kernels.nn import xp_of


@dataclass(frozen=True)
class Rope:
    inv_freq: np.ndarray  # [rotary_dim / 2] float64
    rotary_dim: int
    attention_factor: float = 1.0

    @staticmethod
    def build(head_dim: int, theta: float, scaling: dict[str, Any], rotary_dim: int | None = None) -> Rope:
        rotary_dim = rotary_dim or head_dim
        inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
        kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
        if kind == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, scaling)
        elif kind != "default":
            raise ModelError(f"RoPE scaling {kind!r} is not supported (supported: default, linear, llama3)")
        return Rope(inv_freq, rotary_dim)

    def cos_sin(self, positions: Any, xp: Any) -> tuple[Any, Any]:
        """cos, sin [T, rotary_dim/2] float32 for positions [T], computed in float32 as the
        Hugging Face reference does (so long positions round the same way)."""
        inv_freq = self.inv_freq.astype(np.float32)
        angle = np.asarray(positions).astype(np.float32)[:, None] * inv_freq[None, :]
        return xp.asarray(np.cos(angle)), xp.asarray(np.sin(angle))

    def apply(self, x: Any, cos: Any, sin: Any) -> Any:
        """x [T, H, D] rotated in its first rotary_dim dims; cos/sin [T, rotary_dim/2]."""
        half = self.rotary_dim // 2
        x1, x2 = x[..., :half], x[..., half : self.rotary_dim]
        c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, half], broadcast over heads
        rotated = [x1 * c - x2 * s, x2 * c + x1 * s]
        if self.rotary_dim < x.shape[-1]:
            rotated.append(x[..., self.rotary_dim :])
        xp = xp_of(x)
        return xp.concatenate(rotated, axis=-1)

    def k_shift(self, layer: int, k: Any, delta: Any) -> Any:
        """Re-rotate stored keys [n, Hkv, D] whose positions moved by delta [n]."""
        xp = xp_of(k)
        cos, sin = self.cos_sin(xp.asnumpy(delta) if xp is not np else delta, xp)
        return self.apply(k, cos, sin)


def _llama3(inv_freq: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept,
    a smooth blend between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return np.where(middle, blended, out)
