"""Nemotron-H: every layer is one block, x = x + mixer(rmsnorm(x)), whose mixer is one of
    Mamba-2 ("M"),  attention without positions ("*"),  or a squared-ReLU MLP ("-"),
so some layers keep a recurrent state, some a KV cache, and the MLP layers none at all.

dt is clamped below at time_step_min. transformers does that in its multi-token (chunked) form but
not in its single-token decode form; here it is done in every step, so a sequence's result does not
depend on how it was split into micro-batches.

Symbols: n rows, E hidden size, H / Hkv heads, D head dim, F intermediate size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, Backend, MemorySpec, MicroBatch, RecurrentSpec
from statemesh.worker.architectures.model import CountedWeights, EndWeights, Model
from statemesh.worker.architectures.ssm import Mamba2Dims, Mamba2Mixer
from statemesh.worker.errors import UnknownArchitecture
from statemesh.worker.kernels.attention import attend
from statemesh.worker.kernels.nn import Weights, rms_norm, xp_of
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.tensor_selection import layer_range
from statemesh.worker.loading.tokenizer import Tokenizer

PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def block_types(raw: dict[str, Any], n_layers: int) -> list[str]:
    """`layers_block_type` (transformers 5 names) or the older `hybrid_override_pattern` string."""
    if raw.get("layers_block_type"):
        names = {"linear_attention": "mamba", "full_attention": "attention"}
        return [names.get(t, t) for t in raw["layers_block_type"]]
    pattern = str(raw["hybrid_override_pattern"])
    if len(pattern) != n_layers:
        raise UnknownArchitecture(f"hybrid_override_pattern has {len(pattern)} layers, the config {n_layers}")
    return [PATTERN[ch] for ch in pattern]


class SquaredReluMLP:
    """x -> relu(x Wup)^2 Wdown."""

    def __init__(self, w_up: Any, w_down: Any):
        self.w_up, self.w_down = w_up, w_down  # [E, F], [F, E]

    def __call__(self, h: Any) -> Any:
        xp = xp_of(h)
        u = xp.maximum(h @ self.w_up, xp.float32(0))  # [n, E] @ [E, F] -> [n, F]
        return (u * u) @ self.w_down  # [n, F] @ [F, E] -> [n, E]


class NemotronHModel(Model):
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
        # checkpoints name the stack "backbone"; transformers 5 calls it "model" in memory (any
        # tensor tells: a middle stage has no embedding)
        self.prefix = "backbone." if any(name.startswith("backbone.") for name in tensors) else "model."
        self.ends = EndWeights.load(
            w, c, self.held, self.prefix + "embeddings.weight", self.prefix + "norm_f.weight", c.tie_word_embeddings
        )
        self.types = block_types(raw, c.n_layers)
        if "moe" in self.types:
            raise UnknownArchitecture("Nemotron-H mixture-of-experts layers ('E') are not supported yet")
        self.dims = Mamba2Dims(
            n_heads=int(raw["mamba_num_heads"]),
            head_width=int(raw["mamba_head_dim"]),
            groups=int(raw["n_groups"]),
            n_state=int(raw["ssm_state_size"]),
            conv_k=int(raw["conv_kernel"]),
            eps=c.rms_norm_eps,
            dt_limit=(float(raw["time_step_min"]), float("inf")),
        )
        self.norms = {i: w.put(w.get(f"{self.prefix}layers.{i}.norm.weight", (c.hidden_size,))) for i in self.held}
        self.mixers = {i: self._mixer(w, i, self.types[i]) for i in self.held}
        self.weight_bytes = w.nbytes
        self.scale = c.head_dim**-0.5

    def _mixer(self, w: Weights, i: int, kind: str) -> Any:
        c = self.config
        m, e = f"{self.prefix}layers.{i}.mixer.", c.hidden_size
        if kind == "mamba":
            return Mamba2Mixer.load(w, m, e, self.dims)
        if kind == "mlp":
            f = c.intermediate_size
            return SquaredReluMLP(
                w.put(w.get(m + "up_proj.weight", (f, e)).T), w.put(w.get(m + "down_proj.weight", (e, f)).T)
            )
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return (w.qkv(m, e, q_dim, kv_dim), w.put(w.get(m + "o_proj.weight", (e, q_dim)).T))  # [E, ...], [H*D, E]

    def memory_spec(self) -> MemorySpec:
        c = self.config
        specs: dict[str, AttentionSpec | RecurrentSpec | None] = {
            "mamba": self.dims.state_spec,
            "attention": AttentionSpec(c.n_kv_heads, c.head_dim),
            "mlp": None,
        }
        return MemorySpec(tuple(specs[kind] for kind in self.types), model=c.name or c.architecture)

    def embed(self, tokens: np.ndarray) -> Any:
        return self.ends.token_embedding()[self.backend.index(tokens)]

    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any, keep: Any = None) -> Any:
        c, kind, mixer = self.config, self.types[layer], self.mixers[layer]
        if kind == "mlp":  # nothing mixes rows: the kept ones alone
            x = x if keep is None else x[keep]
            return x + mixer(rms_norm(x, self.norms[layer], c.rms_norm_eps))
        h = rms_norm(x, self.norms[layer], c.rms_norm_eps)
        if kind == "mamba":
            s, t = len(ub.seqs), ub.n_seq_tokens
            assert t is not None, "recurrent layers run on equal-split micro-batches"
            out, conv_state, ssm_state = mixer(h.reshape(s, t, -1), *ub.state(layer))  # rows as [S, T, E]
            ub.store_state(layer, conv_state, ssm_state)
            x = x + out.reshape(x.shape)
            return x if keep is None else x[keep]
        w_qkv, wo = mixer
        n, q_dim, kv_dim = x.shape[0], c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        qkv = h @ w_qkv  # [n, E] @ [E, (H+2Hkv)*D] -> [n, (H+2Hkv)*D]
        q = qkv[:, :q_dim].reshape(n, c.n_heads, c.head_dim)  # [n, H, D]
        k = qkv[:, q_dim : q_dim + kv_dim].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        v = qkv[:, q_dim + kv_dim :].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        ub.store_kv(layer, k, v)
        o = attend(q, ub, layer, self.scale, threads=self.threads)  # [n, H, D]
        if keep is not None:
            x, o, n = x[keep], o[keep], len(keep)
        return x + o.reshape(n, o.shape[1] * o.shape[2]) @ wo  # [n, H*D] @ [H*D, E] -> [n, E]

    def head(self, x: Any) -> Any:
        final_norm, lm_head = self.ends.norm_and_head()
        return lm_head(rms_norm(x, final_norm, self.config.rms_norm_eps), self.row_blocks)
