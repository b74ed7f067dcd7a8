"""Model and engine benchmark on the CPU: one JSON object per line.

    python bench/engine.py [--model PATH] [--prompt-tokens 512] [--decode-tokens 128] [--repeat 3]
    python bench/engine.py --streams 1 8 32 [--shared 0.9]
    python bench/engine.py --streams 1 32 --weights f32 q8 q4

--weights (issue 17): how the model keeps its large matrices (`load_model(weights=...)`): float32, or
packed (q8: int8 blocks; q4: a GGUF's 4-bit blocks as they are). With --streams, each stream count runs
with every listed kind in turn, in this process, and a line of ratios to the first follows; without,
this script runs once per kind in a fresh process, so that each peak RSS is that kind's alone. Every
line names the OpenBLAS core (float32 products' kernels differ by core: Haswell, SkylakeX, ...).

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

Load (issue 17, start fast: llama.cpp loads the default model in 0.31 s on the AVX2 host): the
seconds of the first load in this process, by stage (`timed_load`), then of each stage's load of a
2-stage pipeline (layers [0, n/2) and [n/2, n), as `load_model(..., layers=...)` loads them for the
stage actors). The prefill and decode runs wait until the arena's weights are in huge pages
(`HostArena`).

It runs as the service's workers do, with `statemesh.worker.runtime.worker_environment()` (it starts
itself again with those settings when they are missing; --plain-env runs without them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from statemesh.memory import Batch
from statemesh.worker import Model, default_model_path, load_model
from statemesh.worker.kernels.row_blocks import openblas_core
from statemesh.worker.loading import gguf_file, loader
from statemesh.worker.loading.host_arena import wait_for_huge_pages
from statemesh.worker.loading.loader import WEIGHTS
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


def timed_load(path: str | Path, layers: range | None = None, weights: str = "f32") -> tuple[Model, dict[str, float]]:
    """`load_model(path, layers=layers)` and its seconds by stage, for a GGUF file: `header_s` (metadata
    and tensor infos), `tokenizer_s` (built from the metadata), `tensors_s` (the wanted tensors read and
    dequantized), `build_s` (the model built from them: the copies into the arena); `total_s` for any
    model. The stages are timed by wrapping the loader's functions for this one call."""
    spent: dict[str, float] = {}

    def clocked(function: Any, stage: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - start

        return run

    wrapped = [(gguf_file, "read_gguf_header", "header_s"), (gguf_file, "tokenizer_from_gguf", "tokenizer_s"),
               (loader, "read_gguf", "read_s")]  # fmt: skip
    originals = [(module, name, getattr(module, name)) for module, name, _ in wrapped]
    for module, name, stage in wrapped:
        setattr(module, name, clocked(getattr(module, name), stage))
    try:
        start = time.perf_counter()
        model = load_model(path, backend="numpy", progress=False, layers=layers, weights=weights)
        stages = {"total_s": time.perf_counter() - start}
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
    if "read_s" in spent:  # a GGUF file
        header, tokenizer, read = spent["header_s"], spent["tokenizer_s"], spent["read_s"]
        stages.update(header_s=header, tokenizer_s=tokenizer, tensors_s=read - header - tokenizer,
                      build_s=stages["total_s"] - read)  # fmt: skip
    return model, stages


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


def first_calls(model: Model) -> float:
    """Seconds of a first prefill and of first decode steps of one and of two sequences: with packed
    weights, numba compiling their loops (or loading them from its cache) for each kind of product."""
    start = time.perf_counter()
    mem = model.create_memory(n_ctx=32, n_seq_max=2)
    model.decode(mem, Batch([0, 1, 2], [0, 0, 0], tokens=[1, 2, 3]))
    model.decode(mem, Batch([3], [0], tokens=[4]))
    model.decode(mem, Batch([4, 0], [0, 1], tokens=[5, 6]))
    return time.perf_counter() - start


def weights_ratios(runs: dict[str, dict[str, Any]], against: str) -> dict[str, float]:
    """Each kind's aggregate and decode-phase tokens/s over those of `against`."""
    base = runs[against]
    out = {}
    for weights, run in runs.items():
        out[f"{weights}_aggregate_ratio"] = run["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
        out[f"{weights}_decode_ratio"] = run["decode_phase_tokens_per_s"] / base["decode_phase_tokens_per_s"]
    return out


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
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=["f32"], help="weights kept as (see above)")
    parser.add_argument(
        "--plain-env", action="store_true", help="run without the worker settings (statemesh.worker.runtime)"
    )
    args = parser.parse_args()
    missing = missing_settings()
    if missing and not args.plain_env:  # read at process start: run again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **worker_environment()})
    if args.streams:
        path = str(args.model or default_model_path())
        models = {w: load_model(path, backend="numpy", progress=False, weights=w) for w in args.weights}
        for weights, model in models.items():  # numba compiles the packed loops at their first call
            emit(bench="first_calls", weights=weights, seconds=first_calls(model), openblas_core=openblas_core())
        for n in args.streams:
            prompts = stream_prompts(models[args.weights[0]], n, args.shared)
            runs = {}
            for weights, model in models.items():
                ours = runs[weights] = bench_streams(model, prompts)
                common = {"bench": "engine_streams", "streams": n, "shared_prefix": args.shared, "prompt_tokens": 256,
                          "new_tokens": 128, "worker_env": not missing, "weights": weights,
                          "openblas_core": openblas_core()}  # fmt: skip
                emit(
                    **common,
                    **ours,
                    vs_llama_cpp_best=ours["aggregate_tokens_per_s"] / LLAMA_CPP_STREAMS.get(n, float("nan")),
                    # the issue's llama.cpp figures are decode rates (its prefill alone would take longer)
                    decode_vs_llama_cpp_best=ours["decode_phase_tokens_per_s"] / LLAMA_CPP_STREAMS.get(n, float("nan")),
                )
            if len(runs) > 1:
                emit(bench="engine_streams_by_weights", streams=n, against=args.weights[0],
                     openblas_core=openblas_core(), **weights_ratios(runs, args.weights[0]))  # fmt: skip
            if args.anchor:
                theirs = run_anchor(args.anchor_python, path, prompts, 128)
                emit(**{**common, "weights": None}, engine="llama.cpp", **theirs,
                     **{f"{w}_over_llama_cpp": r["aggregate_tokens_per_s"] / theirs["aggregate_tokens_per_s"]
                        for w, r in runs.items()},
                     **{f"{w}_over_llama_cpp_decode": r["decode_phase_tokens_per_s"] /
                        theirs["decode_phase_tokens_per_s"] for w, r in runs.items()})  # fmt: skip
        return
    if len(args.weights) > 1:  # one process per kind: each peak RSS its own (a later --weights wins)
        for weights in args.weights:
            subprocess.run([sys.executable, *sys.argv, "--weights", weights], check=True)
        return
    path = args.model or default_model_path()
    model, load_stages = timed_load(path, weights=args.weights[0])
    huge_pages_settled = wait_for_huge_pages(timeout=120)
    ids = prompt_tokens(model, args.prompt_tokens)
    bench_prefill(model, ids[:32], 1)  # warm up
    prefill = bench_prefill(model, ids, args.repeat)
    decode = bench_decode(model, ids[:16], args.decode_tokens, args.repeat)
    bandwidth = matvec_bandwidth()
    nbytes, streamed = weight_bytes(model)
    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS") or "default"
    common = {"model": model.config.name, "backend": "numpy", "cpus": os.cpu_count(), "blas_threads": threads,
              "worker_env": not missing, "weights": args.weights[0], "openblas_core": openblas_core()}  # fmt: skip
    emit(bench="load", seconds=load_stages.pop("total_s"), stages=load_stages, weight_bytes=nbytes,
         huge_pages_settled=huge_pages_settled, **common)  # fmt: skip
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
    n_layers = model.n_layers
    del model  # each stage's load on its own, as in a stage actor (after the peak RSS above)
    for first, end in ((0, n_layers // 2), (n_layers // 2, n_layers)):
        stage, stages = timed_load(path, range(first, end))
        emit(bench="load_stage", layers=[first, end], of_layers=n_layers, seconds=stages.pop("total_s"),
             stages=stages, weight_bytes=stage.weight_bytes, **common)  # fmt: skip
        del stage


if __name__ == "__main__":
    main()
