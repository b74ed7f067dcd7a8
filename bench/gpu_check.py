"""GPU check for the sessions that are lent a GPU machine: `make gpu-check` (or
`python bench/gpu_check.py`).

1. The memory tests' core cases on CuPy: for every kind of memory, a seeded script of batches
   (interleaved sequences, random micro-batch sizes, some failing mid-way), seq_rm / seq_cp /
   seq_keep / seq_add with k_shift / seq_div, runs on a NumPy memory and a CuPy memory side by
   side; after every step both must show the same sequences, spans and counters, and write the
   very same snapshot bytes (snapshots are device-independent). A CuPy snapshot is then restored
   into a NumPy memory and the other way round.
2. Every reference fixture model (tests/fixtures/) on CuPy: its prompt logits must match the same
   model on NumPy (relative error < 1e-4), and a decode step after a snapshot moved from the
   device to the host must match too.
3. `bench/memory.py --backend cupy`, whose JSON lines it passes through.

`--device numpy` runs part 1 with NumPy on both sides: the test suite does that, so this script
cannot rot on machines without a GPU. Exits non-zero on any mismatch, or when CuPy or a GPU is
missing (it says which).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from statemesh.memory import (
    AttentionSpec,
    Batch,
    Memory,
    MemoryFull,
    MemorySpec,
    RecurrentSpec,
    create_memory,
    get_backend,
)

SPECS = {
    "kv": MemorySpec((AttentionSpec(2, 8), AttentionSpec(2, 8))),
    "iswa": MemorySpec((AttentionSpec(2, 8, window=5), AttentionSpec(2, 8), AttentionSpec(2, 8, window=5))),
    "recurrent": MemorySpec((RecurrentSpec((4, 3), (4, 6)), RecurrentSpec((4, 3), (4, 6)))),
    "hybrid": MemorySpec((RecurrentSpec((4, 3), (4, 6)), AttentionSpec(2, 8), None)),
    "hybrid_iswa": MemorySpec((RecurrentSpec((4, 3), (4, 6)), AttentionSpec(2, 8, window=5))),
}
N_SEQ = 4


class Failed(Exception):
    pass


def k_shift_for(xp: Any) -> Any:
    def k_shift(layer: int, k: Any, delta: Any) -> Any:
        return k + (delta[:, None, None] * (layer + 1)).astype(xp.float32)

    return k_shift


class Pair:
    """The same memory on the host and on the device, driven by one seeded script."""

    def __init__(self, kind: str, device: str, seed: int):
        self.kind = kind
        self.xp = get_backend(device).xp
        spec = SPECS[kind]
        self.host = create_memory(spec, n_ctx=96, n_seq_max=N_SEQ, n_ubatch=8, backend="numpy",
                                  k_shift=k_shift_for(np))  # fmt: skip
        self.dev = create_memory(spec, n_ctx=96, n_seq_max=N_SEQ, n_ubatch=8, backend=device,
                                 k_shift=k_shift_for(self.xp))  # fmt: skip
        self.rng = np.random.default_rng(seed)
        self.committed = 0  # batches the host kept: the check is not vacuous

    def both(self, call: Any) -> None:
        errors = []
        for mem in (self.host, self.dev):
            try:
                call(mem)
                errors.append(None)
            except MemoryFull:
                errors.append("MemoryFull")
        if errors[0] != errors[1]:
            raise Failed(f"{self.kind}: host {errors[0]} but device {errors[1]}")

    def compare(self, step: str) -> None:
        for mem in (self.host, self.dev):
            mem.check_integrity()
        spans = [[(s, m.seq_pos_min(s), m.seq_pos_max(s)) for s in m.seq_ids()] for m in (self.host, self.dev)]
        if spans[0] != spans[1]:
            raise Failed(f"{self.kind} after {step}: spans {spans[0]} on the host, {spans[1]} on the device")
        if self.host.stats()["cells_used"] != self.dev.stats()["cells_used"]:
            raise Failed(f"{self.kind} after {step}: cells used differ")
        if self.host.state_write() != self.dev.state_write():
            raise Failed(f"{self.kind} after {step}: snapshots differ between host and device")

    def batch(self) -> None:
        seqs = sorted(set(self.rng.integers(0, N_SEQ, size=self.rng.integers(1, 4)).tolist()))
        seq_ids, positions = [], []
        for s in seqs:
            start = self.host.seq_pos_max(s) + 1
            n = int(self.rng.integers(1, 7))
            seq_ids += [s] * n
            positions += list(range(start, start + n))
        order = np.argsort(self.rng.random(len(seq_ids)), kind="stable")
        by_seq = {s: iter([p for q, p in zip(seq_ids, positions, strict=True) if q == s]) for s in seqs}
        seq_ids = [seq_ids[i] for i in order]
        positions = [next(by_seq[s]) for s in seq_ids]
        n_ubatch = int(self.rng.integers(1, 9))
        fail_at = int(self.rng.integers(0, 6))
        data = self.rng.standard_normal((64, 64)).astype(np.float32)  # shared noise for both sides
        for mem, xp in ((self.host, np), (self.dev, self.xp)):
            self.run_batch(mem, xp, Batch(positions, seq_ids), n_ubatch, fail_at, data)

    def run_batch(self, mem: Memory, xp: Any, batch: Batch, n_ubatch: int, fail_at: int, data: np.ndarray) -> None:
        try:
            plan = mem.batch(batch, n_ubatch=n_ubatch)
        except MemoryFull:
            return
        try:
            with plan:
                for i, ub in enumerate(plan):
                    for layer in mem.layers:
                        spec = mem.spec.layers[layer]
                        if isinstance(spec, AttentionSpec):
                            rows = data[: len(ub) * 2, : spec.n_kv_heads * spec.head_dim]
                            k = xp.asarray(rows[: len(ub)].reshape(len(ub), *spec.k_shape))
                            v = xp.asarray(rows[len(ub) :].reshape(len(ub), *spec.v_shape))
                            ub.store_kv(layer, k, v)
                            ub.kv_batch(layer)
                        else:
                            conv, ssm = ub.state(layer)
                            noise = xp.asarray(data.reshape(-1)[: conv.size].reshape(conv.shape))
                            ub.store_state(layer, conv * xp.float32(0.5) + noise, ssm + xp.float32(1))
                    if i == fail_at:
                        raise KeyError("planned failure")
            self.committed += mem is self.host
        except KeyError:
            pass

    def step(self, i: int) -> None:
        op = self.rng.choice(["batch"] * 4 + ["rm", "cp", "keep", "add", "div"])
        s, t = (int(x) for x in self.rng.integers(0, N_SEQ, size=2))
        p0, p1 = sorted(int(x) for x in self.rng.integers(-2, 30, size=2))
        if op == "batch":
            self.batch()
        elif op == "rm":
            results = [m.seq_rm(s, p0, p1) for m in (self.host, self.dev)]
            if results[0] != results[1]:
                raise Failed(f"{self.kind}: seq_rm answered {results[0]} on the host, {results[1]} on the device")
        elif op == "cp":
            self.both(lambda m: m.seq_cp(s, t, p0, p1))
        elif op == "keep" and s % 2:  # now and then: it empties the memory
            self.both(lambda m: m.seq_keep(s))
        elif op == "add":
            delta = int(self.rng.integers(-3, 4))
            self.both(lambda m: m.seq_add(s, p0, p1, delta))
        elif op == "div":
            self.both(lambda m: m.seq_div(s, p0, p1, 2))
        self.compare(f"step {i} ({op})")

    def cross_restore(self) -> None:
        spec = SPECS[self.kind]
        for src, backend in ((self.dev, "numpy"), (self.host, self.dev.backend.name)):
            other = create_memory(spec, n_ctx=128, n_seq_max=N_SEQ, n_ubatch=8, backend=backend)
            data = src.state_write()
            other.state_read(data)
            if other.state_write() != data:
                raise Failed(f"{self.kind}: a snapshot did not survive {src.backend.name} -> {backend}")


def check_memory(device: str, steps: int) -> None:
    for kind in SPECS:
        pair = Pair(kind, device, seed=len(kind))
        for i in range(steps):
            pair.step(i)
        pair.cross_restore()
        print(json.dumps({"check": "memory_mirror", "kind": kind, "device": device, "steps": steps,
                          "batches_committed": pair.committed, "ok": True}))  # fmt: skip


def check_models(device: str) -> None:
    from statemesh.worker import load_model

    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
    ids = [5, 17, 42, 99, 100, 250, 7, 8, 9, 10, 11]
    for folder in sorted(p for p in fixtures.iterdir() if (p / "config.json").is_file()):
        host = load_model(folder, backend="numpy", progress=False)
        dev = load_model(folder, backend=device, progress=False)
        batch = Batch(list(range(len(ids))), [0] * len(ids), tokens=ids)
        mem_host, mem_dev = host.create_memory(n_ctx=64, n_seq_max=2), dev.create_memory(n_ctx=64, n_seq_max=2)
        ref = host.decode(mem_host, batch)
        got = dev.backend.to_host(dev.decode(mem_dev, batch))
        error = float(np.abs(got - ref).max() / np.abs(ref).max())
        # the device's state continues on the host
        mem_host.state_read(mem_dev.state_write(0), seq=1)
        step = Batch([len(ids)], [1], tokens=[3])
        moved = float(
            np.abs(
                host.decode(mem_host, step)
                - dev.backend.to_host(dev.decode(mem_dev, Batch([len(ids)], [0], tokens=[3])))
            ).max()
        )
        ok = error < 1e-4 and moved < 1e-3 * float(np.abs(ref).max())
        print(json.dumps({"check": "model", "fixture": folder.name, "device": device, "rel_error": error, "ok": ok}))
        if not ok:
            raise Failed(f"{folder.name}: device logits differ from the host's (relative error {error})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cupy", "numpy"], default="cupy")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-bench", action="store_true")
    args = parser.parse_args()
    if args.device == "cupy":
        get_backend("cupy")  # BackendUnavailable with the reason when there is no usable GPU
    try:
        check_memory(args.device, args.steps)
        check_models(args.device)
    except Failed as e:
        print(json.dumps({"check": "memory_mirror", "ok": False, "error": str(e)}))
        return 1
    if not args.no_bench:
        bench = Path(__file__).with_name("memory.py")
        return subprocess.run([sys.executable, str(bench), "--backend", args.device], check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
