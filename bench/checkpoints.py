"""What recovery checkpoints cost the engine (issue 15): decode tokens/s with a checkpoint of every
running request every K tokens against none, in the same run, and the bytes written per token.

    python bench/checkpoints.py [--model PATH] [--streams 1 32] [--every 16] [--rounds 3] [--service]

bench/engine.py's workload (256-token prompts of random tokens, 128 new tokens, greedy, ignore_eos) at each stream
count, through `statemesh.worker.engine.engine.Engine` in this process; runs with and without
checkpoints alternate (`--rounds` pairs; the medians are compared, as `ratio` = with / without;
target >= 0.95). A checkpoint is what a replica sends the coordinator (`Engine.checkpoints`): the
piece of the sequence since the last one, and its recurrent and sampler state; `bytes_per_token`
is their total size over the tokens generated, and `bytes_per_checkpoint_first` / `_later` show
that only the first holds the whole sequence. One JSON object per line, naming the CPU and its
OpenBLAS core. It runs under `statemesh.worker.runtime`'s worker settings, as bench/engine.py does.

--service measures the same through the service, where checkpoints also travel to the coordinator:
`statemesh serve --checkpoint-every K` against `--checkpoint-every 0` (bench/service.py's server and
clients, one server at a time), the two alternating round by round, each round a fresh server;
`service_checkpoints` lines compare the decode-phase tokens/s of the same streams (target >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from engine import emit  # bench/engine.py (this script's folder is on sys.path)

from statemesh.worker import Model, default_model_path, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.kernels.row_blocks import openblas_core
from statemesh.worker.runtime import missing_settings, worker_environment


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run(model: Model, prompts: list[list[int]], new: int, every: int) -> dict[str, Any]:
    """One pass: decode-phase tokens/s (after every request has its first token) and checkpoints."""
    config = EngineConfig(n_ctx=len(prompts) * (len(prompts[0]) + new + 8), n_seq_max=len(prompts),
                          checkpoint_every=every, prefix_cache_seqs=0)  # fmt: skip
    engine = Engine(model, config)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add(Request(f"r{i}", tuple(prompt), params))
    first: set[str] = set()
    decode_start, decode_tokens, sizes = None, 0, []
    while engine.has_work():
        events = engine.step()
        sizes += [len(c.data) for c in engine.checkpoints]
        engine.checkpoints.clear()
        if decode_start is not None:
            decode_tokens += len(events)
        first |= {e.request_id for e in events}
        if decode_start is None and len(first) == len(prompts):
            decode_start = time.perf_counter()
    assert decode_start is not None
    elapsed = time.perf_counter() - decode_start
    return {"decode_tokens_per_s": decode_tokens / elapsed, "checkpoints": sizes, "tokens": len(prompts) * new}


def run_service_rounds(args: argparse.Namespace, model: Model, machine: dict[str, Any]) -> None:
    """The service with checkpoints every `args.every` tokens against none, alternating by round."""
    import service  # bench/service.py: its server, its clients, its measures

    model_path = str(args.model or default_model_path())
    prompts = {n: service.workload_prompts(model, n, 256) for n in args.streams}
    n_ctx, max_seqs = max(args.streams) * (256 + args.new_tokens + 8), max(args.streams)
    rates: dict[tuple[int, int], list[float]] = {}
    stops: list[dict[str, Any]] = []
    for i in range(args.rounds):
        for every in [args.every, 0] if i % 2 == 0 else [0, args.every]:
            serve_args = ["--model", model_path, "--n-ctx", str(n_ctx), "--max-seqs", str(max_seqs),
                          "--checkpoint-every", str(every)]  # fmt: skip
            with service.serving(serve_args, {**machine, "every": every}, stops) as server:
                service.run_service(server.address, [prompts[args.streams[0]][0]], 8)  # warm
                for n in args.streams:
                    traces, start, _ = service.run_service(server.address, prompts[n], args.new_tokens)
                    summary = service.summarize(traces, start)
                    rates.setdefault((n, every), []).append(summary["decode_phase_tokens_per_s"])
    for n in args.streams:
        with_, without = statistics.median(rates[(n, args.every)]), statistics.median(rates[(n, 0)])
        emit(bench="service_checkpoints", streams=n, every=args.every, rounds=args.rounds, **machine,
             decode_tokens_per_s_with=round(with_, 2), decode_tokens_per_s_without=round(without, 2),
             ratio=round(with_ / without, 3), target_ratio=0.95, runs_with=rates[(n, args.every)],
             runs_without=rates[(n, 0)], clean_stops=all(s.get("exit_code") == 0 for s in stops))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file or Hugging Face folder (default: SmolLM2)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--every", type=int, default=16, help="tokens between a request's checkpoints")
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs of runs per stream count")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--plain-env", action="store_true", help="run without the worker settings")
    parser.add_argument("--service", action="store_true", help="through the service, not the engine in process")
    args = parser.parse_args()
    if not args.plain_env and missing_settings():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **worker_environment()})
    model = load_model(args.model or default_model_path(), backend="numpy", progress=False)
    machine = {"cpu": cpu_name(), "openblas_core": openblas_core(), "model": model.config.name}
    if args.service:
        run_service_rounds(args, model, machine)
        return
    for streams in args.streams:
        rng = np.random.default_rng(streams)  # distinct prompts: no prefix shared between streams
        prompts = [[int(t) for t in rng.integers(0, model.config.vocab_size, 256)] for _ in range(streams)]
        without, with_ = [], []
        last: dict[str, Any] = {}
        for i in range(args.rounds):
            order = [0, args.every] if i % 2 == 0 else [args.every, 0]
            for every in order:
                result = run(model, prompts, args.new_tokens, every)
                (with_ if every else without).append(result["decode_tokens_per_s"])
                if every:
                    last = result
        sizes = last["checkpoints"]
        later = round(statistics.median(sizes[streams:])) if len(sizes) > streams else 0
        emit(bench="checkpoints", streams=streams, every=args.every, **machine,
             decode_tokens_per_s_without=round(statistics.median(without), 2),
             decode_tokens_per_s_with=round(statistics.median(with_), 2),
             ratio=round(statistics.median(with_) / statistics.median(without), 3), target_ratio=0.95,
             checkpoints=len(sizes), bytes_per_token=round(sum(sizes) / last["tokens"]),
             bytes_per_checkpoint_first=sizes[0] if sizes else 0,
             bytes_per_checkpoint_later=later)  # fmt: skip


if __name__ == "__main__":
    main()
