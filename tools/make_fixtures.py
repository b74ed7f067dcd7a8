"""Build the reference fixtures: tiny seeded models in Hugging Face transformers, and what they compute.

A developer tool, not a test dependency: it needs torch and transformers (`make fixtures` installs
them in `.venv-tools`: `pip install torch==2.13.0 transformers`, the CPU build on disk). Its outputs
are committed under tests/fixtures/<name>/: the model folder (config.json, model.safetensors,
tokenizer.json) and expected.safetensors with
    prompt_ids [T] int64, prompt_logits [T, V] float32,
    greedy_ids [16] int64, greedy_logits [16, V] float32 (the logits each greedy token was taken from).
The continuation is computed by full forwards without a cache, so reference cache bugs cannot leak in.

    .venv-tools/bin/python tools/make_fixtures.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
CORPUS = (
    "The capital of France is Paris. Paris is the capital and most populous city of France. "
    "Mamba is a state space model; Jamba mixes attention and Mamba layers. Gemma uses sliding windows. "
    "0123456789 The quick brown fox jumps over the lazy dog. Le café est très bon à Paris!"
) * 4
PROMPT = "The capital of France is Paris, and the capital of Italy is"
VOCAB = 384
GREEDY_STEPS = 16


def tiny_tokenizer(folder: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def llama_family(kind: str) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=0,
        initializer_range=0.2,
    )  # fmt: skip
    if kind == "llama":
        return LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if kind == "llama_tied":
        return LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=True, head_dim=32)
    if kind == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
    if kind == "mistral":
        return MistralConfig(**common, rope_theta=10000.0, sliding_window=5, tie_word_embeddings=False)
    raise ValueError(kind)


def gemma(kind: str) -> Any:
    from transformers import Gemma2Config, Gemma3TextConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, eos_token_id=0,
        bos_token_id=0, pad_token_id=0, initializer_range=0.05, sliding_window=4, query_pre_attn_scalar=16,
    )  # fmt: skip
    if kind == "gemma2":  # windowed and full layers alternate; soft-capped scores and logits
        return Gemma2Config(**common, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    layer_types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Gemma3TextConfig(**common, layer_types=layer_types)
    config.architectures = ["Gemma3ForCausalLM"]
    return config


def mamba(kind: str) -> Any:
    from transformers import Mamba2Config, MambaConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=3, conv_kernel=4, expand=2,
                  layer_norm_epsilon=1e-5, eos_token_id=0, bos_token_id=0, pad_token_id=0)  # fmt: skip
    if kind == "mamba":
        return MambaConfig(**common, time_step_rank=8, tie_word_embeddings=False)
    return Mamba2Config(**common, num_heads=8, head_dim=16, n_groups=2, chunk_size=8, tie_word_embeddings=False)


def bamba(kind: str) -> Any:
    from transformers import BambaConfig

    return BambaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, rms_norm_eps=1e-5,
        eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.2,
    )  # fmt: skip


def jamba(kind: str) -> Any:
    from transformers import JambaConfig

    return JambaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.2,
    )  # fmt: skip


def granite(kind: str) -> Any:
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["mamba", "attention", "mamba", "attention"], mamba_n_heads=8,
        mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=96, position_embedding_type="rope",
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=1.5,
        rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.2,
    )  # fmt: skip


def nemotron_h(kind: str) -> Any:
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, hybrid_override_pattern="M*-M*", mamba_num_heads=8, mamba_head_dim=16,
        n_groups=2, ssm_state_size=8, conv_kernel=4, expand=2, chunk_size=8, time_step_min=0.05,
        layer_norm_epsilon=1e-5, eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.2,
        use_mamba_kernels=False,
    )  # fmt: skip


def falcon_h1(kind: str) -> Any:
    from transformers import FalconH1Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, rms_norm_eps=1e-5,
        eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.2,
        embedding_multiplier=1.5, lm_head_multiplier=0.7, key_multiplier=0.8, attention_in_multiplier=1.2,
        attention_out_multiplier=0.9, ssm_in_multiplier=1.1, ssm_out_multiplier=0.6, mlp_multipliers=[0.9, 1.3],
        ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.05],
    )  # fmt: skip
    if kind == "falcon_h1":  # the gated group norm, gate after the norm
        return FalconH1Config(**common, mamba_rms_norm=True, mamba_norm_before_gate=True)
    return FalconH1Config(**common, mamba_rms_norm=False)  # falcon_h1_plain: only the gate


FIXTURES = {
    "llama": llama_family,
    "llama_tied": llama_family,
    "qwen2": llama_family,
    "mistral": llama_family,
    "gemma2": gemma,
    "gemma3": gemma,
    "mamba": mamba,
    "mamba2": mamba,
    "bamba": bamba,
    "jamba": jamba,
    "granitemoehybrid": granite,
    "nemotron_h": nemotron_h,
    "falcon_h1": falcon_h1,
    "falcon_h1_plain": falcon_h1,
}


def build(name: str, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    folder = ROOT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tok = tiny_tokenizer(folder)
    config = FIXTURES[name](name)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():  # random models give near-uniform or degenerate logits: spread biases and norms
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in pname and name.startswith(
                ("gemma", "mamba", "bamba", "jamba", "granite", "nemotron", "falcon")
            ):
                p.normal_(0.0 if name.startswith("gemma") else 1.0, 0.3)  # w = 0 (Gemma: 1 + w) would hide bugs
    model.save_pretrained(folder, safe_serialization=True)
    ids = tok.encode(PROMPT).ids
    expected = reference_run(model, ids)
    save_file(expected, str(folder / "expected.safetensors"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    margin = min_margin(expected["greedy_logits"])
    summary = {"fixture": name, "seed": seed, "prompt_tokens": len(ids), "min_top2_margin": margin}
    print(json.dumps({**summary, "greedy": expected["greedy_ids"].tolist()}))


def reference_run(model: Any, ids: list[int]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        prompt_logits = forward(model, ids).float().numpy()
        seq, greedy, steps = list(ids), [], []
        logits = prompt_logits[-1]
        for _ in range(GREEDY_STEPS):
            steps.append(logits)
            greedy.append(int(np.argmax(logits)))
            seq.append(greedy[-1])
            logits = forward(model, seq)[-1].float().numpy()
    return {
        "prompt_ids": np.array(ids, dtype=np.int64),
        "prompt_logits": prompt_logits.astype(np.float32),
        "greedy_ids": np.array(greedy, dtype=np.int64),
        "greedy_logits": np.stack(steps).astype(np.float32),
    }


def forward(model: Any, ids: list[int]) -> Any:
    """Logits [T, V] of one full forward; hybrids get explicit position ids (transformers' Bamba
    needs them)."""
    kwargs = (
        {"position_ids": torch.arange(len(ids))[None]}
        if model.config.model_type in ("bamba", "granitemoehybrid")
        else {}
    )
    return model(torch.tensor([ids]), **kwargs).logits[0]


def min_margin(logits: np.ndarray) -> float:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(FIXTURES))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.only:
        build(name, args.seed)


if __name__ == "__main__":
    main()
