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
from functools import cached_property
from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, Backend, MemorySpec, MicroBatch
from statemesh.worker.architectures.model import CountedWeights, EndWeights, Model
from statemesh.worker.kernels.attention import attend
from statemesh.worker.kernels.nn import Weights, rms_norm, silu, times, times_out_in
from statemesh.worker.kernels.quantized import PackedMatrix
from statemesh.worker.kernels.rope import Rope
from statemesh.worker.kernels.row_blocks import RowBlocks
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.tensor_selection import layer_range
from statemesh.worker.loading.tokenizer import Tokenizer

PART_COPIES_MAX_BYTES = 2 << 30  # the most that [out, in] copies of the projections may take (`runs_in_parts`)


@dataclass(frozen=True)
class LlamaLayer:
    attn_norm: Any  # [E]
    w_qkv: Any  # [E, (H + 2*Hkv)*D]: q, k and v projections side by side (one matmul, not three)
    b_qkv: Any | None  # [(H + 2*Hkv)*D] (Qwen2)
    wo: Any  # [H*D, E]
    mlp_norm: Any  # [E]
    w_gate_up: Any  # [E, 2F]: gate and up side by side
    w_down: Any  # [E, F], as the checkpoint has it (`times_out_in`)
    # Packed weights (`load_model(weights="q8" | "q4")`): w_qkv, wo, w_gate_up and w_down are `PackedMatrix`es
    # laid out [out, in] ([(H + 2*Hkv)*D, E], [E, H*D], [2F, E], [E, F]), which `times` multiplies.
    # [out, in] copies of w_qkv, wo and w_gate_up for the small products of a micro-batch's parts
    # (`nn.in_part`); None where the host's BLAS has no small kernels (`Model.runs_in_parts`)
    w_qkv_t: Any = None
    wo_t: Any = None
    w_gate_up_t: Any = None


class LlamaModel(Model):
    takes_packed_weights = True  # `load_model(weights="q8" | "q4")`: the tensors may be `PackedMatrix`es

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, np.ndarray],
        tokenizer: Tokenizer,
        backend: Backend,
        layers: range | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self.held = layer_range(layers, config.n_layers)
        self.packed = any(isinstance(t, PackedMatrix) for t in tensors.values())
        weights = CountedWeights(tensors, backend)
        c = config
        self.ends = EndWeights.load(
            weights, c, self.held, "model.embed_tokens.weight", "model.norm.weight", c.tie_word_embeddings
        )
        self.layers = {i: self._layer(weights, i) for i in self.held}
        self.weight_bytes = weights.nbytes
        self.rope = Rope.build(c.head_dim, c.rope_theta, c.rope_scaling)
        self.scale = c.head_dim**-0.5

    def _layer(self, w: Weights, i: int) -> LlamaLayer:
        """Checkpoint tensors are [out, in]; stored here as [in, out] (so `h @ w`), with the q/k/v
        and gate/up projections concatenated along out: single-row decode streams each weight
        once, and fewer, larger matmuls use the memory bandwidth better. The down projection
        stays [out, in], which BLAS multiplies faster for it (`times_out_in`)."""
        if self.packed:
            return self._packed_layer(w, i)
        c = self.config
        p = f"model.layers.{i}."
        q_dim, kv_dim, e, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
        gate_up = np.concatenate([w.get(p + f"mlp.{n}_proj.weight", (f, e)) for n in ("gate", "up")])  # [2F, E]
        o = w.get(p + "self_attn.o_proj.weight", (e, q_dim))
        both = self.runs_in_parts  # keep [out, in] copies too, for the parts' small products
        return LlamaLayer(
            attn_norm=w.put(w.get(p + "input_layernorm.weight", (e,))),
            w_qkv=w.qkv(p + "self_attn.", e, q_dim, kv_dim),
            b_qkv=w.qkv(p + "self_attn.", e, q_dim, kv_dim, kind="bias") if c.attention_bias else None,
            wo=w.put(o.T),
            mlp_norm=w.put(w.get(p + "post_attention_layernorm.weight", (e,))),
            w_gate_up=w.put(gate_up.T),
            w_down=w.put(w.get(p + "mlp.down_proj.weight", (e, f))),
            w_qkv_t=w.qkv(p + "self_attn.", e, q_dim, kv_dim, kind="weight_out_in") if both else None,
            wo_t=w.put(o, aside=True) if both else None,
            w_gate_up_t=w.put(gate_up, aside=True) if both else None,
        )

    def _packed_layer(self, w: Weights, i: int) -> LlamaLayer:
        """The layer with its projections packed, [out, in] as the checkpoint has them; gate and up
        stacked (one product, as in float32), and q, k and v (`Weights.qkv`)."""
        c = self.config
        p = f"model.layers.{i}."
        q_dim, kv_dim, e, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
        gate_and_up: list[Any] = [w.get(p + f"mlp.{n}_proj.weight", (f, e)) for n in ("gate", "up")]  # PackedMatrix
        gate_up = PackedMatrix.stack(gate_and_up)  # [2F, E]
        return LlamaLayer(
            attn_norm=w.put(w.get(p + "input_layernorm.weight", (e,))),
            w_qkv=w.qkv(p + "self_attn.", e, q_dim, kv_dim),  # [(H + 2*Hkv)*D, E]
            b_qkv=w.qkv(p + "self_attn.", e, q_dim, kv_dim, kind="bias") if c.attention_bias else None,
            wo=w.put(w.get(p + "self_attn.o_proj.weight", (e, q_dim))),  # [E, H*D]
            mlp_norm=w.put(w.get(p + "post_attention_layernorm.weight", (e,))),
            w_gate_up=w.put(gate_up),
            w_down=w.put(w.get(p + "mlp.down_proj.weight", (e, f))),  # [E, F]
        )

    @cached_property
    def runs_in_parts(self) -> bool:
        """On a host whose BLAS has small kernels: the projections of a micro-batch's part run as
        small products over [out, in] copies of the weights (`nn.times`), for which the layers keep
        them (SmolLM2: 318 MB more, 860 MB of weights in all). Not for a model whose copies would
        take more than `PART_COPIES_MAX_BYTES`: there memory is worth more than the ~5-10% of a
        32-stream decode step that parts save. With packed weights, on any host: their products are
        compiled loops that run on the calling thread (`PackedMatrix.times`), and parts hand a decode
        step to the other core once, not once per product (~230 us each on the AVX2 hosts)."""
        if self.packed:
            return self.backend.is_host
        c = self.config
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        per_layer = c.hidden_size * (2 * q_dim + 2 * kv_dim + 2 * c.intermediate_size)
        small_enough = 4 * per_layer * c.n_layers <= PART_COPIES_MAX_BYTES
        return self.backend.is_host and small_enough and RowBlocks.available()

    def memory_spec(self) -> MemorySpec:
        c = self.config
        layer = AttentionSpec(c.n_kv_heads, c.head_dim, window=c.sliding_window)
        return MemorySpec(tuple(layer for _ in range(c.n_layers)), model=c.name or c.architecture)

    def k_shift(self, layer: int, k: Any, delta: Any) -> Any:
        return self.rope.k_shift(layer, k, delta)

    def embed(self, tokens: np.ndarray) -> Any:
        table = self.ends.token_embedding()
        if isinstance(table, PackedMatrix):
            return table.rows(tokens)  # [n] -> [n, E], widening only those rows
        return table[self.backend.index(tokens)]  # [n] -> [n, E]

    def prepare(self, ub: MicroBatch) -> tuple[Any, Any]:
        return self.rope.cos_sin(ub.positions, self.backend.xp)  # the same for every layer

    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any, keep: Any = None) -> Any:
        c, w = self.config, self.layers[layer]
        n, q_dim, kv_dim = x.shape[0], c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        h = rms_norm(x, w.attn_norm, c.rms_norm_eps)
        qkv = times(h, w.w_qkv, w.w_qkv_t, self.row_blocks, self.threads)  # [n, E] @ [E, (H+2Hkv)*D] -> [n, (H+2Hkv)*D]
        if w.b_qkv is not None:
            qkv += w.b_qkv
        cos, sin = shared
        qk = self.rope.apply(qkv[:, : q_dim + kv_dim].reshape(n, c.n_heads + c.n_kv_heads, c.head_dim), cos, sin)
        q, k = qk[:, : c.n_heads], qk[:, c.n_heads :]  # [n, H, D], [n, Hkv, D]: rotated in one go
        v = qkv[:, q_dim + kv_dim :].reshape(n, c.n_kv_heads, c.head_dim)  # [n, Hkv, D]
        ub.store_kv(layer, k, v)
        o = attend(q, ub, layer, self.scale, window=c.sliding_window, threads=self.threads)  # [n, H, D]
        if keep is not None:
            x, o, n = x[keep], o[keep], len(keep)
        o_flat = o.reshape(n, o.shape[1] * o.shape[2])  # [n, H, D] -> [n, H*D]
        x = x + times(o_flat, w.wo, w.wo_t, self.row_blocks, self.threads)  # [n, H*D] -> [n, E]
        h = rms_norm(x, w.mlp_norm, c.rms_norm_eps)
        gate_up = times(h, w.w_gate_up, w.w_gate_up_t, self.row_blocks, self.threads)  # [n, E] @ [E, 2F] -> [n, 2F]
        f = c.intermediate_size
        act = silu(gate_up[:, :f])
        act *= gate_up[:, f:]
        x = x + times_out_in(act, w.w_down, self.row_blocks, self.threads)  # [n, F] through [E, F] -> [n, E]
        return x

    def head(self, x: Any) -> Any:
        final_norm, lm_head = self.ends.norm_and_head()
        h = rms_norm(x, final_norm, self.config.rms_norm_eps)
        return lm_head(h, self.row_blocks, self.threads)  # [n, E] -> [n, V]
