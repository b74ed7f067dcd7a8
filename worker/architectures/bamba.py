"""Bamba: a hybrid of Mamba-2 layers and attention layers, over the hybrid memory.

Per layer, top to bottom:
    h = rmsnorm(x) * w_in_norm
    x = x + mixer(h)            a Mamba-2 mixer (recurrent state), or attention (KV cache) with
                                RoPE on the first partial_rotary_factor of each head
    h = rmsnorm(x) * w_mlp_norm
    x = x + (silu(h Wgate) * (h Wup)) Wdown

Symbols: n rows, E hidden size, H / Hkv heads, D head dim, F intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, Backend, MemorySpec, MicroBatch
from statemesh.worker.architectures.ssm import Mamba2Dims, Mamba2Mixer, json_float
from statemesh.worker.attention import attend
from statemesh.worker.config import ModelConfig
from statemesh.worker.model import Model
from statemesh.worker.nn import Weights, rms_norm, silu
from statemesh.worker.rope import Rope
from statemesh.worker.tokenizer import Tokenizer


@dataclass(frozen=True)
class AttentionMixer:
    w_qkv: Any  # [E, (H + 2*Hkv)*D]
    wo: Any  # [H*D, E]


@dataclass(frozen=True)
class HybridLayer:
    norm_in: Any  # [E]
    mixer: Mamba2Mixer | AttentionMixer
    norm_mlp: Any  # [E]
    w_gate_up: Any  # [E, 2F]
    w_down: Any  # [F, E]


def attention_layers(raw: dict[str, Any], n_layers: int) -> set[int]:
    """Which layers attend: `attn_layer_indices`, or the older `layers_block_type` list."""
    if raw.get("attn_layer_indices") is not None:
        return {int(i) for i in raw["attn_layer_indices"]}
    types = raw.get("layers_block_type") or ["mamba"] * n_layers
    return {i for i, t in enumerate(types) if t == "attention"}


class BambaModel(Model):
    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], tokenizer: Tokenizer, backend: Backend):
        self.config, self.tokenizer, self.backend = config, tokenizer, backend
        raw, c = config.extra, config
        w = Weights(tensors, backend)
        embedding = w.get("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        self.embedding = w.put(embedding)
        tied = c.tie_word_embeddings or "lm_head.weight" not in tensors
        self.lm_head_t = w.put((embedding if tied else w.get("lm_head.weight", (c.vocab_size, c.hidden_size))).T)
        self.final_norm = w.put(w.get("model.final_layernorm.weight", (c.hidden_size,)))
        low, high = raw.get("time_step_limit", (0.0, float("inf")))
        self.dims = Mamba2Dims(
            n_heads=int(raw["mamba_n_heads"]), head_width=int(raw["mamba_d_head"]), groups=int(raw["mamba_n_groups"]),
            n_state=int(raw["mamba_d_state"]), conv_k=int(raw["mamba_d_conv"]), eps=c.rms_norm_eps,
            dt_limit=(json_float(low), json_float(high)),
        )  # fmt: skip
        attending = attention_layers(raw, c.n_layers)
        self.layers = [self._layer(w, i, i in attending) for i in range(c.n_layers)]
        rope = raw.get("rope_parameters") or {}
        rotary = int(c.head_dim * float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))))
        self.rope = Rope.build(c.head_dim, c.rope_theta, c.rope_scaling, rotary_dim=rotary)
        self.scale = c.head_dim**-0.5

    def _layer(self, w: Weights, i: int, attends: bool) -> HybridLayer:
        c = self.config
        p = f"model.layers.{i}."
        e, f = c.hidden_size, c.intermediate_size
        mixer: Mamba2Mixer | AttentionMixer
        if attends:
            q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            qkv = [
                w.get(p + f"self_attn.{n}_proj.weight", (d, e)) for n, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))
            ]
            mixer = AttentionMixer(
                w_qkv=w.put(np.concatenate(qkv).T), wo=w.put(w.get(p + "self_attn.o_proj.weight", (e, q_dim)).T)
            )
        else:
            mixer = Mamba2Mixer.load(w, p + "mamba.", e, self.dims)
        gate_up = [w.get(p + f"feed_forward.{n}_proj.weight", (f, e)) for n in ("gate", "up")]
        return HybridLayer(
            norm_in=w.put(w.get(p + "input_layernorm.weight", (e,))),
            mixer=mixer,
            norm_mlp=w.put(w.get(p + "pre_ff_layernorm.weight", (e,))),
            w_gate_up=w.put(np.concatenate(gate_up).T),
            w_down=w.put(w.get(p + "feed_forward.down_proj.weight", (e, f)).T),
        )

    def memory_spec(self) -> MemorySpec:
        c = self.config
        attention = AttentionSpec(c.n_kv_heads, c.head_dim)
        layers = tuple(
            layer.mixer.state_spec if isinstance(layer.mixer, Mamba2Mixer) else attention for layer in self.layers
        )
        return MemorySpec(layers, model=c.name or c.architecture)

    def k_shift(self, layer: int, k: Any, delta: Any) -> Any:
        return self.rope.k_shift(layer, k, delta)

    def embed(self, tokens: np.ndarray) -> Any:
        return self.embedding[self.backend.index(tokens)]

    def prepare(self, ub: MicroBatch) -> tuple[Any, Any]:
        return self.rope.cos_sin(ub.positions, self.backend.xp)

    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any) -> Any:
        c, w = self.config, self.layers[layer]
        h = rms_norm(x, w.norm_in, c.rms_norm_eps)
        if isinstance(w.mixer, Mamba2Mixer):
            s, t = len(ub.seqs), ub.n_seq_tokens
            assert t is not None, "recurrent layers run on equal-split micro-batches"
            out, conv_state, ssm_state = w.mixer(h.reshape(s, t, -1), *ub.state(layer))  # rows as [S, T, E]
            ub.store_state(layer, conv_state, ssm_state)
            x = x + out.reshape(x.shape)
        else:
            x = x + self._attention(layer, w.mixer, h, ub, shared)
        h = rms_norm(x, w.norm_mlp, c.rms_norm_eps)
        gate_up = h @ w.w_gate_up  # [n, E] @ [E, 2F] -> [n, 2F]
        f = c.intermediate_size
        return x + (silu(gate_up[:, :f]) * gate_up[:, f:]) @ w.w_down  # [n, F] @ [F, E] -> [n, E]

    def _attention(self, layer: int, w: AttentionMixer, h: Any, ub: MicroBatch, shared: Any) -> Any:
        c = self.config
        n, q_dim, kv_dim = h.shape[0], c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        qkv = h @ w.w_qkv  # [n, E] @ [E, (H+2Hkv)*D] -> [n, (H+2Hkv)*D]
        q = qkv[:, :q_dim].reshape(n, c.n_heads, c.head_dim)  # [n, H, D]
        k = qkv[:, q_dim : q_dim + kv_dim].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        v = qkv[:, q_dim + kv_dim :].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        cos, sin = shared
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        ub.store_kv(layer, k, v)
        o = attend(q, ub, layer, self.scale)  # [n, H, D]
        return o.reshape(n, -1) @ w.wo  # [n, H*D] @ [H*D, E] -> [n, E]

    def head(self, x: Any) -> Any:
        return rms_norm(x, self.final_norm, self.config.rms_norm_eps) @ self.lm_head_t
