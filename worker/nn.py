"""The small pieces every architecture shares: norms, activations, and checked weight loading.
Functions take NumPy or CuPy arrays and compute in float32."""

from __future__ import annotations

from typing import Any

import numpy as np

from statemesh.memory import Backend
from statemesh.worker.errors import MissingTensor, ShapeMismatch


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
    xp = xp_of(x)
    return x / (xp.float32(1) + xp.exp(-x))


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
    """Checkpoint tensors by name, checked against the config's shapes, then put on the backend."""

    def __init__(self, tensors: dict[str, np.ndarray], backend: Backend):
        self.tensors, self.backend = tensors, backend

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise MissingTensor(f"the checkpoint has no tensor {name!r}")
        t = self.tensors[name]
        if t.shape != shape:
            raise ShapeMismatch(f"tensor {name!r} has shape {t.shape}; the config implies {shape}")
        return t

    def put(self, t: np.ndarray) -> Any:
        return self.backend.asarray(np.ascontiguousarray(t, dtype=np.float32))
