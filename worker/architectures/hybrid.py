"""Hybrids of state space layers and attention layers, over the hybrid memory:
- Bamba: Mamba-2 + attention with RoPE on part of each head, SwiGLU MLPs;
- Jamba: Mamba-1 with dt/B/C norms + attention without positions, experts in every other layer;
- GraniteMoeHybrid (Granite 4): Mamba-2 + attention (RoPE when the config asks), routed experts
  plus a shared MLP, and multipliers on the embeddings, residuals, attention scores and logits.

Per layer, top to bottom (m_res = residual multiplier, 1 but for Granite):
    h = rmsnorm(x) * w_in_norm
    x = x + m_res * mixer(h)    a state space mixer (recurrent state) or attention (KV cache)
    h = rmsnorm(x) * w_mlp_norm
    x = x + m_res * ffn(h)      a SwiGLU MLP, a mixture of SwiGLU experts, or both

Symbols: n rows, E hidden size, H / Hkv heads, D head dim, F intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, Backend, MemorySpec, MicroBatch
from statemesh.worker.architectures.model import CountedWeights, EndWeights, Model
from statemesh.worker.architectures.ssm import Mamba1Dims, Mamba1Mixer, Mamba2Dims, Mamba2Mixer
from statemesh.worker.kernels.attention import attend
from statemesh.worker.kernels.nn import DenseMLP, MixtureOfExperts, SharedAndRouted, Weights, rms_norm
from statemesh.worker.kernels.rope import Rope
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.tensor_selection import layer_range
from statemesh.worker.loading.tokenizer import Tokenizer


@dataclass(frozen=True)
class AttentionMixer:
    w_qkv: Any  # [E, (H + 2*Hkv)*D]
    wo: Any  # [H*D, E]


@dataclass(frozen=True)
class HybridLayer:
    norm_in: Any  # [E]
    mixer: Mamba1Mixer | Mamba2Mixer | AttentionMixer
    norm_mlp: Any  # [E]
    ffn: DenseMLP | MixtureOfExperts | SharedAndRouted


@dataclass(frozen=True)
class Family:
    """Where the families differ in naming."""

    mlp_norm: str  # the norm before the feed-forward, per layer
    final_norm: str


FAMILIES = {
    "bamba": Family("pre_ff_layernorm", "model.final_layernorm.weight"),
    "jamba": Family("pre_ff_layernorm", "model.final_layernorm.weight"),
    "granitemoehybrid": Family("post_attention_layernorm", "model.norm.weight"),
}


def attention_layers(family: str, raw: dict[str, Any], n_layers: int) -> set[int]:
    """Which layers attend. Jamba: every attn_layer_period-th from attn_layer_offset; Bamba:
    `attn_layer_indices`; otherwise a list of layer types (`layer_types`, or the older
    `layers_block_type`): "attention" / "full_attention" attend, "mamba" / "linear_attention" scan."""
    if family == "jamba":
        return {i for i in range(n_layers) if i % int(raw["attn_layer_period"]) == int(raw["attn_layer_offset"])}
    if raw.get("attn_layer_indices") is not None:
        return {int(i) for i in raw["attn_layer_indices"]}
    types = raw.get("layer_types") or raw.get("layers_block_type") or []
    return {i for i, t in enumerate(types) if t in ("attention", "full_attention")}


def expert_layers(family: str, raw: dict[str, Any], n_layers: int) -> set[int]:
    """Jamba puts experts in every expert_layer_period-th layer from expert_layer_offset."""
    if family != "jamba" or int(raw.get("num_experts", 1)) <= 1:
        return set()
    return {i for i in range(n_layers) if i % int(raw["expert_layer_period"]) == int(raw["expert_layer_offset"])}


def fused_experts(w: Weights, gate_up: np.ndarray, down: np.ndarray) -> list[DenseMLP]:
    """One MLP per expert from fused tensors: gate_up [X, 2F, E] (gate rows, then up rows), down [X, E, F]."""
    return [DenseMLP(w.put(gate_up[j].T), w.put(down[j].T)) for j in range(len(gate_up))]


class HybridModel(Model):
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
        self.family = c.architecture
        self.names = FAMILIES[self.family]
        self.ends = EndWeights.load(
            w, c, self.held, "model.embed_tokens.weight", self.names.final_norm, c.tie_word_embeddings
        )
        self.embedding_multiplier = np.float32(raw.get("embedding_multiplier", 1.0))
        self.residual_multiplier = np.float32(raw.get("residual_multiplier", 1.0))
        self.logits_scaling = np.float32(raw.get("logits_scaling", 1.0))
        self.attending = attention_layers(self.family, raw, c.n_layers)
        self.state_dims = self._state_dims(raw)  # every state space layer's
        experts = expert_layers(self.family, raw, c.n_layers)
        self.layers = {i: self._layer(w, raw, i, i in self.attending, i in experts) for i in self.held}
        self.weight_bytes = w.nbytes
        self.rope: Rope | None = None  # Jamba's attention has no positions, nor Granite's by default
        if self.family == "bamba" or raw.get("position_embedding_type") == "rope":
            rope = raw.get("rope_parameters") or {}
            factor = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
            self.rope = Rope.build(c.head_dim, c.rope_theta, c.rope_scaling, rotary_dim=int(c.head_dim * factor))
        self.scale = float(raw.get("attention_multiplier") or c.head_dim**-0.5)

    def _state_dims(self, raw: dict[str, Any]) -> Mamba1Dims | Mamba2Dims:
        c = self.config
        if self.family == "jamba":
            inner = int(raw["mamba_expand"]) * c.hidden_size
            return Mamba1Dims(
                inner, int(raw["mamba_d_state"]), int(raw["mamba_dt_rank"]), int(raw["mamba_d_conv"]), c.rms_norm_eps
            )
        return Mamba2Dims.from_mamba_config(raw, c.rms_norm_eps, head_width=int(raw["mamba_d_head"]))

    def _state_mixer(self, w: Weights, m: str) -> Mamba1Mixer | Mamba2Mixer:
        if isinstance(self.state_dims, Mamba2Dims):
            return Mamba2Mixer.load(w, m, self.config.hidden_size, self.state_dims)
        return Mamba1Mixer.load(w, m, self.config.hidden_size, self.state_dims)

    def _layer(self, w: Weights, raw: dict[str, Any], i: int, attends: bool, has_experts: bool) -> HybridLayer:
        c = self.config
        p = f"model.layers.{i}."
        e = c.hidden_size
        mixer: Mamba1Mixer | Mamba2Mixer | AttentionMixer
        if attends:
            q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
            mixer = AttentionMixer(
                w_qkv=w.qkv(p + "self_attn.", e, q_dim, kv_dim),
                wo=w.put(w.get(p + "self_attn.o_proj.weight", (e, q_dim)).T),
            )
        else:
            mixer = self._state_mixer(w, p + "mamba.")
        return HybridLayer(
            norm_in=w.put(w.get(p + "input_layernorm.weight", (e,))),
            mixer=mixer,
            norm_mlp=w.put(w.get(p + f"{self.names.mlp_norm}.weight", (e,))),
            ffn=self._feed_forward(w, raw, p, has_experts),
        )

    def _feed_forward(self, w: Weights, raw: dict[str, Any], p: str, has_experts: bool) -> Any:
        if self.family == "granitemoehybrid":
            e, fs = self.config.hidden_size, int(raw["shared_intermediate_size"])
            shared = DenseMLP(
                w.put(w.get(p + "shared_mlp.input_linear.weight", (2 * fs, e)).T),  # gate rows, then up rows
                w.put(w.get(p + "shared_mlp.output_linear.weight", (e, fs)).T),
            )
            if int(raw.get("num_local_experts", 0)) == 0:
                return shared
            return SharedAndRouted(self._granite_experts(w, raw, p + "block_sparse_moe."), shared)
        if has_experts:
            return self._experts(w, raw, p + "feed_forward.")
        return self._mlp(w, p + "feed_forward.")

    def _granite_experts(self, w: Weights, raw: dict[str, Any], m: str) -> MixtureOfExperts:
        """Granite checkpoints store experts fused: input_linear [X, 2F, E], output_linear [X, E, F];
        the router keeps softmax weights of the top-k logits, i.e. renormalized."""
        e, f, x = self.config.hidden_size, self.config.intermediate_size, int(raw["num_local_experts"])
        gate_up = w.get(m + "input_linear.weight", (x, 2 * f, e))
        down = w.get(m + "output_linear.weight", (x, e, f))
        experts = fused_experts(w, gate_up, down)
        router = w.put(w.get(m + "router.layer.weight", (x, e)).T)  # [E, X]
        return MixtureOfExperts(router, experts, int(raw["num_experts_per_tok"]), renormalize=True)

    def _mlp(self, w: Weights, m: str) -> DenseMLP:
        e, f = self.config.hidden_size, self.config.intermediate_size
        gate_up = [w.get(m + f"{n}_proj.weight", (f, e)) for n in ("gate", "up")]
        return DenseMLP(w.put(np.concatenate(gate_up).T), w.put(w.get(m + "down_proj.weight", (e, f)).T))

    def _experts(self, w: Weights, raw: dict[str, Any], m: str) -> MixtureOfExperts:
        """Checkpoints name each expert's MLP (experts.{j}.gate_proj.weight, ...); transformers 5
        holds them fused in memory (experts.gate_up_proj [X, 2F, E], experts.down_proj [X, E, F]),
        which is read too."""
        e, f, x = self.config.hidden_size, self.config.intermediate_size, int(raw["num_experts"])
        if m + "experts.gate_up_proj" in w.tensors:
            gate_up = w.get(m + "experts.gate_up_proj", (x, 2 * f, e))
            down = w.get(m + "experts.down_proj", (x, e, f))
            experts = fused_experts(w, gate_up, down)
        else:
            experts = [self._mlp(w, m + f"experts.{j}.") for j in range(x)]
        router = w.put(w.get(m + "router.weight", (x, e)).T)  # [E, X]
        return MixtureOfExperts(router, experts, int(raw["num_experts_per_tok"]), renormalize=False)

    def memory_spec(self) -> MemorySpec:
        c = self.config
        attention, state = AttentionSpec(c.n_kv_heads, c.head_dim), self.state_dims.state_spec
        layers = tuple(attention if i in self.attending else state for i in range(c.n_layers))
        return MemorySpec(layers, model=c.name or c.architecture)

    def k_shift(self, layer: int, k: Any, delta: Any) -> Any:
        return k if self.rope is None else self.rope.k_shift(layer, k, delta)

    def embed(self, tokens: np.ndarray) -> Any:
        return self.ends.token_embedding()[self.backend.index(tokens)] * self.embedding_multiplier

    def prepare(self, ub: MicroBatch) -> tuple[Any, Any] | None:
        return None if self.rope is None else self.rope.cos_sin(ub.positions, self.backend.xp)

    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any, keep: Any = None) -> Any:
        c, w = self.config, self.layers[layer]
        h = rms_norm(x, w.norm_in, c.rms_norm_eps)
        if not isinstance(w.mixer, AttentionMixer):
            s, t = len(ub.seqs), ub.n_seq_tokens
            assert t is not None, "recurrent layers run on equal-split micro-batches"
            out, conv_state, ssm_state = w.mixer(h.reshape(s, t, -1), *ub.state(layer))  # rows as [S, T, E]
            ub.store_state(layer, conv_state, ssm_state)
            x = x + out.reshape(x.shape) * self.residual_multiplier
        else:
            x = x + self._attention(layer, w.mixer, h, ub, shared) * self.residual_multiplier
        if keep is not None:
            x = x[keep]
        return x + w.ffn(rms_norm(x, w.norm_mlp, c.rms_norm_eps)) * self.residual_multiplier

    def _attention(self, layer: int, w: AttentionMixer, h: Any, ub: MicroBatch, shared: Any) -> Any:
        c = self.config
        n, q_dim, kv_dim = h.shape[0], c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        qkv = h @ w.w_qkv  # [n, E] @ [E, (H+2Hkv)*D] -> [n, (H+2Hkv)*D]
        q = qkv[:, :q_dim].reshape(n, c.n_heads, c.head_dim)  # [n, H, D]
        k = qkv[:, q_dim : q_dim + kv_dim].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        v = qkv[:, q_dim + kv_dim :].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        if self.rope is not None:
            cos, sin = shared
            q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        ub.store_kv(layer, k, v)
        o = attend(q, ub, layer, self.scale, threads=self.threads)  # [n, H, D]
        return o.reshape(n, -1) @ w.wo  # [n, H*D] @ [H*D, E] -> [n, E]

    def head(self, x: Any) -> Any:
        final_norm, lm_head = self.ends.norm_and_head()
        logits = lm_head(rms_norm(x, final_norm, self.config.rms_norm_eps), self.row_blocks)
        return logits / self.logits_scaling
