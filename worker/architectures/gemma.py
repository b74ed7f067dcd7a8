"""Gemma 2 and Gemma 3 (text): interleaved sliding-window and full attention layers.

Per layer, top to bottom (norms are RMSNorm scaled by (1 + w)):
    h = norm_in(x)
    q, k, v = h Wq, h Wk, h Wv                  Gemma 3: q, k = norm_q(q), norm_k(k) per head
    RoPE on q and k                             Gemma 3: its own base for windowed layers
    a = attention(q, k, v) Wo                   scaled by query_pre_attn_scalar^-1/2; Gemma 2
                                                soft-caps the scores; windowed layers see W keys
    x = x + norm_post_attn(a)
    h = norm_pre_mlp(x)
    x = x + norm_post_mlp((gelu_tanh(h Wgate) * (h Wup)) Wdown)
Embeddings are multiplied by sqrt(hidden); Gemma 2 soft-caps the final logits.

Symbols: n rows, E hidden size, H / Hkv heads, D head dim, F intermediate size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, Backend, MemorySpec, MicroBatch
from statemesh.worker.architectures.model import CountedWeights, EndWeights, Model
from statemesh.worker.errors import ModelError
from statemesh.worker.kernels.attention import attend
from statemesh.worker.kernels.nn import Weights, gelu_tanh, rms_norm, softcap
from statemesh.worker.kernels.rope import Rope
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.tensor_selection import layer_range
from statemesh.worker.loading.tokenizer import Tokenizer


@dataclass(frozen=True)
class GemmaLayer:
    window: int | None  # sliding window of this layer; None for full attention
    norm_in: Any  # [E]
    w_qkv: Any  # [E, (H + 2*Hkv)*D]
    q_norm: Any | None  # [D] (Gemma 3)
    k_norm: Any | None  # [D] (Gemma 3)
    wo: Any  # [H*D, E]
    norm_post_attn: Any  # [E]
    norm_pre_mlp: Any  # [E]
    w_gate_up: Any  # [E, 2F]
    w_down: Any  # [F, E]
    norm_post_mlp: Any  # [E]


def layer_windows(raw: dict[str, Any], n_layers: int) -> list[int | None]:
    """Which layers are windowed: `layer_types` when the config lists them, else the older rules
    (Gemma 2 alternates starting with a windowed layer; Gemma 3 makes every sliding_window_pattern-th
    layer full)."""
    window = int(raw["sliding_window"])
    types = raw.get("layer_types")
    if types is None:
        pattern = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 2)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    return [window if t == "sliding_attention" else None for t in types]


class GemmaModel(Model):
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
        raw = config.extra
        self.is_gemma3 = config.architecture == "gemma3"
        self.attn_softcap = raw.get("attn_logit_softcapping")
        self.final_softcap = raw.get("final_logit_softcapping")
        self.scale = float(raw.get("query_pre_attn_scalar") or config.head_dim) ** -0.5
        self.embed_scale = np.float32(config.hidden_size**0.5)
        w = CountedWeights(tensors, backend)
        c = config
        self.ends = EndWeights.load(w, c, self.held, "model.embed_tokens.weight", "model.norm.weight", tied=True)
        self.windows = layer_windows(raw, c.n_layers)  # every layer's, for the whole model's memory spec
        self.layers = {i: self._layer(w, i, self.windows[i]) for i in self.held}
        self.weight_bytes = w.nbytes
        self.rope_full = Rope.build(c.head_dim, c.rope_theta, c.rope_scaling)
        self.rope_windowed = Rope.build(c.head_dim, self._local_theta(raw), {})

    def _local_theta(self, raw: dict[str, Any]) -> float:
        if not self.is_gemma3:
            return self.config.rope_theta  # Gemma 2: one base for every layer
        per_type = raw.get("rope_parameters") or {}
        if "sliding_attention" in per_type:
            return float(per_type["sliding_attention"]["rope_theta"])
        if "rope_local_base_freq" in raw:
            return float(raw["rope_local_base_freq"])
        raise ModelError("a Gemma 3 config needs rope_parameters.sliding_attention or rope_local_base_freq")

    def _layer(self, w: Weights, i: int, window: int | None) -> GemmaLayer:
        c = self.config
        p = f"model.layers.{i}."
        e, f, d = c.hidden_size, c.intermediate_size, c.head_dim
        q_dim, kv_dim = c.n_heads * d, c.n_kv_heads * d
        gate_up = [w.get(p + f"mlp.{n}_proj.weight", (f, e)) for n in ("gate", "up")]

        def norm(name: str, size: int = e) -> Any:
            return w.put(w.get(p + name, (size,)))

        return GemmaLayer(
            window=window,
            norm_in=norm("input_layernorm.weight"),
            w_qkv=w.qkv(p + "self_attn.", e, q_dim, kv_dim),
            q_norm=norm("self_attn.q_norm.weight", d) if self.is_gemma3 else None,
            k_norm=norm("self_attn.k_norm.weight", d) if self.is_gemma3 else None,
            wo=w.put(w.get(p + "self_attn.o_proj.weight", (e, q_dim)).T),
            norm_post_attn=norm("post_attention_layernorm.weight"),
            norm_pre_mlp=norm("pre_feedforward_layernorm.weight"),
            w_gate_up=w.put(np.concatenate(gate_up).T),
            w_down=w.put(w.get(p + "mlp.down_proj.weight", (e, f)).T),
            norm_post_mlp=norm("post_feedforward_layernorm.weight"),
        )

    def memory_spec(self) -> MemorySpec:
        c = self.config
        layers = tuple(AttentionSpec(c.n_kv_heads, c.head_dim, window=window) for window in self.windows)
        return MemorySpec(layers, model=c.name or c.architecture)

    def _rope(self, layer: int) -> Rope:
        return self.rope_windowed if self.windows[layer] is not None else self.rope_full

    def k_shift(self, layer: int, k: Any, delta: Any) -> Any:
        return self._rope(layer).k_shift(layer, k, delta)

    def embed(self, tokens: np.ndarray) -> Any:
        return self.ends.token_embedding()[self.backend.index(tokens)] * self.embed_scale  # [n, E]

    def prepare(self, ub: MicroBatch) -> dict[int, tuple[Any, Any]]:
        xp = self.backend.xp
        return {id(r): r.cos_sin(ub.positions, xp) for r in (self.rope_full, self.rope_windowed)}

    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any, keep: Any = None) -> Any:
        c, w, eps = self.config, self.layers[layer], self.config.rms_norm_eps
        n, q_dim, kv_dim = x.shape[0], c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        h = rms_norm(x, w.norm_in, eps, plus_one=True)
        qkv = h @ w.w_qkv  # [n, E] @ [E, (H+2Hkv)*D] -> [n, (H+2Hkv)*D]
        q = qkv[:, :q_dim].reshape(n, c.n_heads, c.head_dim)  # [n, H, D]
        k = qkv[:, q_dim : q_dim + kv_dim].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        v = qkv[:, q_dim + kv_dim :].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        if w.q_norm is not None:
            q, k = rms_norm(q, w.q_norm, eps, plus_one=True), rms_norm(k, w.k_norm, eps, plus_one=True)
        rope = self._rope(layer)
        cos, sin = shared[id(rope)]
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        ub.store_kv(layer, k, v)
        o = attend(
            q, ub, layer, self.scale, window=w.window, softcap=self.attn_softcap, threads=self.threads
        )  # [n, H, D]
        if keep is not None:
            x, o, n = x[keep], o[keep], len(keep)
        x = x + rms_norm(o.reshape(n, o.shape[1] * o.shape[2]) @ w.wo, w.norm_post_attn, eps, plus_one=True)
        h = rms_norm(x, w.norm_pre_mlp, eps, plus_one=True)
        gate_up = h @ w.w_gate_up  # [n, E] @ [E, 2F] -> [n, 2F]
        f = c.intermediate_size
        mlp = (gelu_tanh(gate_up[:, :f]) * gate_up[:, f:]) @ w.w_down  # [n, F] @ [F, E] -> [n, E]
        return x + rms_norm(mlp, w.norm_post_mlp, eps, plus_one=True)

    def head(self, x: Any) -> Any:
        final_norm, lm_head = self.ends.norm_and_head()
        logits = lm_head(rms_norm(x, final_norm, self.config.rms_norm_eps, plus_one=True), self.row_blocks)
        return logits if self.final_softcap is None else softcap(logits, float(self.final_softcap))
