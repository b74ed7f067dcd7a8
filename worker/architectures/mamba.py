"""Mamba and Mamba-2 language models: every layer is x = x + mixer(rmsnorm(x)), with the
selective state space mixers of `ssm.py` over the recurrent memory."""

from __future__ import annotations

from typing import Any

import numpy as np

from statemesh.memory import Backend, MemorySpec, MicroBatch
from statemesh.worker.architectures.model import CountedWeights, EndWeights, Model
from statemesh.worker.architectures.ssm import Mamba1Dims, Mamba1Mixer, Mamba2Dims, Mamba2Mixer, json_float
from statemesh.worker.kernels.nn import Weights, rms_norm
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.tensor_selection import layer_range
from statemesh.worker.loading.tokenizer import Tokenizer


class MambaModel(Model):
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
        e = config.hidden_size
        w = CountedWeights(tensors, backend)
        self.ends = EndWeights.load(
            w, config, self.held, "backbone.embeddings.weight", "backbone.norm_f.weight", config.tie_word_embeddings
        )
        self.dims = self._dims(config.extra)  # every layer's mixer has these
        self.norms = {i: w.put(w.get(f"backbone.layers.{i}.norm.weight", (e,))) for i in self.held}
        self.mixers = {i: self._mixer(w, f"backbone.layers.{i}.mixer.") for i in self.held}
        self.weight_bytes = w.nbytes

    def _dims(self, raw: dict[str, Any]) -> Mamba1Dims | Mamba2Dims:
        n_state, conv_k = int(raw["state_size"]), int(raw["conv_kernel"])
        if self.config.architecture == "mamba2":
            low, high = raw.get("time_step_limit", (0.0, float("inf")))
            return Mamba2Dims(
                n_heads=int(raw["num_heads"]),
                head_width=int(raw["head_dim"]),
                groups=int(raw["n_groups"]),
                n_state=n_state,
                conv_k=conv_k,
                eps=self.config.rms_norm_eps,
                dt_limit=(json_float(low), json_float(high)),
            )
        inner = int(raw.get("intermediate_size") or int(raw["expand"] * self.config.hidden_size))
        return Mamba1Dims(inner, n_state, int(raw["time_step_rank"]), conv_k)

    def _mixer(self, w: Weights, prefix: str) -> Mamba1Mixer | Mamba2Mixer:
        e = self.config.hidden_size
        if isinstance(self.dims, Mamba2Dims):
            return Mamba2Mixer.load(w, prefix, e, self.dims)
        return Mamba1Mixer.load(w, prefix, e, self.dims)

    def memory_spec(self) -> MemorySpec:
        layers = tuple(self.dims.state_spec for _ in range(self.config.n_layers))
        return MemorySpec(layers, model=self.config.name or self.config.architecture)

    def embed(self, tokens: np.ndarray) -> Any:
        return self.ends.token_embedding()[self.backend.index(tokens)]

    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any, keep: Any = None) -> Any:
        s, t = len(ub.seqs), ub.n_seq_tokens
        assert t is not None, "recurrent layers run on equal-split micro-batches"
        h = rms_norm(x, self.norms[layer], self.config.rms_norm_eps).reshape(s, t, -1)  # [n, E] -> [S, T, E]
        out, conv_state, ssm_state = self.mixers[layer](h, *ub.state(layer))
        ub.store_state(layer, conv_state, ssm_state)
        x = x + out.reshape(x.shape)
        return x if keep is None else x[keep]  # a mixer alone: nothing after it to spare

    def head(self, x: Any) -> Any:
        final_norm, lm_head = self.ends.norm_and_head()
        return lm_head(rms_norm(x, final_norm, self.config.rms_norm_eps), self.row_blocks)
