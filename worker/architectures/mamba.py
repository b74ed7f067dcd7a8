"""Mamba and Mamba-2 language models: every layer is x = x + mixer(rmsnorm(x)), with the
selective state space mixers of `ssm.py` over the recurrent memory."""

from __future__ import annotations

from typing import Any

import numpy as np

from statemesh.memory import Backend, MemorySpec, MicroBatch
from statemesh.worker.architectures.model import Model
from statemesh.worker.architectures.ssm import Mamba1Mixer, Mamba2Dims, Mamba2Mixer, json_float
from statemesh.worker.kernels.nn import Weights, rms_norm
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.tokenizer import Tokenizer


class MambaModel(Model):
    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], tokenizer: Tokenizer, backend: Backend):
        self.config, self.tokenizer, self.backend = config, tokenizer, backend
        raw, e = config.extra, config.hidden_size
        w = Weights(tensors, backend)
        self.embedding, self.lm_head = w.embedding_and_head(
            "backbone.embeddings.weight", config.vocab_size, e, config.tie_word_embeddings
        )
        self.final_norm = w.put(w.get("backbone.norm_f.weight", (e,)))
        self.norms = [w.put(w.get(f"backbone.layers.{i}.norm.weight", (e,))) for i in range(config.n_layers)]
        self.mixers = [self._mixer(w, raw, f"backbone.layers.{i}.mixer.") for i in range(config.n_layers)]

    def _mixer(self, w: Weights, raw: dict[str, Any], prefix: str) -> Mamba1Mixer | Mamba2Mixer:
        e = self.config.hidden_size
        n_state, conv_k = int(raw["state_size"]), int(raw["conv_kernel"])
        if self.config.architecture == "mamba2":
            low, high = raw.get("time_step_limit", (0.0, float("inf")))
            dims = Mamba2Dims(
                n_heads=int(raw["num_heads"]),
                head_width=int(raw["head_dim"]),
                groups=int(raw["n_groups"]),
                n_state=n_state,
                conv_k=conv_k,
                eps=self.config.rms_norm_eps,
                dt_limit=(json_float(low), json_float(high)),
            )
            return Mamba2Mixer.load(w, prefix, e, dims)
        inner = int(raw.get("intermediate_size") or int(raw["expand"] * e))
        return Mamba1Mixer.load(w, prefix, e, inner, n_state, int(raw["time_step_rank"]), conv_k)

    def memory_spec(self) -> MemorySpec:
        return MemorySpec(tuple(m.state_spec for m in self.mixers), model=self.config.name or self.config.architecture)

    def embed(self, tokens: np.ndarray) -> Any:
        return self.embedding[self.backend.index(tokens)]

    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any, keep: Any = None) -> Any:
        s, t = len(ub.seqs), ub.n_seq_tokens
        assert t is not None, "recurrent layers run on equal-split micro-batches"
        h = rms_norm(x, self.norms[layer], self.config.rms_norm_eps).reshape(s, t, -1)  # [n, E] -> [S, T, E]
        out, conv_state, ssm_state = self.mixers[layer](h, *ub.state(layer))
        ub.store_state(layer, conv_state, ssm_state)
        x = x + out.reshape(x.shape)
        return x if keep is None else x[keep]  # a mixer alone: nothing after it to spare

    def head(self, x: Any) -> Any:
        return self.lm_head(rms_norm(x, self.final_norm, self.config.rms_norm_eps), self.row_blocks)
