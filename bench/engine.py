"""Model and engine benchmark on the CPU: one JSON object per line.

    python bench/engine.py [--model PATH] [--prompt-tokens 512] [--decode-tokens 128] [--repeat 3]
    python bench/engine.py --streams 1 8 32 [--shared 0.9]

Issue 4 (--streams): greedy, 256-token prompts, 128 new tokens each, N concurrent streams through
the engine: aggregate generated tokens/s over the whole run (prefill included), decode-phase
tokens/s, and time to first token p50/p99; --shared makes that fraction of every prompt common.
llama.cpp's best measured here (flash attention on): 100 / 165 / 170 tokens/s at 1 / 8 / 32 streams.

For the default model (SmolLM2-135M-Instruct, float32 weights): prefill tokens/s of a 512-token
prompt, single-stream greedy decode tokens/s over 128 tokens, and peak RSS. Issue 3's references,
measured on this kind of machine (2 cores): llama.cpp on the Q4_1 file 184 prefill / 90 decode
tokens/s (200 / 100 with flash attention); targets: prefill >= 2x and decode >= 0.4x llama.cpp's best.
Single-stream decode is bound by streaming the float32 weights once per token: the bound printed is
weight bytes / the matrix-vector bandwidth measured in this run.

It runs as the service's workers do, with `statemesh.worker.runtime.worker_environment()` (it starts
itself again with those settings when they are missing; --plain-env runs without them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from statemesh.memory import Batch
from statemesh.worker import Model, default_model_path, load_model
from statemesh.worker.runtime import missing_settings, worker_environment

LLAMA_CPP_BEST = {"prefill_tokens_per_s": 200.0, "decode_tokens_per_s": 100.0}


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def prompt_tokens(model: Model, n: int) -> list[int]:
    text = "The history of Paris spans more than two thousand years of kings, revolutions and art. " * 64
    ids = model.tokenizer.encode(text)
    assert len(ids) >= n, f"the benchmark text makes {len(ids)} tokens, fewer than {n}"
    return ids[:n]


def bench_prefill(model: Model, ids: list[int], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        mem = model.create_memory(n_ctx=len(ids) + 8, n_seq_max=1)
        flags = [False] * (len(ids) - 1) + [True]
        start = time.perf_counter()
        model.decode(mem, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids, logits=flags))
        times.append(time.perf_counter() - start)
    return len(ids) / statistics.median(times)


def bench_decode(model: Model, ids: list[int], n_new: int, repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        mem = model.create_memory(n_ctx=len(ids) + n_new + 8, n_seq_max=1)
        flags = [False] * (len(ids) - 1) + [True]
        logits = model.decode(mem, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids, logits=flags))
        pos, token = len(ids), int(np.argmax(logits[-1]))
        start = time.perf_counter()
        for _ in range(n_new):
            logits = model.decode(mem, Batch([pos], [0], tokens=[token]))
            pos, token = pos + 1, int(np.argmax(logits[-1]))
        rates.append(n_new / (time.perf_counter() - start))
    return statistics.median(rates)


def matvec_bandwidth() -> float:
    """GB/s of a float32 matrix-vector product over a matrix much larger than the caches."""
    w = np.ones((8192, 8192), dtype=np.float32)
    x = np.ones(8192, dtype=np.float32)
    x @ w  # warm up
    times = []
    for _ in range(7):
        start = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - start)
    return w.nbytes / statistics.median(times) / 1e9


def weight_bytes(model: Model) -> tuple[int, int]:
    """(all weight bytes, the bytes one decode step streams: all but the embedding table, of which
    a step reads one row)."""
    arrays: dict[int, np.ndarray] = {}  # by id: the tied head's [V, E] is the embedding itself
    for value in vars(model).values():
        for item in value if isinstance(value, list) else [value]:
            fields = vars(item).values() if hasattr(item, "__dict__") else [item]
            arrays.update((id(a), a) for a in fields if isinstance(a, np.ndarray))
    total = sum(a.nbytes for a in arrays.values())
    embedding = getattr(model, "embedding", None)
    return total, total - (embedding.nbytes if isinstance(embedding, np.ndarray) else 0)


LLAMA_CPP_STREAMS = {1: 100.0, 8: 165.0, 32: 170.0}


def stream_prompts(model: Model, streams: int, shared: float, prompt_len: int = 256) -> list[list[int]]:
    """`streams` prompts of `prompt_len` tokens whose first `shared` fraction is common."""
    base = prompt_tokens(model, prompt_len)
    common = int(prompt_len * shared)
    rng = np.random.default_rng(streams)
    return [
        base[:common] + [int(t) for t in rng.integers(100, 40000, size=prompt_len - common)] for _ in range(streams)
    ]


def bench_streams(model: Model, prompts: list[list[int]], new: int = 128) -> dict[str, Any]:
    from statemesh.worker.engine.engine import Engine, EngineConfig, Request
    from statemesh.worker.engine.sampling import SamplingParams

    streams = len(prompts)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    requests = [Request(f"s{i}", tuple(p), params) for i, p in enumerate(prompts)]
    engine = Engine(model, EngineConfig(n_ctx=sum(len(p) for p in prompts) + streams * new + 64, n_seq_max=streams))
    start = time.perf_counter()
    for r in requests:
        engine.add(r)
    first: dict[str, float] = {}
    decode_start, decoded_before, produced = None, 0, 0
    while engine.has_work():
        for event in engine.step():
            produced += 1
            first.setdefault(event.request_id, time.perf_counter() - start)
        if decode_start is None and len(first) == streams:
            decode_start, decoded_before = time.perf_counter(), produced
    total = time.perf_counter() - start
    ttft = np.array(sorted(first.values()))
    decode_rate = (produced - decoded_before) / (time.perf_counter() - decode_start) if decode_start else 0.0
    return {
        "aggregate_tokens_per_s": produced / total, "decode_phase_tokens_per_s": decode_rate,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "preemptions": engine.counters["preemptions"], "prefix_hits": engine.stats()["prefix_hits"],
    }  # fmt: skip


def run_anchor(python: str, model_path: str, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """llama.cpp on the same prompts, in the interpreter that has llama-cpp-python."""
    import subprocess

    script = Path(__file__).with_name("anchor_llamacpp.py")
    spec = json.dumps({"model": model_path, "prompts": prompts, "new_tokens": new, "threads": 2})
    done = subprocess.run([python, str(script)], input=spec, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file or Hugging Face folder (default: SmolLM2)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=int, nargs="*", help="run the engine workload at these stream counts")
    parser.add_argument("--shared", type=float, default=0.0, help="fraction of each prompt shared (with --streams)")
    parser.add_argument(
        "--anchor", choices=["llamacpp"], help="also run the workload on llama.cpp (make bench-anchors)"
    )
    parser.add_argument("--anchor-python", default=".venv-anchors/bin/python")
    parser.add_argument(
        "--plain-env", action="store_true", help="run without the worker settings (statemesh.worker.runtime)"
    )
    args = parser.parse_args()
    missing = missing_settings()
    if missing and not args.plain_env:  # read at process start: run again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **worker_environment()})
    if args.streams:
        path = str(args.model or default_model_path())
        model = load_model(path, backend="numpy", progress=False)
        for n in args.streams:
            prompts = stream_prompts(model, n, args.shared)
            ours = bench_streams(model, prompts)
            common = {"bench": "engine_streams", "streams": n, "shared_prefix": args.shared, "prompt_tokens": 256,
                      "new_tokens": 128, "worker_env": not missing}  # fmt: skip
            emit(
                **common,
                **ours,
                vs_llama_cpp_best=ours["aggregate_tokens_per_s"] / LLAMA_CPP_STREAMS.get(n, float("nan")),
                # the issue's llama.cpp figures are decode rates (its prefill alone would take longer)
                decode_vs_llama_cpp_best=ours["decode_phase_tokens_per_s"] / LLAMA_CPP_STREAMS.get(n, float("nan")),
            )
            if args.anchor:
                theirs = run_anchor(args.anchor_python, path, prompts, 128)
                ratio = ours["aggregate_tokens_per_s"] / theirs["aggregate_tokens_per_s"]
                decode_ratio = ours["decode_phase_tokens_per_s"] / theirs["decode_phase_tokens_per_s"]
                emit(**common, engine="llama.cpp", **theirs, ours_over_llama_cpp=ratio,
                     ours_over_llama_cpp_decode=decode_ratio)  # fmt: skip
        return
    start = time.perf_counter()
    model = load_model(args.model or default_model_path(), backend="numpy", progress=False)
    load_s = time.perf_counter() - start
    ids = prompt_tokens(model, args.prompt_tokens)
    bench_prefill(model, ids[:32], 1)  # warm up
    prefill = bench_prefill(model, ids, args.repeat)
    decode = bench_decode(model, ids[:16], args.decode_tokens, args.repeat)
    bandwidth = matvec_bandwidth()
    nbytes, streamed = weight_bytes(model)
    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS") or "default"
    common = {"model": model.config.name, "backend": "numpy", "cpus": os.cpu_count(), "blas_threads": threads,
              "worker_env": not missing}  # fmt: skip
    emit(bench="load", seconds=load_s, weight_bytes=nbytes, **common)
    emit(bench="prefill", prompt_tokens=len(ids), tokens_per_s=prefill,
         vs_llama_cpp_best=prefill / LLAMA_CPP_BEST["prefill_tokens_per_s"], target=2.0, **common)  # fmt: skip
    emit(bench="decode", new_tokens=args.decode_tokens, tokens_per_s=decode,
         vs_llama_cpp_best=decode / LLAMA_CPP_BEST["decode_tokens_per_s"], target=0.4,
         bytes_streamed_per_token=streamed, matvec_gb_per_s=bandwidth,
         bandwidth_bound_tokens_per_s=bandwidth * 1e9 / streamed,
         of_bound=decode / (bandwidth * 1e9 / streamed),
         of_issue_bound_51=decode / 51.0, **common)  # fmt: skip
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    emit(bench="memory", peak_rss_mb=peak_kib / 1024, **common)


if __name__ == "__main__":
    main()
