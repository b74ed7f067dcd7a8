"""Falcon-H1: attention and a Mamba-2 mixer side by side in every layer, with muP multipliers.

Per layer, top to bottom:
    h = rmsnorm(x) * w_in_norm
    x = x + m_ssm_out * mamba2(m_ssm_in * h)            in_proj outputs scaled per section (muP)
          + m_attn_out * attention(m_attn_in * h)        keys scaled by m_key, RoPE on q and k
    h = rmsnorm(x) * w_mlp_norm
    x = x + m_down * ((silu(m_gate * h Wgate) * (h Wup)) Wdown)
Embeddings are scaled by m_embed and logits by m_lm_head.

Each model layer keeps two kinds of state, so it uses two memory layers: 2i for its KV cache and
2i + 1 for its recurrent state (`memory_layers`).

Symbols: n rows, E hidden size, H / Hkv heads, D head dim, F intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, Backend, MemorySpec, MicroBatch
from statemesh.worker.architectures.model import CountedWeights, EndWeights, Model
from statemesh.worker.architectures.ssm import Mamba2Dims, Mamba2Mixer
from statemesh.worker.kernels.attention import attend
from statemesh.worker.kernels.nn import Weights, rms_norm, silu
from statemesh.worker.kernels.rope import Rope
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.tensor_selection import layer_range
from statemesh.worker.loading.tokenizer import Tokenizer


@dataclass(frozen=True)
class FalconH1Layer:
    norm_in: Any  # [E]
    mamba: Mamba2Mixer
    w_qkv: Any  # [E, (H + 2*Hkv)*D]
    wo: Any  # [H*D, E]
    norm_mlp: Any  # [E]
    w_gate: Any  # [E, F]
    w_up: Any  # [E, F]
    w_down: Any  # [F, E]


def mup_vector(raw: dict[str, Any], dims: Mamba2Dims) -> np.ndarray:
    """One multiplier per in_proj output: z, x, B, C, dt sections (config.ssm_multipliers)."""
    i, gn, h = dims.inner, dims.groups * dims.n_state, dims.n_heads
    sizes = [i, i, gn, gn, h]
    factors = [float(m) for m in raw.get("ssm_multipliers", [1.0] * 5)]
    return np.concatenate([np.full(n, f, dtype=np.float32) for n, f in zip(sizes, factors, strict=True)])


class FalconH1Model(Model):
    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, np.ndarray],
        tokenizer: Tokenizer,
        backend: Backend,
        layers: range | None = None,
    ):
        self.config, self.tokenizer, self.backend = config, tokenizer, backend
        self.held = layer_range(layers, config.n_layers)
        raw, c = config.extra, config
        w = CountedWeights(tensors, backend)
        self.ends = EndWeights.load(
            w, c, self.held, "model.embed_tokens.weight", "model.final_layernorm.weight", c.tie_word_embeddings
        )
        self.m = {
            name: np.float32(raw.get(name, 1.0))
            for name in ("embedding_multiplier", "lm_head_multiplier", "key_multiplier", "attention_in_multiplier",
                         "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier")
        }  # fmt: skip
        self.m_gate, self.m_down = (np.float32(v) for v in raw.get("mlp_multipliers", [1.0, 1.0]))
        inner = int(raw.get("mamba_d_ssm") or int(raw["mamba_expand"] * c.hidden_size))
        self.dims = Mamba2Dims.from_mamba_config(raw, c.rms_norm_eps, head_width=inner // int(raw["mamba_n_heads"]))
        mup = mup_vector(raw, self.dims)
        self.layers = {i: self._layer(w, raw, i, mup) for i in self.held}
        self.weight_bytes = w.nbytes
        self.rope = Rope.build(c.head_dim, c.rope_theta, c.rope_scaling)
        self.scale = c.head_dim**-0.5

    def _layer(self, w: Weights, raw: dict[str, Any], i: int, mup: np.ndarray) -> FalconH1Layer:
        c = self.config
        p = f"model.layers.{i}."
        e, f = c.hidden_size, c.intermediate_size
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        mamba = Mamba2Mixer.load(
            w, p + "mamba.", e, self.dims, norm=bool(raw.get("mamba_rms_norm", False)),
            norm_before_gate=bool(raw.get("mamba_norm_before_gate", True)), in_scale=mup,
        )  # fmt: skip
        return FalconH1Layer(
            norm_in=w.put(w.get(p + "input_layernorm.weight", (e,))),
            mamba=mamba,
            w_qkv=w.qkv(p + "self_attn.", e, q_dim, kv_dim),
            wo=w.put(w.get(p + "self_attn.o_proj.weight", (e, q_dim)).T),
            norm_mlp=w.put(w.get(p + "pre_ff_layernorm.weight", (e,))),
            w_gate=w.put(w.get(p + "feed_forward.gate_proj.weight", (f, e)).T),
            w_up=w.put(w.get(p + "feed_forward.up_proj.weight", (f, e)).T),
            w_down=w.put(w.get(p + "feed_forward.down_proj.weight", (e, f)).T),
        )

    def memory_layers(self, layers: range) -> list[int]:
        return [m for i in layers for m in (2 * i, 2 * i + 1)]

    def memory_spec(self) -> MemorySpec:
        c = self.config
        attention = AttentionSpec(c.n_kv_heads, c.head_dim)
        layers = [spec for _ in range(c.n_layers) for spec in (attention, self.dims.state_spec)]
        return MemorySpec(tuple(layers), model=c.name or c.architecture)

    def k_shift(self, layer: int, k: Any, delta: Any) -> Any:
        return self.rope.k_shift(layer, k, delta)

    def embed(self, tokens: np.ndarray) -> Any:
        return self.ends.token_embedding()[self.backend.index(tokens)] * self.m["embedding_multiplier"]

    def prepare(self, ub: MicroBatch) -> tuple[Any, Any]:
        return self.rope.cos_sin(ub.positions, self.backend.xp)

    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any, keep: Any = None) -> Any:
        c, w, m = self.config, self.layers[layer], self.m
        kv_layer, state_layer = 2 * layer, 2 * layer + 1
        h = rms_norm(x, w.norm_in, c.rms_norm_eps)
        s, t = len(ub.seqs), ub.n_seq_tokens
        assert t is not None, "recurrent layers run on equal-split micro-batches"
        ssm_in = (h * m["ssm_in_multiplier"]).reshape(s, t, -1)  # rows as [S, T, E]
        ssm_out, conv_state, ssm_state = w.mamba(ssm_in, *ub.state(state_layer))
        ub.store_state(state_layer, conv_state, ssm_state)
        attn_out = self._attention(kv_layer, w, h * m["attention_in_multiplier"], ub, shared)
        x = x + ssm_out.reshape(x.shape) * m["ssm_out_multiplier"] + attn_out * m["attention_out_multiplier"]
        if keep is not None:
            x = x[keep]
        h = rms_norm(x, w.norm_mlp, c.rms_norm_eps)
        y = silu((h @ w.w_gate) * self.m_gate) * (h @ w.w_up)  # [n, F]
        return x + (y @ w.w_down) * self.m_down  # [n, F] @ [F, E] -> [n, E]

    def _attention(self, kv_layer: int, w: FalconH1Layer, h: Any, ub: MicroBatch, shared: Any) -> Any:
        c = self.config
        n, q_dim, kv_dim = h.shape[0], c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        qkv = h @ w.w_qkv  # [n, E] @ [E, (H+2Hkv)*D] -> [n, (H+2Hkv)*D]
        q = qkv[:, :q_dim].reshape(n, c.n_heads, c.head_dim)  # [n, H, D]
        k = qkv[:, q_dim : q_dim + kv_dim].reshape(n, c.n_kv_heads, c.head_dim) * self.m["key_multiplier"]
        v = qkv[:, q_dim + kv_dim :].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        cos, sin = shared
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        ub.store_kv(kv_layer, k, v)
        o = attend(q, ub, kv_layer, self.scale, threads=self.threads)  # [n, H, D]
        return o.reshape(n, -1) @ w.wo  # [n, H*D] @ [H*D, E] -> [n, E]

    def head(self, x: Any) -> Any:
        final_norm, lm_head = self.ends.norm_and_head()
        logits = lm_head(rms_norm(x, final_norm, self.config.rms_norm_eps), self.row_blocks)
        return logits * self.m["lm_head_multiplier"]
