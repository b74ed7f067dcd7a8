"""`ModelConfig`: the hyperparameters an architecture needs, read from a GGUF file's metadata or a
Hugging Face `config.json` (both RoPE styles: top-level `rope_theta` and `rope_parameters`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from statemesh.worker.errors import ModelError, UnknownArchitecture


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # the Hugging Face architecture family: "llama", "qwen2", "mistral", ...
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections with biases (Qwen2)
    sliding_window: int | None = None  # all-layer window (Mistral, Qwen2 with use_sliding_window)
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    max_position: int = 0
    name: str = ""
    # The checkpoint's whole config, for what only one architecture reads (Gemma's soft-caps, ...).
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads and self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")


HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MambaForCausalLM": "mamba",
    "Mamba2ForCausalLM": "mamba2",
    "BambaForCausalLM": "bamba",
    "JambaForCausalLM": "jamba",
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",
    "NemotronHForCausalLM": "nemotron_h",
    "FalconH1ForCausalLM": "falcon_h1",
}


def config_from_hf(raw: dict[str, Any], name: str = "") -> ModelConfig:
    """A `config.json` as a ModelConfig; UnknownArchitecture names what is supported."""
    archs = raw.get("architectures") or []
    family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if family is None:
        raise UnknownArchitecture(f"config.json names architectures {archs}; supported: {sorted(HF_ARCHITECTURES)}")
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if "full_attention" in rope:  # per layer type (Gemma 3): the full layers' settings here
        rope = dict(rope["full_attention"])
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    n_heads = int(raw.get("num_attention_heads") or 0)  # 0 for models without attention (Mamba)
    hidden = int(raw["hidden_size"])
    window = raw.get("sliding_window") if raw.get("use_sliding_window", family == "mistral") else None
    if family.startswith("gemma"):
        window = None  # Gemma windows some layers only: the architecture reads layer_types
    return ModelConfig(
        architecture=family,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        n_layers=_n_layers(raw),
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        head_dim=int(raw.get("head_dim") or (hidden // n_heads if n_heads else 0)),
        intermediate_size=int(raw.get("intermediate_size") or 0),
        rms_norm_eps=float(raw.get("rms_norm_eps", raw.get("layer_norm_epsilon", 1e-6))),
        rope_theta=float(theta),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", family == "qwen2")),
        sliding_window=int(window) if window else None,
        rope_scaling={k: v for k, v in rope.items() if k not in ("rope_theta",)},
        max_position=int(raw.get("max_position_embeddings", 0)),
        name=name,
        extra=raw,
    )


def _n_layers(raw: dict[str, Any]) -> int:
    """num_hidden_layers, or the length of a per-layer type list (Nemotron-H saves only that)."""
    n = raw.get("num_hidden_layers") or len(raw.get("layers_block_type") or raw.get("hybrid_override_pattern") or "")
    if not n:
        raise ModelError("config.json gives neither num_hidden_layers nor a per-layer type list")
    return int(n)
