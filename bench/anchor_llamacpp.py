"""The engine workload on llama.cpp, for `bench/engine.py --anchor llamacpp`.

Needs llama-cpp-python, which compiles llama.cpp (~20 minutes here): `make bench-anchors` installs it
into its own `.venv-anchors`; the tests never need it. It runs the way llama.cpp's `batched` example
does: each prompt prefilled in one batch, then one decode batch per step with a token of every stream
(one KV stream per sequence), greedy, `n_threads` threads, flash attention on (llama.cpp's best here).
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np


def run(model_path: str, prompts: list[list[int]], new_tokens: int, n_threads: int = 2) -> dict[str, Any]:
    import llama_cpp as lc

    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(model_path.encode(), lc.llama_model_default_params())
    params = lc.llama_context_default_params()
    params.n_ctx = sum(len(p) for p in prompts) + len(prompts) * new_tokens + 64
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = len(prompts)
    params.n_threads = params.n_threads_batch = n_threads
    if hasattr(params, "flash_attn_type"):
        params.flash_attn_type = 1  # enabled
    elif hasattr(params, "flash_attn"):
        params.flash_attn = True
    ctx = lc.llama_init_from_model(model, params)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(max(512, len(prompts)), 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)"""
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        row = ctypes.cast(lc.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float))
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(n_vocab,))))

    start = time.perf_counter()
    ttft, last = [], []
    for s, prompt in enumerate(prompts):  # prefill, a sequence at a time, in chunks of n_batch
        for a in range(0, len(prompt), 512):
            chunk = prompt[a : a + 512]
            decode([(t, a + j, s, a + j == len(prompt) - 1) for j, t in enumerate(chunk)])
        last.append(argmax(len(prompt[(len(prompt) - 1) // 512 * 512 :]) - 1))
        ttft.append(time.perf_counter() - start)
    produced = len(prompts)
    decode_start = time.perf_counter()
    for step in range(1, new_tokens):
        decode([(last[s], len(p) + step - 1, s, True) for s, p in enumerate(prompts)])
        last = [argmax(s) for s in range(len(prompts))]
        produced += len(prompts)
    end = time.perf_counter()
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return {
        "aggregate_tokens_per_s": produced / (end - start),
        "decode_phase_tokens_per_s": (produced - len(prompts)) / (end - decode_start),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
    }


def main() -> None:
    """Reads {"model", "prompts", "new_tokens", "threads"} as JSON on stdin, prints the result as JSON
    (so bench/engine.py can run this in the venv that has llama-cpp-python)."""
    import json
    import sys

    spec = json.load(sys.stdin)
    print(json.dumps(run(spec["model"], spec["prompts"], spec["new_tokens"], spec.get("threads", 2))))


if __name__ == "__main__":
    main()
