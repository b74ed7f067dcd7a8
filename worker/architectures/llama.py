"""The Llama family: Llama 2/3, SmolLM2, Qwen2 (q/k/v biases), Mistral (a window on every layer).

Per layer, top to bottom:
    h = rmsnorm(x) * w_attn_norm
    q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)      RoPE on q and k
    x = x + attention(q, k, v) Wo                      keys and values go through memory
    h = rmsnorm(x) * w_mlp_norm
    x = x + (silu(h Wgate) * (h Wup)) Wdown

Symbols: n rows of the micro-batch, E hidden size, H / Hkv query / key-value heads, D head dim,
F intermediate size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, Backend, MemorySpec, MicroBatch
from statemesh.worker.attention import attend
from statemesh.worker.config import ModelConfig
from statemesh.worker.errors import MissingTensor, ShapeMismatch
from statemesh.worker.model import Model
from statemesh.worker.rope import Rope
from statemesh.worker.tokenizer import Tokenizer


@dataclass(frozen=True)
class LlamaLayer:
    attn_norm: Any  # [E]
    wq: Any  # [E, H*D]   (transposed from the checkpoint's [out, in], so h @ w)
    wk: Any  # [E, Hkv*D]
    wv: Any  # [E, Hkv*D]
    bq: Any | None  # [H*D] (Qwen2)
    bk: Any | None
    bv: Any | None
    wo: Any  # [H*D, E]
    mlp_norm: Any  # [E]
    w_gate: Any  # [E, F]
    w_up: Any  # [E, F]
    w_down: Any  # [F, E]


def rms_norm(x: Any, w: Any, eps: float) -> Any:
    """x / sqrt(mean(x^2) + eps) * w over the last axis, in float32."""
    xp = np if isinstance(x, np.ndarray) else __import__("cupy")
    return x / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + xp.float32(eps)) * w


def silu(x: Any) -> Any:
    xp = np if isinstance(x, np.ndarray) else __import__("cupy")
    return x / (xp.float32(1) + xp.exp(-x))


class LlamaModel(Model):
    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], tokenizer: Tokenizer, backend: Backend):
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        weights = _Weights(tensors, backend)
        c = config
        self.embedding = weights.take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))  # [V, E]
        self.final_norm = weights.take("model.norm.weight", (c.hidden_size,))
        if c.tie_word_embeddings or "lm_head.weight" not in tensors:
            self.lm_head_t = self.embedding.T  # [E, V], a view: tied embeddings
        else:
            self.lm_head_t = weights.take("lm_head.weight", (c.vocab_size, c.hidden_size), transpose=True)
        self.layers = [self._layer(weights, i) for i in range(c.n_layers)]
        self.rope = Rope.build(c.head_dim, c.rope_theta, c.rope_scaling)
        self.scale = c.head_dim**-0.5

    def _layer(self, w: _Weights, i: int) -> LlamaLayer:
        c = self.config
        p = f"model.layers.{i}."
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        bias = c.attention_bias
        return LlamaLayer(
            attn_norm=w.take(p + "input_layernorm.weight", (c.hidden_size,)),
            wq=w.take(p + "self_attn.q_proj.weight", (q_dim, c.hidden_size), transpose=True),
            wk=w.take(p + "self_attn.k_proj.weight", (kv_dim, c.hidden_size), transpose=True),
            wv=w.take(p + "self_attn.v_proj.weight", (kv_dim, c.hidden_size), transpose=True),
            bq=w.take(p + "self_attn.q_proj.bias", (q_dim,)) if bias else None,
            bk=w.take(p + "self_attn.k_proj.bias", (kv_dim,)) if bias else None,
            bv=w.take(p + "self_attn.v_proj.bias", (kv_dim,)) if bias else None,
            wo=w.take(p + "self_attn.o_proj.weight", (c.hidden_size, q_dim), transpose=True),
            mlp_norm=w.take(p + "post_attention_layernorm.weight", (c.hidden_size,)),
            w_gate=w.take(p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size), transpose=True),
            w_up=w.take(p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size), transpose=True),
            w_down=w.take(p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size), transpose=True),
        )

    def memory_spec(self) -> MemorySpec:
        c = self.config
        layer = AttentionSpec(c.n_kv_heads, c.head_dim, window=c.sliding_window)
        return MemorySpec(tuple(layer for _ in range(c.n_layers)), model=c.name or c.architecture)

    def k_shift(self, layer: int, k: Any, delta: Any) -> Any:
        return self.rope.k_shift(layer, k, delta)

    def embed(self, tokens: np.ndarray) -> Any:
        return self.embedding[self.backend.index(tokens)]  # [n] -> [n, E]

    def block(self, layer: int, x: Any, ub: MicroBatch) -> Any:
        c, w = self.config, self.layers[layer]
        n = x.shape[0]
        h = rms_norm(x, w.attn_norm, c.rms_norm_eps)
        q = h @ w.wq  # [n, E] @ [E, H*D] -> [n, H*D]
        k = h @ w.wk  # [n, E] @ [E, Hkv*D] -> [n, Hkv*D]
        v = h @ w.wv
        if w.bq is not None:
            q, k, v = q + w.bq, k + w.bk, v + w.bv
        cos, sin = self.rope.cos_sin(ub.positions, self.backend.xp)
        q = self.rope.apply(q.reshape(n, c.n_heads, c.head_dim), cos, sin)  # [n, H, D]
        k = self.rope.apply(k.reshape(n, c.n_kv_heads, c.head_dim), cos, sin)  # [n, Hkv, D]
        ub.store_kv(layer, k, v.reshape(n, c.n_kv_heads, c.head_dim))
        o = attend(q, ub, layer, self.scale, window=c.sliding_window)  # [n, H, D]
        x = x + o.reshape(n, -1) @ w.wo  # [n, H*D] @ [H*D, E] -> [n, E]
        h = rms_norm(x, w.mlp_norm, c.rms_norm_eps)
        x = x + (silu(h @ w.w_gate) * (h @ w.w_up)) @ w.w_down  # [n, F] @ [F, E] -> [n, E]
        return x

    def head(self, x: Any) -> Any:
        return rms_norm(x, self.final_norm, self.config.rms_norm_eps) @ self.lm_head_t  # [n, E] @ [E, V]


class _Weights:
    """Checkpoint tensors by name, checked against the config's shapes and put on the backend."""

    def __init__(self, tensors: dict[str, np.ndarray], backend: Backend):
        self.tensors, self.backend = tensors, backend

    def take(self, name: str, shape: tuple[int, ...], transpose: bool = False) -> Any:
        if name not in self.tensors:
            raise MissingTensor(f"the checkpoint has no tensor {name!r}")
        t = self.tensors[name]
        if t.shape != shape:
            raise ShapeMismatch(f"tensor {name!r} has shape {t.shape}; the config implies {shape}")
        t = np.ascontiguousarray(t.T if transpose else t, dtype=np.float32)
        return self.backend.asarray(t)
