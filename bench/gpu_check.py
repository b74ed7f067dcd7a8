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
4. The service across devices: `statemesh serve --replicas 2 --backend cupy,numpy` on the Llama
   fixture (r0 on the GPU, r1 on the CPU). ListReplicas must show r0's workers on `cuda:0` and r1's
   on `cpu`; a seeded-sampled stream, started on r0, is migrated to r1 and back to r0 while it runs,
   and its tokens must be the in-process NumPy engine's; an idle session then goes r0 -> r1 -> r0,
   taking a turn on each, whose tokens must be the engine's too. A first differing token is let
   pass only where float noise between GPU and CPU can flip it (a near tie, see `near_tie`), and
   the lines say how many tokens matched.

`--device numpy` runs the parts with NumPy on both sides (part 4 with `--backend numpy,numpy`): the
test suite does that, so this script cannot rot on machines without a GPU. `--parts` picks parts
(part 3, the benchmark, runs last).
Exits non-zero on any mismatch, or when CuPy or a GPU is missing (it says which).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


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

    ids = [5, 17, 42, 99, 100, 250, 7, 8, 9, 10, 11]
    for folder in sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file()):
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


# ---- part 4: the service, serving and migrating GPU <-> CPU ----------------------------------------------

SERVE_TIMEOUT_S = 300.0  # Ray's start, and two replicas loading (a GPU's first kernels compile)
STOP_TIMEOUT_S = 60.0
READY = "statemesh listening on "
NOISE = 1e-3  # what GPU float noise can move a logprob or a cumulative probability by, with room to spare
PROMPT = [(7 * k + 3) % 300 + 20 for k in range(12)]
# the moving stream: seeded sampling, every kept candidate's logprob reported (top_k <= logprobs) so
# that a difference can be told apart from float noise; 12 + 400 tokens and two turns fit n_ctx 512
STREAM = {"max_tokens": 400, "temperature": 0.8, "top_k": 20, "seed": 7, "logprobs": 20, "ignore_eos": True}
TURN = {"max_tokens": 16, "temperature": 0.0, "logprobs": 2}


@contextlib.contextmanager
def served(args: list[str]) -> Iterator[str]:
    """`statemesh serve --port 0 ARGS` in a process group of its own; yields its address once it
    prints its ready line, and stops it with SIGTERM (SIGKILL of the group if it hangs)."""
    command = [sys.executable, "-m", "statemesh.cluster.cli", "serve", "--port", "0", *args]
    with tempfile.TemporaryDirectory() as folder:
        log_path = Path(folder) / "server.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        lines: queue.Queue[str] = queue.Queue()

        def read_stdout() -> None:  # on a thread: the wait for the ready line keeps its deadline
            for line in process.stdout or []:
                lines.put(line)

        threading.Thread(target=read_stdout, daemon=True).start()
        try:
            yield _ready_address(process, lines, log_path)
        except BaseException:  # the server's side of the story, before its log goes with the folder
            print(f"the server's log ends:\n{log_path.read_text()[-3000:]}", file=sys.stderr, flush=True)
            raise
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise Failed(f"the server did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM") from None


def _ready_address(process: subprocess.Popen[str], lines: queue.Queue[str], log_path: Path) -> str:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line.startswith(READY):
            return line[len(READY) :].strip()
    raise Failed(
        f"the server did not become ready in {SERVE_TIMEOUT_S:.0f} s; its log ends:\n{log_path.read_text()[-3000:]}"
    )


def near_tie(reference: Any, served_token: int, index: int, params: dict[str, Any]) -> bool:
    """Whether float noise can explain that the token at output `index` is `served_token` where the
    NumPy engine's event `reference` has another: the two tokens' logprobs are within NOISE (a near
    tie, which flips an argmax, or the order of two candidates before a draw), or, for a seeded draw,
    the two are neighbours in the candidates' order and the draw's uniform number lies within NOISE
    of the cumulative probability between them. (The engine draws one number a token, and
    `Generator.choice` picks the first candidate, by descending logit, whose cumulative probability
    passes it: e.g. probabilities 0.5, 0.3, 0.2 and a draw of 0.8004 pick the third; noise that moves
    the boundary at 0.8 past the draw picks the second.)"""
    candidates = [token for token, _ in reference.top_logprobs]  # most likely first
    logprobs = np.array([logprob for _, logprob in reference.top_logprobs])
    if served_token not in candidates:
        return False  # not even among the candidates: no float noise gets there
    mine, theirs = candidates.index(reference.token), candidates.index(served_token)
    if abs(logprobs[mine] - logprobs[theirs]) < NOISE:
        return True
    if not params["temperature"] or abs(mine - theirs) != 1:
        return False
    uniform = np.random.Generator(np.random.PCG64(params["seed"])).random(index + 1)[index]
    logits = logprobs[: params["top_k"]] / params["temperature"]  # the kept candidates (top_k <= logprobs)
    probs = np.exp(logits - logits[0])
    cumulative = np.cumsum(probs) / probs.sum()
    return bool(abs(cumulative[min(mine, theirs)] - uniform) < NOISE)


def matched_tokens(what: str, served: list[int], reference: list[Any], params: dict[str, Any]) -> int:
    """How many tokens, from the first, equal the reference's; raises Failed unless all do or the
    first difference is a near tie (after it, the two continue different texts)."""
    n = 0
    while n < min(len(served), len(reference)) and served[n] == reference[n].token:
        n += 1
    if n == len(served) == len(reference):
        return n
    if n == min(len(served), len(reference)):
        raise Failed(f"{what}: {len(served)} tokens served but the NumPy engine gave {len(reference)}")
    if not near_tie(reference[n], served[n], n, params):
        candidates = reference[n].top_logprobs[:4]
        raise Failed(f"{what}: token {n} is {served[n]} but the NumPy engine's is {reference[n].token}, and float "
                     f"noise cannot explain it (the engine's candidates there: {candidates})")  # fmt: skip
    return n


def engine_reference(prompt: list[int], params: dict[str, Any]) -> list[Any]:
    """The in-process NumPy engine's events for one request (what the service must reproduce)."""
    from statemesh.worker import load_model
    from statemesh.worker.engine.engine import Engine, EngineConfig, Request
    from statemesh.worker.engine.sampling import SamplingParams

    model = load_model(FIXTURES / "llama", backend="numpy", progress=False)
    engine = Engine(model, EngineConfig(n_ctx=512, n_seq_max=4))
    return engine.generate([Request("reference", tuple(prompt), SamplingParams(**params))])["reference"]


def check_service(device: str) -> None:
    from statemesh.cluster.client import Client, StatemeshError

    gpu = "cuda:0" if device == "cupy" else "cpu"
    args = ["--model", str(FIXTURES / "llama"), "--replicas", "2", "--backend", f"{device},numpy",
            "--n-ctx", "512", "--max-seqs", "4"]  # fmt: skip
    with served(args) as address, Client(address) as client:
        devices = {r.replica_id: sorted({w.device for w in r.workers}) for r in client.replicas()}
        ok = devices == {"r0": [gpu], "r1": ["cpu"]}
        print(json.dumps({"check": "service_devices", "device": device, "devices": devices, "ok": ok}), flush=True)
        if not ok:
            raise Failed(f"ListReplicas shows devices {devices}; expected r0 on {gpu} and r1 on cpu")
        try:
            history = check_moving_stream(client, device)
            check_moving_session(client, device, history)
        except StatemeshError as e:
            raise Failed(f"the service refused a call: {e}") from None


def check_moving_stream(client: Any, device: str) -> list[int]:
    """A seeded stream on r0, moved to r1 and back while it runs; returns the session's history."""
    client.create_session("gpu-check", replica_id="r0")
    stream = client.generate(PROMPT, session_id="gpu-check", request_id="gpu-check-stream", **STREAM)
    chunks = [next(stream)]
    moves = [client.migrate(request_id="gpu-check-stream", target_replica_id="r1")]
    for chunk in stream:  # back as soon as r1 has produced tokens
        chunks.append(chunk)
        if chunk.replica_id == "r1" and not chunk.finish_reason:
            moves.append(client.migrate(request_id="gpu-check-stream", target_replica_id="r0"))
            break
    chunks += list(stream)
    replicas = [c.replica_id for i, c in enumerate(chunks) if i == 0 or c.replica_id != chunks[i - 1].replica_id]
    if replicas != ["r0", "r1", "r0"]:
        raise Failed(f"the stream ran on {replicas}; expected r0, then r1, then r0 (did it finish before its moves?)")
    served_tokens = [t for c in chunks for t in c.token_ids]
    reference = engine_reference(PROMPT, STREAM)
    matched = matched_tokens("the moved stream", served_tokens, reference, STREAM)
    served_logprobs = [lp.logprob for c in chunks for lp in c.logprobs][:matched]  # one per token
    logprob_diff = max(
        (abs(a - e.logprob) for a, e in zip(served_logprobs, reference[:matched], strict=True)), default=0.0
    )
    print(json.dumps({"check": "service_migrate_request", "device": device, "tokens": len(served_tokens),
                      "matched": matched, "moves": [f"{m.source_replica_id}->{m.target_replica_id}" for m in moves],
                      "pause_ms": [round(m.pause_ms, 2) for m in moves], "state_bytes": [m.state_bytes for m in moves],
                      "max_logprob_diff": logprob_diff, "finish_reason": chunks[-1].finish_reason, "ok": True}),
          flush=True)  # fmt: skip
    return PROMPT + served_tokens


def check_moving_session(client: Any, device: str, history: list[int]) -> None:
    """The stream's session, idle now on r0, moves to r1 and back, with a greedy turn on each; its
    state must come along (the turn computes only its new tokens) and the turns be the engine's."""
    if client.get_session("gpu-check").replica_id != "r0":
        raise Failed("the session did not come back to r0 with its request")
    matched = []
    for target, turn in (("r1", [60, 61]), ("r0", [70, 71])):
        client.migrate("gpu-check", target)
        done = client.complete(turn, session_id="gpu-check", **TURN)
        if done.replica_ids != [target]:
            raise Failed(f"the turn after moving the session to {target} ran on {done.replica_ids}")
        if done.usage.cached_tokens < len(history) - 1:  # all but the last token sampled, never fed yet
            raise Failed(f"the turn on {target} found {done.usage.cached_tokens} tokens cached of the session's "
                         f"{len(history)}: its state did not come along")  # fmt: skip
        history = history + turn
        matched.append(
            matched_tokens(f"the turn on {target}", list(done.token_ids), engine_reference(history, TURN), TURN)
        )
        history = history + list(done.token_ids)
    client.delete("gpu-check")
    print(json.dumps({"check": "service_migrate_session", "device": device, "moves": ["r0->r1", "r1->r0"],
                      "matched": matched, "tokens": [TURN["max_tokens"]] * 2, "ok": True}), flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cupy", "numpy"], default="cupy")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-bench", action="store_true", help="skip part 3")
    parser.add_argument("--parts", default="1,2,3,4", help="the parts to run, comma-separated (default: all)")
    args = parser.parse_args()
    parts = {part.strip() for part in args.parts.split(",")}
    if not parts <= {"1", "2", "3", "4"}:
        parser.error(f"--parts {args.parts}: the parts are 1, 2, 3 and 4")
    if args.device == "cupy":
        get_backend("cupy")  # BackendUnavailable with the reason when there is no usable GPU
    checks: list[tuple[str, str, Callable[[], None]]] = [
        ("1", "memory_mirror", lambda: check_memory(args.device, args.steps)),
        ("2", "model", lambda: check_models(args.device)),
        ("4", "service", lambda: check_service(args.device)),
    ]
    for part, name, check in checks:
        if part not in parts:
            continue
        try:
            check()
        except Failed as e:
            print(json.dumps({"check": name, "ok": False, "error": str(e)}), flush=True)
            return 1
    if "3" in parts and not args.no_bench:  # last: its JSON lines pass through, whatever it prints
        bench = Path(__file__).with_name("memory.py")
        return subprocess.run([sys.executable, str(bench), "--backend", args.device], check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
