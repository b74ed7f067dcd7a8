"""GGUF loading beyond the default model: Llama-family files written here the way llama.cpp's
converter writes them (Q/K permuted for its RoPE, the BPE vocabulary in the metadata), in every
tensor type the loader promises. Each is checked against the Hugging Face folder path holding the
very same (dequantized) weights, and the F32 file against the transformers reference fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file, save_file

from statemesh.memory import Batch
from statemesh.worker import Model, load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE = FIXTURES / "llama"
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{LAYER[rest]}"


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, pairs (d, d + D/2) become adjacent rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def crafted_k_quant(shape: tuple[int, ...], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Raw K-quant blocks (gguf cannot quantize these): random quants with small, finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == Q.Q6_K:
        rows[..., 208:210] = scale  # d comes last
    else:
        rows[..., 0:2] = scale  # d, then dmin
        rows[..., 2:4] = scale
    return rows.reshape(shape[0], -1)


def write_pair(
    folder: Path,
    tensors: dict[str, np.ndarray],
    config: dict,
    qtype: Q,
    tmp: Path,
    arch: str = "llama",  # type: ignore[type-arg]
) -> tuple[Path, Path]:
    """A GGUF with the matrices stored as `qtype`, and a HF folder holding what that GGUF decodes to.
    llama.cpp permutes Q/K for "llama" (its adjacent-pair RoPE), not for "qwen2" (NeoX pairs)."""
    rng = np.random.default_rng(7)
    path = tmp / f"model-{arch}-{qtype.name}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    permuted = arch == "llama"
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta")))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    vocab = json.loads((folder / "tokenizer.json").read_text())
    tokens = sorted(vocab["model"]["vocab"], key=vocab["model"]["vocab"].get)
    specials = {t["content"] for t in vocab["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["model"]["merges"]])
    writer.add_eos_token_id(0)
    decoded = {}
    for name, w in tensors.items():
        stored = w
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            stored = permute(w, config["num_attention_heads"])
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            stored = permute(w, config["num_key_value_heads"])
        if w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(gguf_name(name), stored.astype(np.float32))
            decoded[name] = w.astype(np.float32)
            continue
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            raw = crafted_k_quant(stored.shape, qtype, rng)
        else:
            raw = gguf.quants.quantize(stored.astype(np.float32), qtype)
        writer.add_tensor(gguf_name(name), raw, raw_dtype=qtype)  # the writer reads the shape off the bytes
        back = gguf.quants.dequantize(raw, qtype).reshape(stored.shape).astype(np.float32)
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # what the loader must undo
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            back = back.reshape(heads, back.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        decoded[name] = back
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hf = tmp / f"hf-{qtype.name}"
    shutil.copytree(folder, hf)
    save_file(decoded, str(hf / "model.safetensors"))
    return path, hf


def logits(model: Model, ids: list[int]) -> np.ndarray:
    mem = model.create_memory(n_ctx=64, n_seq_max=1)
    return model.decode(mem, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids))


def random_llama(tmp: Path) -> tuple[Path, dict[str, np.ndarray], dict]:  # type: ignore[type-arg]
    """A random Llama with 256-wide matrices (K-quant blocks are 256 values) and the fixture's vocabulary."""
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64)  # fmt: skip
    rng = np.random.default_rng(3)
    e, f, v = 256, 256, config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,), "lm_head.weight": (v, e)}
    layer = {"input_layernorm.weight": (e,), "self_attn.q_proj.weight": (e, e), "self_attn.k_proj.weight": (128, e),
             "self_attn.v_proj.weight": (128, e), "self_attn.o_proj.weight": (e, e),
             "post_attention_layernorm.weight": (e,), "mlp.gate_proj.weight": (f, e), "mlp.up_proj.weight": (f, e),
             "mlp.down_proj.weight": (e, f)}  # fmt: skip
    shapes.update({f"model.layers.0.{k}": s for k, s in layer.items()})
    tensors = {k: (rng.standard_normal(s) * (0.05 if len(s) == 2 else 1.0) + (len(s) == 1)).astype(np.float32)
               for k, s in shapes.items()}  # fmt: skip
    folder = tmp / "random-llama"
    shutil.copytree(FIXTURE, folder)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors, config


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_matches_the_transformers_reference(tmp_path: Path, arch: str) -> None:
    folder = FIXTURES / arch
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    path, _ = write_pair(folder, tensors, config, Q.F32, tmp_path, arch)
    expected = load_file(str(folder / "expected.safetensors"))
    model = load_model(path, backend="numpy", progress=False)
    assert model.config.architecture == arch and model.config.attention_bias == (arch == "qwen2")
    ids = expected["prompt_ids"].tolist()
    assert model.tokenizer.encode(model.tokenizer.decode(ids)) == ids
    got = logits(model, ids)
    hf = logits(load_model(folder, backend="numpy", progress=False), ids)
    np.testing.assert_allclose(got, hf, rtol=0, atol=1e-5 * np.abs(hf).max())
    assert np.abs(got - expected["prompt_logits"]).max() / np.abs(expected["prompt_logits"]).max() < 2e-3


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_every_tensor_type_decodes_to_what_the_hf_path_computes(tmp_path: Path, qtype: Q) -> None:
    folder, tensors, config = random_llama(tmp_path)
    path, hf = write_pair(folder, tensors, config, qtype, tmp_path)
    ids = [5, 17, 42, 99, 100, 250, 7]
    from_gguf = logits(load_model(path, backend="numpy", progress=False), ids)
    from_hf = logits(load_model(hf, backend="numpy", progress=False), ids)
    assert np.isfinite(from_gguf).all()
    np.testing.assert_allclose(from_gguf, from_hf, rtol=0, atol=1e-5 * np.abs(from_hf).max())
