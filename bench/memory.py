"""Memory-layer benchmark: one JSON object per line.

    python bench/memory.py [--backend numpy|cupy] [--quick]

(a) store_kv and kv gather throughput for one resident sequence and for 16 (filled one after
    another, and interleaved as batched decode leaves them);
(b) seq_cp time for sequences of growing length (it shares cells, so it must not grow with length);
(c) snapshot write and read of a SmolLM2-sized state (30 layers, 3 KV heads, head dim 64, float32,
    4,096 tokens ~= 189 MB) next to NumPy's copy bandwidth of the same bytes, measured in this run.
Targets (issue 2): write and read >= 0.5x copy bandwidth; seq_cp < 1 ms at any length; gather for
one sequence no slower with 16 resident than with one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, Batch, Memory, MemorySpec, create_memory

SMOLLM2 = MemorySpec(tuple(AttentionSpec(3, 64) for _ in range(30)))


def median_seconds(fn: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> float:
    fn()  # warm up (allocations, caches)
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def allocator() -> str:
    """Whether glibc's malloc was tuned to keep freed memory (see `make bench`): fresh multi-MB
    buffers otherwise page-fault on every call, which dominates gathers and snapshot writes."""
    tuned = [k for k in ("MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_") if k in os.environ]
    return "glibc-tuned" if tuned else "glibc-default"


def emit(**fields: Any) -> None:
    print(json.dumps({**fields, "allocator": allocator()}), flush=True)


def fill(mem: Memory, seqs: list[int], n_tokens: int, interleaved: bool, xp: Any) -> None:
    """Prefill `n_tokens` for each of `seqs` with constant rows, in 512-token micro-batches."""
    if interleaved:  # batched decode: one token of every sequence per step, chunked for speed
        positions = np.repeat(np.arange(n_tokens), len(seqs))
        seq_ids = np.tile(np.array(seqs), n_tokens)
        chunks = [(positions, seq_ids)]
    else:
        chunks = [(np.arange(n_tokens), np.full(n_tokens, s)) for s in seqs]
    for positions, seq_ids in chunks:
        with mem.batch(Batch(positions, seq_ids), n_ubatch=512) as plan:
            for ub in plan:
                for layer in mem.layers:
                    k = xp.ones((len(ub), 3, 64), dtype=xp.float32)
                    ub.store_kv(layer, k, k)


def bench_gather(backend: str, xp: Any, sync: Callable[[], None], n_tokens: int, repeat: int) -> None:
    spec = MemorySpec(tuple(AttentionSpec(3, 64) for _ in range(4)))
    row_bytes = 2 * 3 * 64 * 4  # K and V of one token at one layer
    for resident, interleaved in ((1, False), (16, False), (16, True)):
        mem = create_memory(spec, n_ctx=resident * n_tokens + 512, n_seq_max=17, backend=backend)
        fill(mem, list(range(resident)), n_tokens, interleaved, xp)
        layout = "interleaved" if interleaved else "one_after_another"
        gather = median_seconds(lambda mem=mem: [mem.kv(layer, 0) for layer in mem.layers], repeat, sync)
        emit(
            bench="kv_gather", backend=backend, resident_seqs=resident, layout=layout, seq_tokens=n_tokens,
            seconds=gather, gb_per_s=n_tokens * row_bytes * len(mem.layers) / gather / 1e9,
        )  # fmt: skip
        # store: one 512-token micro-batch of a new sequence, every layer
        k = xp.ones((512, 3, 64), dtype=xp.float32)
        seq = resident

        def store(mem: Memory = mem, seq: int = seq, k: Any = k) -> None:
            with mem.batch(Batch(np.arange(512), np.full(512, seq)), n_ubatch=512) as plan:
                for ub in plan:
                    for layer in mem.layers:
                        ub.store_kv(layer, k, k)
            mem.seq_rm(seq)

        stored = median_seconds(store, repeat, sync)
        emit(
            bench="store_kv_batch", backend=backend, resident_seqs=resident, layout=layout, tokens=512,
            seconds=stored, gb_per_s=512 * row_bytes * len(mem.layers) / stored / 1e9,
        )  # fmt: skip


def bench_seq_cp(backend: str, xp: Any, sync: Callable[[], None], lengths: tuple[int, ...], repeat: int) -> None:
    for n_tokens in lengths:
        mem = create_memory(SMOLLM2, n_ctx=n_tokens, n_seq_max=2, backend=backend)
        fill(mem, [0], n_tokens, False, xp)

        def fork(mem: Memory = mem) -> None:
            mem.seq_cp(0, 1)
            mem.seq_rm(1)

        seconds = median_seconds(fork, repeat, sync)
        emit(bench="seq_cp", backend=backend, seq_tokens=n_tokens, ms=seconds * 1e3, target_ms=1.0,
             note="seq_cp + seq_rm of the copy; cells are shared, no K/V bytes move")  # fmt: skip


def bench_snapshot(backend: str, xp: Any, sync: Callable[[], None], n_tokens: int, repeat: int) -> None:
    mem = create_memory(SMOLLM2, n_ctx=n_tokens, n_seq_max=1, backend=backend)
    fill(mem, [0], n_tokens, False, xp)
    nbytes = n_tokens * SMOLLM2.bytes_per_token
    source = np.ones(nbytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    copy_into = median_seconds(lambda: np.copyto(target, source), repeat, sync)
    copy_fresh = median_seconds(lambda: source.copy(), repeat, sync)
    write_view = median_seconds(lambda: mem.state_write_buffer(0), repeat, sync)
    write_bytes = median_seconds(lambda: mem.state_write(0), repeat, sync)
    data = mem.state_write_buffer(0)
    other = create_memory(SMOLLM2, n_ctx=n_tokens, n_seq_max=1, backend=backend)
    read = median_seconds(lambda: other.state_read(data), repeat, sync)
    assert bytes(other.state_write_buffer(0)) == bytes(data)
    base = {
        "bench": "snapshot",
        "backend": backend,
        "seq_tokens": n_tokens,
        "bytes": nbytes,
        "snapshot_bytes": len(data),
    }
    gbps = {
        "numpy_copy_into_gb_per_s": nbytes / copy_into / 1e9,
        "numpy_copy_fresh_gb_per_s": nbytes / copy_fresh / 1e9,
        "write_buffer_gb_per_s": nbytes / write_view / 1e9,
        "write_bytes_gb_per_s": nbytes / write_bytes / 1e9,
        "read_gb_per_s": nbytes / read / 1e9,
    }
    emit(**base, **gbps,
         write_buffer_vs_copy_into=gbps["write_buffer_gb_per_s"] / gbps["numpy_copy_into_gb_per_s"],
         write_buffer_vs_copy_fresh=gbps["write_buffer_gb_per_s"] / gbps["numpy_copy_fresh_gb_per_s"],
         write_bytes_vs_copy_fresh=gbps["write_bytes_gb_per_s"] / gbps["numpy_copy_fresh_gb_per_s"],
         read_vs_copy_into=gbps["read_gb_per_s"] / gbps["numpy_copy_into_gb_per_s"],
         target_ratio=0.5)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (a smoke run)")
    args = parser.parse_args()
    if args.backend == "cupy":
        import cupy  # type: ignore[import-not-found]

        xp: Any = cupy

        def sync() -> None:
            cupy.cuda.Device().synchronize()
    else:
        xp = np

        def sync() -> None:
            pass

    n_tokens, repeat = (512, 3) if args.quick else (4096, 9)
    bench_gather(args.backend, xp, sync, n_tokens, repeat)
    bench_seq_cp(args.backend, xp, sync, (256, 1024) if args.quick else (256, 1024, 4096, 16384), repeat)
    bench_snapshot(args.backend, xp, sync, n_tokens, repeat)


if __name__ == "__main__":
    main()
