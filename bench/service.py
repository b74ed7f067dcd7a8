"""The service end to end (issue 14), in one run: one JSON object per line.

    python bench/service.py [--model PATH] [--streams 1 8 32] [--replicas N] [--stages 1 2] [--n-ctx N] [--max-seqs N]
                            [--llama-server PATH] [--throughput] [--migration]
    python bench/service.py --quick    # a smoke run of everything on the test fixtures (~2 minutes)

Two parts, both by default; --throughput or --migration runs one alone.

Throughput. The service: `statemesh serve --port 0` in a process of its own (its embedded Ray cluster
on loopback), as tests/cluster/conftest.py starts it, stopped with SIGTERM at the end (its process
group killed if it does not stop). The workload is bench/engine.py's (its prompts: 256 tokens, 128 new
tokens, greedy, ignore_eos): at each stream count N, N concurrent clients (asyncio, one
`statemesh.cluster.AsyncClient` each, its channel connected before the clock starts) send one
request of token ids each. The same prompts then run through `statemesh.worker.engine.engine.Engine` in
this process, with the server's n_ctx and n_seq_max (one engine for the whole run, as the server
keeps one; all requests added before its first step, as bench/engine.py does), and through
llama-server (llama.cpp's HTTP server: one slot per stream of the most streams, continuous batching,
flash attention, all cores; `make llama-server` builds it), N threads each streaming one `/completion`
of the same token ids (connected before the clock starts). The paths take turns going first from
one stream count to the next (`order` says which ran first).

All paths are measured the same way, from per-request token arrival times: aggregate tokens/s (all
generated tokens / the time from the first send to the last token, prefill included), decode-phase
tokens/s (bench/engine.py's: tokens after every request has its first one / the time from then to
the last token), time to first token p50/p99 (per request, from its send to the first chunk with a
token), and inter-token latency p50/p99 (per token: a chunk of k tokens that came g seconds after the
previous one counts k gaps of g/k). `service_over_engine` lines give the ratios (the issue's targets:
>= 0.85x at 32 streams, >= 0.8x at 1), `service_over_llama_server` lines too (targets at 32 streams:
aggregate >= 1.3x, TTFT p99 <= 0.5x). With --replicas above 1 the service's replicas together face
one engine. The engine and llama-server run next to the first stage count of --stages only; a
server with each further stage count runs the service workload again. After each server's run,
one `service_worker_rss` line per worker (its pid from ListReplicas) gives its peak RSS (VmHWM).

Migration. A server of the default model with 2 replicas. A sequence of 2,048 tokens (a prompt of
2,040 random token ids, 8 decoded, greedy, ignore_eos) is migrated (Sessions/Migrate of its request
id, to the other replica) while its Generate stream runs; its pause is the largest gap between
consecutive token chunks around the move as the client sees it (MigrateResponse's own numbers are
reported too). Next to it, in the same run: the time to copy the snapshot's bytes in memory (np.copy
of a buffer of MigrateResponse's state_bytes, best of 5) and the time to recompute the sequence (its
2,048 tokens, the first one changed so no cached prefix serves it, sent as a fresh request and timed
to its first token). Targets: pause <= 2 x copy + 50 ms, and <= 1/20 of the recompute
(`pause_excess_s` is the pause less one ordinary decode step, which the client's gap also holds). The
same for the hybrid fixture Falcon-H1 (attention and Mamba-2 in every layer) with a sequence that
fills its context, 8,192 tokens, by its last token (moved at 7,936). Pre-copy scaling: the pause of
an 8,192-token sequence over that of a 512-token one (target: within 1.5x), each moved while 4 other
streams decode on both replicas, whose tokens/s during the move (from the Migrate call to the moved
sequence's next token after its answer) over their tokens/s before it (from the moved sequence's
first token to the call) is the other target (>= 0.9x). Each migration server is warmed by one small
migration first; a move that fails (the sequence ended before the call came) is reported as such.

Everything runs under the worker settings of `statemesh.worker.runtime` (the script starts itself
again with them, as bench/engine.py does; --plain-env runs without them); the servers' workers get
them from Ray. Every line names the CPU, its vector extensions and the core OpenBLAS picked for it.
The exit status is 1 when a server did not stop cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from engine import emit, stream_prompts  # bench/engine.py (this script's folder is on sys.path)

from statemesh.cluster import AsyncClient, StatemeshError
from statemesh.worker import Model, default_model_path, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.kernels.row_blocks import openblas_core
from statemesh.worker.runtime import missing_settings, worker_environment

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
QUICK_MODEL = FIXTURES / "llama"
HYBRID_MODEL = FIXTURES / "falcon_h1"  # max_position_embeddings 8192: the longest hybrid fixture that ends
LLAMA_SERVER = ROOT / ".cache" / "llama-server" / "llama-server"  # `make llama-server`
READY = "statemesh listening on "
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
REAP_TIMEOUT_S = 15.0
TARGETS = {32: 0.85, 1: 0.8}  # service / engine aggregate tokens/s (the issue's)
LLAMA_SERVER_TARGETS = {"aggregate_ratio": 1.3, "ttft_p99_ratio": 0.5}  # at 32 streams: at least, at most
PAUSE_COPY_FACTOR, PAUSE_SLACK_S = 2.0, 0.050  # pause <= 2 x copy + 50 ms
PAUSE_RECOMPUTE_FRACTION = 1 / 20
PRECOPY_PAUSE_RATIO, OTHERS_RATE_RATIO = 1.5, 0.9
WARM_PROMPT, WARM_NEW = 16, 4
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")


# ---- the machine -------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_vector_flags() -> str:
    """The widest vector extension the CPU reports: machines of one kind differ (ENVIRONMENT.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown"
    return next((name for name in ("avx512f", "avx2", "avx") if name in flags), "none")


def machine_fields() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpu_vector": cpu_vector_flags(), "cpus": os.cpu_count(),
            "openblas_core": openblas_core()}  # fmt: skip


# ---- the server --------------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[str]
    address: str
    log: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    worker_pids: list[int] = field(default_factory=list)  # each in a process group of its own (Ray's)


def start_server(args: list[str], log: Path) -> Server:
    """`statemesh serve --port 0 ARGS` in a session of its own; returns once it prints its ready line."""
    command = [sys.executable, "-m", "statemesh.cluster.cli", "serve", "--port", "0", *args]
    with open(log, "w") as err:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True, env={**os.environ}
        )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_forward_lines, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line.startswith(READY):
            return Server(process, line[len(READY) :].strip(), log, lines)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise RuntimeError(f"the server did not become ready; its log ({log}):\n{log.read_text()[-4000:]}")


def _forward_lines(stream: Any, lines: queue.Queue[str]) -> None:
    """The server's stdout, line by line, to the queue the starter waits on (a pipe must be read)."""
    for line in stream or []:
        lines.put(line)


def stop_server(server: Server, worker_pids: list[int]) -> dict[str, Any]:
    """SIGTERM, then wait; SIGKILL to its process group if it does not stop. Then wait for its
    processes (its group, where Ray's run, and its workers, each in a group of its own) to go, and
    kill by id what is left after REAP_TIMEOUT_S. Says what happened."""
    started = time.monotonic()
    killed = False
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        code, killed = server.process.wait(), True
    stop_s = time.monotonic() - started
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while (left := leftovers(server.process.pid, worker_pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return {"exit_code": code, "stop_s": stop_s, "killed": killed, "leftover_pids_killed": left}


def leftovers(group: int, worker_pids: list[int]) -> list[int]:
    found = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
    return sorted({int(pid) for pid in found} | {pid for pid in worker_pids if _alive(pid)})


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def process_env(pid: int, names: tuple[str, ...]) -> dict[str, str | None]:
    """Some environment variables of a process (a worker's thread settings), as it started."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    env = dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)
    return {name: env.get(name) for name in names}


@contextlib.contextmanager
def serving(serve_args: list[str], fields: dict[str, Any], stops: list[dict[str, Any]]) -> Iterator[Server]:
    """A server for the block: `service_start` and `service_stop` lines, its stop result added to
    `stops`; its log kept (and named on stderr) unless it ran and stopped cleanly."""
    log = Path(tempfile.mkstemp(prefix="statemesh-bench-server-", suffix=".log")[1])
    started = time.perf_counter()
    server = start_server(serve_args, log)
    ok = False
    try:
        workers = asyncio.run(_workers(server.address))
        server.worker_pids = [pid for _, pid in workers]
        emit(bench="service_start", **fields, seconds=time.perf_counter() - started,
             workers={wid: process_env(pid, THREAD_VARS) for wid, pid in workers},
             bench_process=process_env(os.getpid(), THREAD_VARS))  # fmt: skip
        yield server
        ok = True
    finally:
        stopped = stop_server(server, server.worker_pids)
        stops.append(stopped)
        emit(bench="service_stop", **fields, **stopped)
        if ok and stopped["exit_code"] == 0:
            log.unlink(missing_ok=True)
        else:
            print(f"service log kept: {log}", file=sys.stderr)


async def _workers(address: str) -> list[tuple[str, int]]:
    client = AsyncClient(address)
    try:
        return [(w.worker_id, w.pid) for r in await client.replicas() for w in r.workers]
    finally:
        await client.close()


def emit_worker_rss(server: Server, fields: dict[str, Any]) -> None:
    """One `service_worker_rss` line per worker of the server: its peak resident memory (VmHWM) so
    far, read while it still runs, and its current one."""
    for worker_id, pid in asyncio.run(_workers(server.address)):
        status = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                status[name] = value.strip()
        kib = {name: int(status[name].split()[0]) if name in status else None for name in ("VmHWM", "VmRSS")}
        emit(bench="service_worker_rss", **fields, worker=worker_id, pid=pid,
             peak_rss_mb=kib["VmHWM"] / 1024 if kib["VmHWM"] else None,
             rss_mb=kib["VmRSS"] / 1024 if kib["VmRSS"] else None)  # fmt: skip


class CpuMeter:
    """How much CPU other processes than ours (this one, the servers' process groups and workers)
    took while a run went on, in cores: above ~0.1 the machine was shared and the run is suspect."""

    def __init__(self, groups: list[int], pids: list[int]):
        self.groups, self.pids = groups, pids
        self.tick = os.sysconf("SC_CLK_TCK")
        self.ours: set[int] = set()

    def _pids(self) -> set[int]:
        pids = {os.getpid(), *self.pids}
        for group in self.groups:
            found = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
            pids.update(int(pid) for pid in found)
        return pids

    def _ours(self) -> float:
        ticks = 0
        for pid in self.ours:
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / self.tick

    def _busy(self) -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / self.tick  # all but idle and iowait

    def start(self) -> None:
        self.ours = self._pids()  # (pgrep itself runs before the clock starts)
        self.at = time.perf_counter(), self._busy(), self._ours()

    def other_cores(self) -> float:
        """Since `start`, in cores (the kernel counts in ticks of 10 ms: meaningless for short runs)."""
        wall, busy, ours = time.perf_counter() - self.at[0], self._busy() - self.at[1], self._ours() - self.at[2]
        return max(0.0, busy - ours) / wall


# ---- what a run measured --------------------------------------------------------------------------


@dataclass
class Trace:
    """One request's run: when it was sent, and when its tokens came (time, how many), in order."""

    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""


def summarize(traces: list[Trace], start: float) -> dict[str, Any]:
    produced = sum(n for t in traces for _, n in t.chunks)
    end = max(t.chunks[-1][0] for t in traces if t.chunks)
    firsts = [t.chunks[0][0] for t in traces if t.chunks]
    ttft = np.array([t.chunks[0][0] - t.sent for t in traces if t.chunks])
    decode_start = max(firsts)  # every request has its first token: bench/engine.py's decode phase
    decoded = sum(n for t in traces for when, n in t.chunks if when > decode_start)
    gaps = [
        (now - before) / n for t in traces for (before, _), (now, n) in zip(t.chunks, t.chunks[1:], strict=False)
        for _ in range(n)
    ]  # fmt: skip
    itl = np.array(gaps or [float("nan")])
    return {
        "aggregate_tokens_per_s": produced / (end - start),
        "decode_phase_tokens_per_s": decoded / (end - decode_start) if end > decode_start else 0.0,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "itl_p50_s": float(np.percentile(itl, 50)), "itl_p99_s": float(np.percentile(itl, 99)),
        "itl_max_s": float(itl.max()), "wall_s": end - start, "tokens": produced,
        "tokens_per_chunk": produced / max(1, sum(len(t.chunks) for t in traces)),
        "finished": sum(1 for t in traces if t.finish_reason == "length"),
    }  # fmt: skip


# ---- the three paths ----------------------------------------------------------------------------------


def run_engine(engine: Engine, prompts: list[list[int]], new: int, tag: str) -> tuple[list[Trace], float]:
    """bench/engine.py's loop (every request added, then steps until done), on the given engine."""
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    requests = [Request(f"{tag}-{i}", tuple(p), params) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    traces = {r.id: Trace(start) for r in requests}
    for r in requests:
        engine.add(r)
    while engine.has_work():
        events = engine.step()
        now = time.perf_counter()
        counts: dict[str, int] = {}
        for e in events:
            trace = traces[e.request_id]
            if e.token >= 0:
                counts[e.request_id] = counts.get(e.request_id, 0) + 1
                trace.tokens.append(e.token)
            if e.finish_reason is not None:
                trace.finish_reason = e.finish_reason
        for request_id, n in counts.items():
            traces[request_id].chunks.append((now, n))
    return list(traces.values()), start


async def _service(address: str, prompts: list[list[int]], new: int) -> tuple[list[Trace], float, dict[str, int]]:
    clients = [AsyncClient(address) for _ in prompts]
    try:
        await asyncio.gather(*(c.channel.channel_ready() for c in clients))
        before = await clients[0].stats()

        async def one(client: AsyncClient, prompt: list[int]) -> Trace:
            trace = Trace(time.perf_counter())
            async for chunk in client.generate(prompt, max_tokens=new, temperature=0, ignore_eos=True):
                if chunk.token_ids:
                    trace.chunks.append((time.perf_counter(), len(chunk.token_ids)))
                    trace.tokens += chunk.token_ids
                if chunk.finish_reason:
                    trace.finish_reason = chunk.finish_reason
            return trace

        start = time.perf_counter()
        traces = await asyncio.gather(*(one(c, p) for c, p in zip(clients, prompts, strict=True)))
        after = await clients[0].stats()
        counters = {
            "preemptions": after.preemptions - before.preemptions,
            "prefix_hits": after.prefix_cache_hits - before.prefix_cache_hits,
        }
        return list(traces), start, counters
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def run_service(address: str, prompts: list[list[int]], new: int) -> tuple[list[Trace], float, dict[str, int]]:
    return asyncio.run(_service(address, prompts, new))


@dataclass
class LlamaServer:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    model: str  # the GGUF file it serves
    same_model: bool  # the one the service runs (not in the quick run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_llama_server(binary: Path, gguf: str, same_model: bool, slots: int, slot_ctx: int) -> LlamaServer:
    """llama-server as ENVIRONMENT.md runs it: `slots` parallel slots of `slot_ctx` tokens each, every
    core, flash attention; returns once /health answers 200."""
    log = Path(tempfile.mkstemp(prefix="statemesh-bench-llama-server-", suffix=".log")[1])
    port, threads = free_port(), str(os.cpu_count() or 1)
    command = [str(binary), "-m", gguf, "-t", threads, "-tb", threads, "--parallel", str(slots), "-c",
               str(slots * slot_ctx), "-fa", "on", "--host", "127.0.0.1", "--port", str(port),
               "--no-webui"]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        health = f"http://127.0.0.1:{port}/health"
        # refused while it starts, 503 (an HTTPError, an OSError) while it loads the model
        with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as answer:
            if answer.status == 200:
                return LlamaServer(process, port, log, gguf, same_model)
        time.sleep(0.5)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise RuntimeError(f"llama-server did not become ready; its log ({log}):\n{log.read_text()[-4000:]}")


def stop_llama_server(server: LlamaServer) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        code = server.process.wait()
    if code == 0:
        server.log.unlink(missing_ok=True)
    return code


def _llama_stream(port: int, prompt: list[int], new: int, trace: Trace, barrier: threading.Barrier) -> None:
    """One streamed /completion: its connection is open before the barrier (the clock) releases it.
    Each server-sent event carries one or more tokens (`tokens`, with return_tokens)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=STOP_TIMEOUT_S * 10)
    connection.connect()
    body = json.dumps({"prompt": prompt, "n_predict": new, "ignore_eos": True, "stream": True, "temperature": 0,
                       "return_tokens": True})  # fmt: skip
    barrier.wait()
    trace.sent = time.perf_counter()
    try:
        connection.request("POST", "/completion", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"llama-server answered {response.status}: {response.read()[:500]!r}")
        for line in response:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[len(b"data: ") :])
            tokens = event.get("tokens") or []
            if tokens:
                trace.chunks.append((time.perf_counter(), len(tokens)))
                trace.tokens += tokens
            if event.get("stop"):
                trace.finish_reason = "length" if event.get("stop_type") == "limit" else str(event.get("stop_type"))
                break
    finally:
        connection.close()


def run_llama_server(server: LlamaServer, prompts: list[list[int]], new: int) -> tuple[list[Trace], float]:
    """N threads, one streamed request each, released together once all are connected."""
    traces = [Trace(0.0) for _ in prompts]
    barrier = threading.Barrier(len(prompts) + 1)
    errors: list[BaseException] = []

    def one(prompt: list[int], trace: Trace) -> None:
        try:
            _llama_stream(server.port, prompt, new, trace, barrier)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(p, t)) for p, t in zip(prompts, traces, strict=True)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return traces, start


# ---- the throughput part ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    model_path: str
    streams: list[int]
    prompt_tokens: int
    new_tokens: int
    n_ctx: int
    max_seqs: int
    replicas: int


def workload_prompts(model: Model, streams: int, prompt_len: int) -> list[list[int]]:
    """bench/engine.py's prompts (nothing shared); on a model whose vocabulary is smaller than the
    ids they draw (the test fixtures), each id is taken modulo the vocabulary."""
    vocab = model.config.vocab_size
    return [[t % vocab for t in p] for p in stream_prompts(model, streams, 0.0, prompt_len)]


def warm_prompt(vocab: int) -> list[int]:
    """Nothing the measured prompts begin with (they draw ids from 100 up)."""
    return [(7 + i) % vocab for i in range(WARM_PROMPT)]


def llama_server_model(requested: str | None, model_path: str, quick: bool) -> tuple[str | None, str]:
    """The GGUF file llama-server serves, or None and why not. A Hugging Face folder has none: the
    quick run (fixture models, folders) then runs llama-server on the default model's GGUF, as a
    smoke test of the path only (its ratios are of different models and say so)."""
    if requested is None:
        return None, f"no llama-server binary at {LLAMA_SERVER} (make llama-server builds it)"
    if not Path(requested).is_file():
        return None, f"no llama-server binary at {requested}"
    if model_path.endswith(".gguf"):
        return model_path, ""
    if quick:
        return str(default_model_path()), ""
    return None, f"the model {model_path} is not a GGUF file (llama-server reads GGUF only)"


def llama_server_or_why_not(
    binary: str, gguf: str, same_model: bool, work: Workload, common: dict[str, Any]
) -> LlamaServer | None:
    """llama-server with one slot per stream of the most streams, each holding one request; a server
    that does not start is reported as skipped (the run goes on without it)."""
    slot_ctx = work.prompt_tokens + work.new_tokens + 8
    try:
        llama = start_llama_server(Path(binary), gguf, same_model, max(work.streams), slot_ctx)
    except RuntimeError as e:
        emit(bench="llama_server", **common, skipped=True, reason=f"it did not start: {str(e)[-1000:]}")
        return None
    emit(bench="llama_server", **common, skipped=False, binary=binary, gguf=gguf, same_model=same_model,
         slots=max(work.streams), slot_ctx=slot_ctx)  # fmt: skip
    return llama


def run_throughput(
    args: argparse.Namespace, work: Workload, machine: dict[str, Any], stops: list[dict[str, Any]]
) -> None:
    model = load_model(work.model_path, backend="numpy", progress=False)
    engine = None if args.no_engine else Engine(model, EngineConfig(n_ctx=work.n_ctx, n_seq_max=work.max_seqs))
    gguf, why_not = llama_server_model(args.llama_server, work.model_path, args.quick)
    common: dict[str, Any] = {
        **machine, "worker_env": not args.missing_settings, "model": model.config.name, "replicas": work.replicas,
        "n_ctx": work.n_ctx, "max_seqs": work.max_seqs, "prompt_tokens": work.prompt_tokens,
        "new_tokens": work.new_tokens, "quick": args.quick,
    }  # fmt: skip
    llama = None
    if gguf is None:
        emit(bench="llama_server", **common, skipped=True, reason=why_not)
    else:
        llama = llama_server_or_why_not(args.llama_server, gguf, gguf == work.model_path, work, common)
        if llama is not None:
            run_llama_server(llama, [warm_prompt(model.config.vocab_size)], WARM_NEW)
    try:
        for k, stages in enumerate(args.stages):
            fields = {**common, "stages": stages}
            serve_args = ["--model", work.model_path, "--replicas", str(work.replicas), "--stages", str(stages),
                          "--n-ctx", str(work.n_ctx), "--max-seqs", str(work.max_seqs),
                          *shlex.split(args.serve_args)]  # fmt: skip
            with serving(serve_args, {**fields, "serve_args": args.serve_args}, stops) as server:
                first = k == 0  # the anchors do not depend on the stages: they run once
                throughput_streams(server, model, work, fields, engine if first else None, llama if first else None)
                emit_worker_rss(server, {**fields, "part": "throughput"})
    finally:
        if llama is not None:
            emit(bench="llama_server_stop", **common, exit_code=stop_llama_server(llama))


def throughput_streams(server: Server, model: Model, work: Workload, fields: dict[str, Any], engine: Engine | None,
                       llama: LlamaServer | None) -> None:  # fmt: skip
    """Every stream count through the service and each anchor given (engine, llama-server), then
    the ratios."""
    paths = ["service"] + (["engine"] if engine else []) + (["llama-server"] if llama else [])
    meter = CpuMeter([server.process.pid, *([llama.process.pid] if llama else [])], server.worker_pids)
    warm = [warm_prompt(model.config.vocab_size)]
    run_service(server.address, warm, WARM_NEW)
    if engine is not None:
        run_engine(engine, warm, WARM_NEW, "warm")
    for i, n in enumerate(work.streams):
        prompts = workload_prompts(model, n, work.prompt_tokens)
        order = paths[i % len(paths) :] + paths[: i % len(paths)]  # each path goes first in turn
        results: dict[str, dict[str, Any]] = {}
        tokens: dict[str, list[list[int]]] = {}
        for path in order:
            meter.start()
            counters: dict[str, Any] = {}
            if path == "engine" and engine is not None:
                before = dict(engine.counters), engine.stats()["prefix_hits"]
                traces, start = run_engine(engine, prompts, work.new_tokens, f"n{n}")
                counters = {"preemptions": engine.counters["preemptions"] - before[0]["preemptions"],
                            "prefix_hits": engine.stats()["prefix_hits"] - before[1]}  # fmt: skip
            elif path == "llama-server" and llama is not None:
                traces, start = run_llama_server(llama, prompts, work.new_tokens)
                counters = {"gguf": llama.model}
            else:
                traces, start, counters = run_service(server.address, prompts, work.new_tokens)
            results[path] = {**summarize(traces, start), **counters, "other_cpu_cores": meter.other_cores(),
                             "load_1m": os.getloadavg()[0]}  # fmt: skip
            tokens[path] = [t.tokens for t in traces]
            emit(bench="service_streams", path=path, streams=n, order=",".join(order), **fields, **results[path])
        if engine is not None:
            emit_engine_ratio(n, order, fields, results, tokens)
        if llama is not None:
            emit_llama_server_ratio(n, order, fields, results, tokens, llama)


def emit_engine_ratio(n: int, order: list[str], fields: dict[str, Any], results: dict[str, dict[str, Any]],
                      tokens: dict[str, list[list[int]]]) -> None:  # fmt: skip
    svc, eng = results["service"], results["engine"]
    aggregate = svc["aggregate_tokens_per_s"] / eng["aggregate_tokens_per_s"]
    emit(
        bench="service_over_engine", streams=n, order=",".join(order), **fields, aggregate_ratio=aggregate,
        decode_ratio=svc["decode_phase_tokens_per_s"] / eng["decode_phase_tokens_per_s"]
        if eng["decode_phase_tokens_per_s"] else None,
        ttft_p50_ratio=svc["ttft_p50_s"] / eng["ttft_p50_s"],
        itl_p50_ratio=svc["itl_p50_s"] / eng["itl_p50_s"] if eng["itl_p50_s"] else None,
        target=TARGETS.get(n), meets_target=aggregate >= TARGETS[n] if n in TARGETS else None,
        same_tokens=sum(a == b for a, b in zip(tokens["service"], tokens["engine"], strict=True)),
    )  # fmt: skip


def emit_llama_server_ratio(n: int, order: list[str], fields: dict[str, Any], results: dict[str, dict[str, Any]],
                            tokens: dict[str, list[list[int]]], llama: LlamaServer) -> None:  # fmt: skip
    """The issue's targets hold at 32 streams; other counts are reported without one. Greedy tokens
    may differ: llama.cpp computes on the quantized weights, the service on float32 copies."""
    svc, theirs = results["service"], results["llama-server"]
    aggregate = svc["aggregate_tokens_per_s"] / theirs["aggregate_tokens_per_s"]
    ttft_p99 = svc["ttft_p99_s"] / theirs["ttft_p99_s"]
    targeted = n == 32
    emit(
        bench="service_over_llama_server", streams=n, order=",".join(order), **fields,
        same_model=llama.same_model, gguf=llama.model, aggregate_ratio=aggregate,
        decode_ratio=svc["decode_phase_tokens_per_s"] / theirs["decode_phase_tokens_per_s"]
        if theirs["decode_phase_tokens_per_s"] else None,
        ttft_p50_ratio=svc["ttft_p50_s"] / theirs["ttft_p50_s"], ttft_p99_ratio=ttft_p99,
        itl_p50_ratio=svc["itl_p50_s"] / theirs["itl_p50_s"] if theirs["itl_p50_s"] else None,
        target_aggregate_ratio=LLAMA_SERVER_TARGETS["aggregate_ratio"] if targeted else None,
        target_ttft_p99_ratio=LLAMA_SERVER_TARGETS["ttft_p99_ratio"] if targeted else None,
        meets_aggregate_target=aggregate >= LLAMA_SERVER_TARGETS["aggregate_ratio"] if targeted else None,
        meets_ttft_target=ttft_p99 <= LLAMA_SERVER_TARGETS["ttft_p99_ratio"] if targeted else None,
        same_tokens=sum(a == b for a, b in zip(tokens["service"], tokens["llama-server"], strict=True)),
    )  # fmt: skip


# ---- the migration part -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoveCase:
    """One sequence moved while it decodes: `length` tokens when it moves (a prompt of length -
    before, then `before` decoded), `after` more decoded on the other replica; `others` streams
    decoding on both replicas meanwhile; `recompute`: time a prefill of its tokens too."""

    name: str
    length: int
    before: int
    after: int
    others: int = 0
    recompute: bool = False

    @property
    def others_max_tokens(self) -> int:
        """Only a bound: the others are cancelled when the moved sequence ends. They start before it
        and decode through its prefill (an 8,192-token one took them ~300 tokens), its decoding and
        the move (`others_running_through_move` says whether they all still ran)."""
        return self.length // 8 + 4 * (self.before + self.after)

    @property
    def cells(self) -> int:
        """Token cells it needs of its first replica: routing by load puts up to others // 2 + 1 there."""
        return self.length + self.after + (self.others // 2 + 1) * (WARM_PROMPT + self.others_max_tokens)


@dataclass
class Moved:
    """What one move measured, as the client saw it."""

    trace: Trace
    prompt: list[int]
    sent: float  # when Migrate was called
    returned: float  # when it answered
    response: Any  # the MigrateResponse; None when the call failed
    error: str  # why it failed
    replicas: list[str]  # the replica of each chunk of the moved sequence
    others: list[Trace]
    baseline_start: float  # when the moved sequence had its first token (the others all run by then)
    others_replicas: list[str]


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    """Random token ids (from 100 up, as bench/engine.py draws them), modulo a small fixture vocabulary."""
    return [int(t) % vocab for t in np.random.default_rng(seed).integers(100, 40000, size=n)]


async def _stream(client: AsyncClient, prompt: list[int], trace: Trace, replicas: list[str],
                  marks: dict[int, asyncio.Event], **params: Any) -> None:  # fmt: skip
    """One greedy request; `marks[n]` is set once it has n tokens."""
    trace.sent = time.perf_counter()
    async for chunk in client.generate(prompt, temperature=0, ignore_eos=True, **params):
        if chunk.token_ids:
            trace.chunks.append((time.perf_counter(), len(chunk.token_ids)))
            trace.tokens += chunk.token_ids
            replicas.append(chunk.replica_id)
            for n, event in marks.items():
                if len(trace.tokens) >= n:
                    event.set()
        if chunk.finish_reason:
            trace.finish_reason = chunk.finish_reason


async def _move(address: str, vocab: int, case: MoveCase, seed: int) -> Moved:
    """The other streams start first, one after the other (each once the previous has a token, so
    routing by load spreads them over both replicas); then the sequence; once it has `before`
    tokens, Migrate. The others are cancelled when the moved sequence ends."""
    client = AsyncClient(address)
    await client.channel.channel_ready()
    try:
        others: list[Trace] = []
        others_replicas: list[str] = []
        tasks: list[asyncio.Task[None]] = []
        for k in range(case.others):
            other, started = Trace(0.0), asyncio.Event()
            other_prompt = random_prompt(vocab, WARM_PROMPT, seed * 100 + k + 1)
            tasks.append(asyncio.create_task(_stream(client, other_prompt, other, others_replicas, {1: started},
                                                     max_tokens=case.others_max_tokens)))  # fmt: skip
            others.append(other)
            await started.wait()
        prompt = random_prompt(vocab, case.length - case.before, seed)
        request_id = f"moving-{case.name}-{seed}"
        trace, first, enough = Trace(0.0), asyncio.Event(), asyncio.Event()
        replicas: list[str] = []
        mover = asyncio.create_task(_stream(client, prompt, trace, replicas, {1: first, case.before: enough},
                                            request_id=request_id, max_tokens=case.before + case.after))  # fmt: skip
        await first.wait()
        baseline_start = time.perf_counter()  # the others' decode rate without a move: from here to the call
        await enough.wait()
        sent = time.perf_counter()
        try:
            response, error = await client.migrate(request_id=request_id), ""
        except StatemeshError as e:  # e.g. NOT_FOUND when the sequence ended before the call came
            response, error = None, f"{e.code.name}: {e.message}"
        returned = time.perf_counter()
        await mover
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return Moved(trace, prompt, sent, returned, response, error, replicas, others, baseline_start,
                     sorted(set(others_replicas)))  # fmt: skip
    finally:
        await client.close()


async def _recompute(address: str, tokens: list[int]) -> tuple[float, int]:
    """A fresh request of these tokens, timed from its send to its first token; and the prefix-cache
    hits it made (0 expected: the caller changes the first token)."""
    client = AsyncClient(address)
    await client.channel.channel_ready()
    try:
        before = await client.stats()
        sent = time.perf_counter()
        ttft = float("nan")
        async for chunk in client.generate(tokens, max_tokens=1, temperature=0, ignore_eos=True):
            if chunk.token_ids and ttft != ttft:
                ttft = time.perf_counter() - sent
        after = await client.stats()
        return ttft, after.prefix_cache_hits - before.prefix_cache_hits
    finally:
        await client.close()


def copy_seconds(nbytes: int) -> float:
    """np.copy of a buffer of that many bytes (touched first), best of 5."""
    buffer = np.ones(max(1, nbytes), dtype=np.uint8)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copy(buffer)
        best = min(best, time.perf_counter() - start)
    return best


def rate(traces: list[Trace], start: float, end: float) -> tuple[float | None, int]:
    """Tokens/s of these streams' chunks that came in [start, end), and how many tokens that was."""
    tokens = sum(n for t in traces for when, n in t.chunks if start <= when < end)
    return (tokens / (end - start) if end > start else None), tokens


def move_report(moved: Moved, case: MoveCase) -> dict[str, Any]:
    """The pause is the largest gap between consecutive chunks of the moved sequence from the last
    one before the Migrate call to the third after its answer (the move's effect can land on the
    step after it answered)."""
    times = [when for when, _ in moved.trace.chunks]
    last_before = max((i for i, when in enumerate(times) if when < moved.sent), default=0)
    first_after = next((i for i, when in enumerate(times) if when > moved.returned), len(times) - 1)
    around = times[last_before : first_after + 3]
    gaps = np.diff(around) if len(around) > 1 else np.array([float("nan")])
    usual = np.diff(times[1 : last_before + 1])  # decode gaps before the move (the first is prefill's)
    moved_at = len(moved.prompt) + sum(n for when, n in moved.trace.chunks if when < moved.sent)
    report = {
        "case": case.name, "sequence_tokens_at_move": moved_at, "prompt_tokens": len(moved.prompt),
        "pause_s": float(gaps.max()),
        "chunks_around_ms": [round((when - moved.sent) * 1e3, 2) for when in around],  # from the Migrate call
        "itl_before_p50_s": float(np.median(usual)) if len(usual) else None,
        # the client's gap holds one ordinary step too: what the move added
        "pause_excess_s": float(gaps.max() - np.median(usual)) if len(usual) else None,
        "migrate_call_s": moved.returned - moved.sent, "response_pause_ms": moved.response.pause_ms,
        "state_bytes": moved.response.state_bytes, "source_replica": moved.response.source_replica_id,
        "target_replica": moved.response.target_replica_id,
        "stream_replicas": sorted(set(moved.replicas)), "tokens": len(moved.trace.tokens),
        "finish_reason": moved.trace.finish_reason,
    }  # fmt: skip
    if moved.others:
        # during the move: from the Migrate call to the moved sequence's first token after it answered
        move_end = times[first_after] if first_after < len(times) else moved.returned
        before_rate, before_tokens = rate(moved.others, moved.baseline_start, moved.sent)
        during_rate, during_tokens = rate(moved.others, moved.sent, move_end)
        report |= {
            "others": len(moved.others), "others_replicas": moved.others_replicas,
            "others_tokens_per_s_before": before_rate, "others_tokens_before": before_tokens,
            "others_window_before_s": moved.sent - moved.baseline_start,
            "others_running_through_move": sum(1 for t in moved.others if t.chunks and t.chunks[-1][0] > move_end),
            "others_tokens_per_s_during": during_rate, "others_tokens_during": during_tokens,
            "others_window_during_s": move_end - moved.sent,
            "others_rate_ratio": during_rate / before_rate if during_rate is not None and before_rate else None,
        }  # fmt: skip
    return report


def measure_move(address: str, vocab: int, case: MoveCase, seed: int) -> dict[str, Any]:
    """One case: the move, then (alone on the server) the copy and the recompute, and the targets."""
    moved = asyncio.run(_move(address, vocab, case, seed))
    if moved.response is None:
        return {"case": case.name, "moved": False, "error": moved.error, "tokens": len(moved.trace.tokens),
                "finish_reason": moved.trace.finish_reason}  # fmt: skip
    report = {"moved": True, **move_report(moved, case)}
    pause = report["pause_s"]
    copy_s = copy_seconds(moved.response.state_bytes)
    budget = PAUSE_COPY_FACTOR * copy_s + PAUSE_SLACK_S
    report |= {"copy_s": copy_s, "pause_over_copy_budget": pause / budget, "meets_copy_target": pause <= budget}
    if case.recompute:
        tokens = (moved.prompt + moved.trace.tokens)[: case.length]
        tokens[0] = (tokens[0] + 1) % vocab  # no cached prefix can serve it; the same work
        recompute_s, prefix_hits = asyncio.run(_recompute(address, tokens))
        report |= {
            "recompute_tokens": len(tokens), "recompute_s": recompute_s, "recompute_prefix_hits": prefix_hits,
            "pause_over_recompute": pause / recompute_s, "target_pause_over_recompute": PAUSE_RECOMPUTE_FRACTION,
            "meets_recompute_target": pause <= PAUSE_RECOMPUTE_FRACTION * recompute_s,
        }  # fmt: skip
    return report


def migration_cases(quick: bool) -> tuple[list[MoveCase], list[MoveCase], tuple[str, str]]:
    """(the default model's cases, the hybrid's, the two pre-copy cases' names). Quick: the llama
    fixture for the default model, and every length small. `after` keeps the sequence running until
    the Migrate call arrives (a fixture decodes a token in a few ms, the default model in 30-100)."""
    scale, after = (8, 256) if quick else (1, 64)
    hybrid_after = 256  # a fixture model: as quick as in the quick run
    default = [
        MoveCase("precopy_short", 512 // scale, before=24, after=after, others=4),
        MoveCase("sequence_2048", 2048 // scale, before=8, after=after, recompute=True),
        MoveCase("precopy_long", 8192 // scale, before=24, after=after, others=4),
    ]
    # its context is 8,192 tokens: the sequence fills it by its last token
    hybrid = [MoveCase("hybrid_context", 8192 // scale - hybrid_after, before=8, after=hybrid_after, recompute=True)]
    return default, hybrid, ("precopy_short", "precopy_long")


def run_migration(args: argparse.Namespace, machine: dict[str, Any], stops: list[dict[str, Any]]) -> None:
    default_cases, hybrid_cases, precopy = migration_cases(args.quick)
    default_model = str(args.model or (QUICK_MODEL if args.quick else default_model_path()))
    reports: dict[str, dict[str, Any]] = {}
    for model_path, cases in ((default_model, default_cases), (str(HYBRID_MODEL), hybrid_cases)):
        model = load_model(model_path, backend="numpy", progress=False)
        vocab = model.config.vocab_size
        warm = MoveCase("warm", WARM_PROMPT + 2, before=2, after=cases[0].after)  # first moves cost more
        n_ctx = max(case.cells for case in [*cases, warm]) + 64
        max_seqs = max(case.others for case in cases) + 4
        fields = {**machine, "worker_env": not args.missing_settings, "model": model.config.name, "replicas": 2,
                  "stages": 1, "n_ctx": n_ctx, "max_seqs": max_seqs, "quick": args.quick}  # fmt: skip
        serve_args = ["--model", model_path, "--replicas", "2", "--n-ctx", str(n_ctx), "--max-seqs", str(max_seqs),
                      *shlex.split(args.serve_args)]  # fmt: skip
        with serving(serve_args, fields, stops) as server:
            measure_move(server.address, vocab, warm, seed=1)
            for seed, case in enumerate(cases, start=2):
                reports[case.name] = measure_move(server.address, vocab, case, seed)
                emit(bench="service_migration", **fields, **reports[case.name])
            emit_worker_rss(server, {**fields, "part": "migration"})
    precopy_fields = {**machine, "worker_env": not args.missing_settings, "quick": args.quick}
    emit_precopy(reports[precopy[0]], reports[precopy[1]], precopy_fields)


def emit_precopy(short: dict[str, Any], long: dict[str, Any], fields: dict[str, Any]) -> None:
    """Pre-copy scaling: the long sequence's pause over the short one's, and the other streams' rate
    during each move over theirs before it."""
    if not (short["moved"] and long["moved"]):
        emit(bench="service_migration_precopy", **fields, skipped=True,
             reason=f"a move failed: {short.get('error') or long.get('error')}")  # fmt: skip
        return
    rates = (short["others_rate_ratio"], long["others_rate_ratio"])
    emit(
        bench="service_migration_precopy", **fields, skipped=False,
        short_tokens=short["sequence_tokens_at_move"], long_tokens=long["sequence_tokens_at_move"],
        short_pause_s=short["pause_s"], long_pause_s=long["pause_s"], pause_ratio=long["pause_s"] / short["pause_s"],
        target_pause_ratio=PRECOPY_PAUSE_RATIO,
        # the gap holds one ordinary decode step, whose attention grows with the sequence; what the move
        # itself adds (the pause less the stream's usual gap) is what the pre-copy keeps from growing
        short_pause_excess_s=short["pause_excess_s"], long_pause_excess_s=long["pause_excess_s"],
        pause_excess_ratio=long["pause_excess_s"] / short["pause_excess_s"]
        if long["pause_excess_s"] is not None and short["pause_excess_s"] else None,
        meets_pause_target=long["pause_s"] <= PRECOPY_PAUSE_RATIO * short["pause_s"],
        short_others_rate_ratio=rates[0], long_others_rate_ratio=rates[1], target_others_rate_ratio=OTHERS_RATE_RATIO,
        meets_others_rate_target=all(r is not None and r >= OTHERS_RATE_RATIO for r in rates),
    )  # fmt: skip


# ---- the run ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file or Hugging Face folder (default: SmolLM2)")
    parser.add_argument("--streams", type=int, nargs="+", help="concurrent clients (default: 1 8 32)")
    parser.add_argument("--prompt-tokens", type=int, help="default 256")
    parser.add_argument("--new-tokens", type=int, help="default 128")
    parser.add_argument("--replicas", type=int, default=1, help="of the throughput server")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="throughput servers' stages (1 2)")
    parser.add_argument("--n-ctx", type=int, help="of the server and the engine (default: what the most streams need)")
    parser.add_argument("--max-seqs", type=int, help="of the server and the engine (default: the most streams)")
    built = str(LLAMA_SERVER) if LLAMA_SERVER.is_file() else None
    parser.add_argument("--llama-server", default=built, help="its binary (default: `make llama-server`'s, if built)")
    parser.add_argument("--throughput", action="store_true", help="run the throughput part (default: both parts)")
    parser.add_argument("--migration", action="store_true", help="run the migration part (default: both parts)")
    parser.add_argument("--serve-args", default="", help="more flags for the servers, e.g. '--checkpoint-every 0'")
    parser.add_argument("--quick", action="store_true", help="smoke run: fixture models, streams 1 4, 16+8 tokens")
    parser.add_argument("--no-engine", action="store_true", help="throughput without the in-process engine")
    parser.add_argument(
        "--plain-env", action="store_true", help="run without the worker settings (statemesh.worker.runtime)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.missing_settings = missing_settings()
    if args.missing_settings and not args.plain_env:  # read at process start: run again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **worker_environment()})
    machine = machine_fields()
    both = not (args.throughput or args.migration)
    stops: list[dict[str, Any]] = []
    if args.throughput or both:
        streams = args.streams or ([1, 4] if args.quick else [1, 8, 32])
        prompt_len = args.prompt_tokens or (16 if args.quick else 256)
        new = args.new_tokens or (8 if args.quick else 128)
        work = Workload(
            model_path=str(args.model or (QUICK_MODEL if args.quick else default_model_path())), streams=streams,
            prompt_tokens=prompt_len, new_tokens=new, n_ctx=args.n_ctx or max(streams) * (prompt_len + new) + 64,
            max_seqs=args.max_seqs or max(streams), replicas=args.replicas,
        )  # fmt: skip
        run_throughput(args, work, machine, stops)
    if args.migration or both:
        run_migration(args, machine, stops)
    if any(s["exit_code"] != 0 or s["leftover_pids_killed"] for s in stops):
        sys.exit(1)


if __name__ == "__main__":
    main()
