"""Read a GGUF file: config, float32 tensors under Hugging Face names, and the tokenizer.

Tensors of any type the `gguf` package dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants)
become float32. llama.cpp's converter permutes the Q and K projections of Llama-family models for its
adjacent-pair RoPE; they are permuted back here, so every checkpoint reaches the architectures in the
Hugging Face layout (RoPE on pairs (d, d + head_dim/2)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from statemesh.worker.errors import ModelError, UnknownArchitecture
from statemesh.worker.kernels.quantized import from_gguf_blocks, pack_q8, packs
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.gguf_header import read_gguf_header
from statemesh.worker.loading.progress import Progress
from statemesh.worker.loading.tensor_selection import LayerChoice, TensorSelection
from statemesh.worker.loading.tokenizer import Tokenizer, tokenizer_from_gguf

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
PERMUTED_QK = {"llama"}  # llama.cpp runs these with adjacent-pair RoPE; qwen2 uses NeoX pairs as HF does

# GGUF tensor names -> Hugging Face names ("{i}" is the layer)
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _hf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        layer = parts[1]
        key = ".".join(["blk", "{i}", *parts[2:]])
        return NAMES[key].replace("{i}", layer) if key in NAMES else None
    return NAMES.get(name)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: per head, rows (0, 1, 2, 3, ...) hold the pairs
    (0, D/2), (1, D/2 + 1), ... interleaved; back to halves. w: [n_heads * D, ...]."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(
    path: Path, progress: bool | None = None, layers: LayerChoice = None, weights: str = "f32"
) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """The config, the tensors (only those of model layers `layers` and the ends they need, when
    given: `TensorSelection`; the others are never dequantized) and the tokenizer. With `weights`
    "q8" or "q4" the projections, embedding and head come as `PackedMatrix` (`quantized.py`), from
    the file's blocks where they map onto that layout exactly, else rounded from float32."""
    import gguf

    reader = read_gguf_header(path)  # metadata in bulk; the tensors' data as views of the mapped file
    meta: dict[str, Any] = reader.metadata
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnknownArchitecture(f"GGUF architecture {arch!r}; supported: {sorted(GGUF_ARCHITECTURES)}")
    config = _config(meta, arch, reader)
    names = {t.name: _hf_name(t.name) for t in reader.tensors}
    known = {name for name in names.values() if name is not None}
    selection = TensorSelection.build(layers, config.n_layers, config.tie_word_embeddings, known)
    bar = Progress(f"loading {path.name}", len(reader.tensors), enabled=progress)
    tensors: dict[str, Any] = {}  # name -> float32 array, or PackedMatrix (`weights`)
    for t in reader.tensors:
        name = names[t.name]
        bar.advance()
        if name is None or not selection.wants(name):
            continue  # not ours (another stage's layer), or e.g. rope_freqs, which the config describes
        raw = np.asarray(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raw = raw.view(np.uint8)  # the reader types BF16 as uint16; dequantize wants bytes
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF dims are innermost-first
        # a row is whole in its bytes (blocks never straddle rows), so rows move before unpacking
        if arch in PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
            raw = unpermute_rope(raw.reshape(shape[0], -1), config.n_heads)
        elif arch in PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
            raw = unpermute_rope(raw.reshape(shape[0], -1), config.n_kv_heads)
        packed = weights != "f32" and packs(name)
        w: Any = from_gguf_blocks(raw, t.tensor_type.name, shape, weights) if packed else None
        if w is None:
            w = np.asarray(gguf.quants.dequantize(raw, t.tensor_type), dtype=np.float32).reshape(shape)
            w = pack_q8(w) if packed else w
        tensors[name] = w
    return config, tensors, tokenizer_from_gguf(meta)


def _config(meta: dict[str, Any], arch: str, reader: Any) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"GGUF metadata lacks {arch}.{key}")
        return value

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or get("rope.dimension_count", hidden // n_heads)),
        intermediate_size=int(get("feed_forward_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        max_position=int(get("context_length", 0)),
        name=str(meta.get("general.name", "")),
    )
