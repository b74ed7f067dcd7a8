"""The service under load (issue 15): many clients at once for a bounded time, a mixed workload, and
afterwards the check that nothing leaked. One JSON object per line.

    python bench/load.py [--model PATH] [--clients 16 64 128] [--seconds 60] [--replicas N] [--max-seqs N]
                         [--n-ctx N] [--max-in-flight N] [--serve-args "..."] [--seed S]
    python bench/load.py --quick    # a smoke run on the llama test fixture (clients 4 8, a few seconds)

The server: `statemesh serve --port 0` in a process of its own (bench/service.py's `serving`: its
`service_start` and `service_stop` lines come out too), one server for every client count. Its
--max-in-flight defaults to 96, below the largest client count, so that the run goes through the
RESOURCE_EXHAUSTED path: a refused client waits the `retry-after-ms` the call's trailing metadata
gives, then sends the same request again (each refusal is counted under errors_by_code, and in
`resource_exhausted_retries`). Generate is called on the stub of `statemesh.cluster.AsyncClient`'s
channel, not through `AsyncClient.generate`: its `StatemeshError` carries the code and message but
not the trailing metadata. Sessions, Stats and ListReplicas go through `AsyncClient`.

The workload, seeded (--seed): each of N clients (one `AsyncClient` each, its channel connected
before the clock starts) loops until the time is up, drawing its next job from one mix: prompts of
random token ids (10% text) of 16..512 tokens, outputs of 8..256 tokens (both drawn log-uniformly:
most requests short, some long), 60% greedy and 40% seeded sampling, 80% with ignore_eos; 20% of
jobs are a conversation (Sessions/Create, 2-3 turns of 8..64 new prompt tokens and 8..32 new
tokens, Sessions/Delete); of the single requests, 10% close their stream after k tokens (k drawn
below max_tokens: `call.cancel()`) and 5% carry a deadline of 1..15 s (DEADLINE_EXCEEDED is
expected of those). When the time is up every client is cancelled where it stands (its call
cancelled, `cut_at_end`), and the sessions left open are deleted. Each client count runs the same
mix twice: a warm-up of --warm-seconds (default: as long as the measured run; see Leaks), not
reported, then the measured run.

Correctness. 30% of the requests, and 30% of the conversations, are drawn from a small shared pool
(8 requests of at most 64 new tokens, 4 conversations), so the same (prompt, sampling) pairs repeat
across clients, batches, prefix-cache hits, preemptions and client counts. Before the server starts,
each pooled request and conversation runs once through `statemesh.worker.engine.engine.Engine` in
this process (greedy and seeded sampling alike are exact: the engine gives a request the tokens it
would get alone). Every pooled request that completed must have the reference's tokens and finish
reason; one that was cancelled, cut at the end or ran past its deadline must have streamed a
prefix of them. Every completed request is also checked for its length: `length` means exactly
max_tokens tokens, `stop` (only without ignore_eos) at most that; any other finish reason of a
request the client did not cancel is wrong.

Measured (the measured run only): requests and their outcomes, errors by status code (and which
were unexpected: anything but RESOURCE_EXHAUSTED, and DEADLINE_EXCEEDED of a request with a
deadline), tokens/s (tokens that arrived within the run / its length), time to first token p50/p99
(from the send of the attempt that was served to its first token; the waits after refusals are not
in it), inter-token latency p50/p99 (a chunk of k tokens g seconds after the previous one counts k
gaps of g/k). Every --sample-every seconds the run samples VmRSS of every process of the server (the
coordinator, its Ray processes, its workers: the server's process tree) and of this one, and
ListReplicas (workers' memory_bytes, queues) and Stats (running, waiting). `peak_rss_mb_by_process`
is each process's VmHWM at the end of the run: its peak since it started (one server serves every
client count, so it includes the earlier counts').

Leaks. After the warm-up and again after the measured run, the bench waits for the server to be
idle (Stats: 0 running, 0 waiting; no replica migrating), lets it settle, and takes a snapshot:
each process's VmRSS and VmHWM, each worker's memory_bytes, the sessions left (Sessions/List). The
snapshot after the run is compared with the one after the warm-up: `rss_after_vs_start` is each
process's ratio of VmRSS. A process keeps much of the memory it freed (glibc's arenas; the workers
keep all of it, `statemesh.worker.runtime`), so its RSS after a load lies anywhere up to its
high-water mark of that load, not at the memory it still uses: hence the warm-up, the same mix for
as long, and the leak test against the peak before the run (`rss_after_vs_peak_before`, VmHWM at
the first snapshot): a process whose RSS after the run exceeds it by LEAK_RSS_RATIO and LEAK_RSS_MB
both is a `leak_suspect`, for the run needed more memory than the same load ever did before. (On
the default model at 64 clients the coordinator's RSS after three equal 30-s runs was 437, 377
and 441 MB, its peak 463-470 MB: it holds its running requests' recovery checkpoints, and with
--checkpoint-every 0 it stayed at ~140 MB. A leak smaller than that swing needs a longer run, or
more of them, to show.) `memory_in_use_after_vs_start`
gives each worker's memory_bytes components before and after; a component that grew is a leak.
The API does not expose the cells in use (memory_bytes holds the caches' allocated sizes, which
do not move, and `session_store`, the host bytes of idle sessions' states, which must go back to
where it was): sessions left over and requests still running or waiting are the rest of the check.

Unlike bench/service.py, this script does not start itself again under the worker settings of
`statemesh.worker.runtime`: the server is started with this process's environment, and those
settings (glibc keeping up to 4 GB of freed memory mapped) would hold the coordinator's RSS at its
high-water mark, which hides whether its memory comes back; a coordinator started by hand runs
without them. The workers get them from Ray either way (`cluster/ray_cluster.py`);
`worker_settings_by_process` shows who has them.

Every line names the CPU, its vector extensions and the core OpenBLAS picked (bench/service.py's
`machine_fields`), and `other_cpu_cores`: the CPU other processes than the bench's and the server's
took during the run (above ~0.1 the machine was shared and the timings are suspect). The exit
status is 1 when a request came out wrong, an error was unexpected, something leaked, or the
server did not stop cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import shlex
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from engine import emit  # bench/engine.py (this script's folder is on sys.path)
from service import CpuMeter, machine_fields, process_env, serving  # bench/service.py

from statemesh.cluster import AsyncClient, StatemeshError
from statemesh.cluster.client import generate_request
from statemesh.worker import Model, default_model_path, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.runtime import worker_environment

ROOT = Path(__file__).resolve().parents[1]
QUICK_MODEL = ROOT / "tests" / "fixtures" / "llama"
# A process whose resident memory after the run exceeds its peak before the run by both this ratio
# and this many MB is a leak suspect: the ratio alone would flag a small process's few MB of
# allocator noise, the MB alone a large worker's ordinary jitter. Measured: on the default model the
# coordinator's RSS after a 45-s run of 128 clients was 1.10x (+45 MB) the peak of an equal run just
# before it (it holds its running requests' recovery checkpoints, which vary from run to run).
LEAK_RSS_RATIO = 1.25
LEAK_RSS_MB = 64.0
IDLE_POLL_S = 0.2
SETTLE_S = 1.0  # after the server is idle, before the snapshot: cancellations' last frees land
DELETE_TRIES = 50  # a session whose turn was just cancelled is busy until the cancel reaches its replica
CALL_TIMEOUT_S = 30.0  # Stats, ListReplicas, Sessions calls of the sampler and the leak check
STOP_TIMEOUT_S = 30.0  # for the clients to stop once cancelled
WORDS = ("river", "stone", "light", "paper", "garden", "window", "cloud", "orange", "music", "market", "silver",
         "winter", "forest", "engine", "harbor", "letter", "candle", "mirror", "bridge", "valley")  # fmt: skip


# ---- the workload -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """What the clients draw from. Lengths are (low, high), drawn log-uniformly."""

    vocab: int
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    turn_prompt_tokens: tuple[int, int]
    turn_output_tokens: tuple[int, int]
    pooled_output_max: int  # a pooled request's outputs are at most this (its reference runs in process)
    deadline_s: tuple[float, float]
    pooled_singles: int = 8
    pooled_conversations: int = 4
    p_session: float = 0.2
    p_cancel: float = 0.1
    p_deadline: float = 0.05
    p_sampled: float = 0.4
    p_pooled: float = 0.3
    p_text: float = 0.1
    p_ignore_eos: float = 0.8


def full_mix(vocab: int) -> Mix:
    return Mix(vocab, prompt_tokens=(16, 512), output_tokens=(8, 256), turn_prompt_tokens=(8, 64),
               turn_output_tokens=(8, 32), pooled_output_max=64, deadline_s=(1.0, 15.0))  # fmt: skip


def quick_mix(vocab: int) -> Mix:
    """Small enough for the llama fixture (its positions end at 256) and a few seconds' run."""
    return Mix(vocab, prompt_tokens=(4, 48), output_tokens=(4, 32), turn_prompt_tokens=(4, 16),
               turn_output_tokens=(4, 12), pooled_output_max=24, deadline_s=(0.05, 2.0), pooled_singles=6,
               pooled_conversations=3)  # fmt: skip


@dataclass(frozen=True)
class Ask:
    """One request as the client sends it. `key` names a pooled one: ("single", i, 0) or
    ("turn", conversation, turn); its tokens are checked against the reference."""

    prompt: tuple[int, ...] | str
    sampling: dict[str, Any]  # SamplingParams fields by name (the client's keywords)
    key: tuple[str, int, int] | None = None


@dataclass(frozen=True)
class Job:
    """What a client does next: one request, or a conversation (a session, one ask per turn)."""

    asks: tuple[Ask, ...]
    session: bool = False
    cancel_after: int | None = None  # close the stream once this many tokens came
    deadline_s: float | None = None


@dataclass(frozen=True)
class Pool:
    singles: list[Ask]
    conversations: list[tuple[Ask, ...]]


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw_ask(mix: Mix, rng: random.Random, prompt_tokens: tuple[int, int], output_tokens: tuple[int, int],
             key: tuple[str, int, int] | None = None) -> Ask:  # fmt: skip
    """Random token ids (or, unpooled, sometimes text) and greedy or seeded sampling."""
    n_prompt = log_uniform(rng, *prompt_tokens)
    prompt: tuple[int, ...] | str
    if key is None and rng.random() < mix.p_text:  # a word is 1-5 tokens (the default model, the fixtures)
        prompt = " ".join(rng.choice(WORDS) for _ in range(max(1, n_prompt // 4)))
    else:
        prompt = tuple(rng.randrange(mix.vocab) for _ in range(n_prompt))
    sampling: dict[str, Any] = {"max_tokens": log_uniform(rng, *output_tokens)}
    sampling["ignore_eos"] = rng.random() < mix.p_ignore_eos
    if rng.random() < mix.p_sampled:
        sampling |= {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": rng.randrange(1 << 31)}
    else:
        sampling["temperature"] = 0.0
    return Ask(prompt, sampling, key)


def make_pool(mix: Mix, seed: int) -> Pool:
    rng = random.Random(f"pool-{seed}")
    output = (mix.output_tokens[0], mix.pooled_output_max)
    singles = [draw_ask(mix, rng, mix.prompt_tokens, output, ("single", i, 0)) for i in range(mix.pooled_singles)]
    conversations = [
        tuple(draw_ask(mix, rng, mix.turn_prompt_tokens, mix.turn_output_tokens, ("turn", c, t))
              for t in range(rng.choice((2, 3))))
        for c in range(mix.pooled_conversations)
    ]  # fmt: skip
    return Pool(singles, conversations)


def draw_job(mix: Mix, pool: Pool, rng: random.Random) -> Job:
    pooled = rng.random() < mix.p_pooled
    if rng.random() < mix.p_session:
        if pooled:
            return Job(rng.choice(pool.conversations), session=True)
        turns = rng.choice((2, 3))
        return Job(tuple(draw_ask(mix, rng, mix.turn_prompt_tokens, mix.turn_output_tokens) for _ in range(turns)),
                   session=True)  # fmt: skip
    ask = rng.choice(pool.singles) if pooled else draw_ask(mix, rng, mix.prompt_tokens, mix.output_tokens)
    what = rng.random()
    if what < mix.p_cancel and ask.sampling["max_tokens"] > 1:
        return Job((ask,), cancel_after=rng.randrange(1, ask.sampling["max_tokens"]))
    if what < mix.p_cancel + mix.p_deadline:
        return Job((ask,), deadline_s=math.exp(rng.uniform(*(math.log(s) for s in mix.deadline_s))))
    return Job((ask,))


# ---- the reference --------------------------------------------------------------------------------------


Reference = dict[tuple[str, int, int], tuple[list[int], str]]  # key -> (tokens, finish reason)


def reference_outputs(model: Model, pool: Pool) -> Reference:
    """Each pooled request, and each pooled conversation turn by turn, through an in-process engine.
    A turn's request holds the session's whole history and then its new prompt, as the service's
    worker makes it (`ShardWorker._request`); the session lets the engine reuse the history's state."""
    asks = [*pool.singles, *(ask for turns in pool.conversations for ask in turns)]
    n_ctx = sum(len(a.prompt) + a.sampling["max_tokens"] for a in asks) + 64
    engine = Engine(model, EngineConfig(n_ctx=n_ctx, n_seq_max=len(pool.singles) + len(pool.conversations)))
    out: Reference = {}

    def run(requests: list[tuple[Ask, str | None]]) -> None:
        made = []
        for ask, session in requests:
            history = engine.session_history(session) if session is not None else []
            assert history is not None  # opened below, before the first turn
            prompt = (*history, *ask.prompt)
            made.append(Request(repr(ask.key), prompt, SamplingParams(**ask.sampling), session))
        results = engine.generate(made)
        for ask, _ in requests:
            assert ask.key is not None  # pooled asks are token ids with a key (make_pool)
            events = results[repr(ask.key)]
            out[ask.key] = ([e.token for e in events if e.token >= 0], events[-1].finish_reason or "")

    run([(a, None) for a in pool.singles])
    for c in range(len(pool.conversations)):
        engine.open_session(f"c{c}")
    for turn in range(max(len(turns) for turns in pool.conversations)):
        run([(turns[turn], f"c{c}") for c, turns in enumerate(pool.conversations) if turn < len(turns)])
    return out


# ---- the clients ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request's run. `status`: OK (it ran to its finish reason), cancelled (its client closed
    it), cut_at_end (in flight when the time was up), or the name of the status code it ended with."""

    key: tuple[str, int, int] | None
    max_tokens: int
    ignore_eos: bool
    sent: float = 0.0  # the send of the attempt that was served (or the last one refused)
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens) of each chunk with tokens
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    status: str = ""
    refusals: int = 0  # RESOURCE_EXHAUSTED answers before it ran, each waited out


@dataclass
class RunLog:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # every error status, refusals included
    unexpected: list[str] = field(default_factory=list)  # what should not have happened, one line each
    retry_after_ms: set[int] = field(default_factory=set)
    sessions_created: int = 0
    sessions_deleted: int = 0
    session_delete_retries: int = 0
    session_turns: int = 0
    open_sessions: set[str] = field(default_factory=set)
    stopping: bool = False  # the time is up: clients end where they stand


def retry_after_ms(error: grpc.aio.AioRpcError) -> int | None:
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            return int(value)
    return None


async def stream_once(client: AsyncClient, ask: Ask, job: Job, session: str | None, outcome: Outcome) -> None:
    """One Generate call; with `job.cancel_after`, closed once that many tokens came."""
    prompt = ask.prompt if isinstance(ask.prompt, str) else list(ask.prompt)
    request = generate_request(prompt, session, None, ask.sampling)
    call = client.inference.Generate(request, metadata=client.metadata, timeout=job.deadline_s)
    try:
        async for chunk in call:
            if chunk.token_ids:
                outcome.chunks.append((time.perf_counter(), len(chunk.token_ids)))
                outcome.tokens += chunk.token_ids
            if chunk.finish_reason:
                outcome.finish_reason = chunk.finish_reason
            elif job.cancel_after is not None and len(outcome.tokens) >= job.cancel_after:
                outcome.status = "cancelled"
                return
        outcome.status = "OK"
    finally:
        call.cancel()  # a no-op once it finished


async def run_ask(client: AsyncClient, ask: Ask, job: Job, session: str | None, log: RunLog) -> Outcome:
    """One request to its end; a RESOURCE_EXHAUSTED answer is waited out (its retry-after-ms) and
    the request sent again."""
    outcome = Outcome(ask.key, ask.sampling["max_tokens"], ask.sampling["ignore_eos"])
    log.outcomes.append(outcome)
    try:
        while True:
            outcome.sent = time.perf_counter()
            try:
                await stream_once(client, ask, job, session, outcome)
                return outcome
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.CANCELLED and log.stopping:  # our own cancel, as grpc may report it
                    outcome.status = "cut_at_end"
                    return outcome
                log.errors[code.name] += 1
                wait_ms = retry_after_ms(e)
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and wait_ms is not None and not outcome.tokens:
                    log.retry_after_ms.add(wait_ms)
                    outcome.refusals += 1
                    await asyncio.sleep(wait_ms / 1000)
                    if log.stopping:
                        outcome.status = "cut_at_end"
                        return outcome
                    continue
                outcome.status = code.name
                if not (code == grpc.StatusCode.DEADLINE_EXCEEDED and job.deadline_s is not None):
                    log.unexpected.append(f"Generate: {code.name}: {e.details()}")
                return outcome
    except asyncio.CancelledError:
        outcome.status = outcome.status or "cut_at_end"
        raise


async def delete_session(client: AsyncClient, name: str, log: RunLog, absent_ok: bool = False) -> None:
    """Sessions/Delete, again while the session is still busy with a turn just cancelled. With
    `absent_ok` (the clean-up after the run) NOT_FOUND is no error: the client was cut while its
    Create or Delete call was on its way, and that call may or may not have landed."""
    for _ in range(DELETE_TRIES):
        try:
            await client.delete(name)
            log.sessions_deleted += 1
            log.open_sessions.discard(name)
            return
        except StatemeshError as e:
            if e.code == grpc.StatusCode.NOT_FOUND and absent_ok:
                log.open_sessions.discard(name)
                return
            if e.code != grpc.StatusCode.FAILED_PRECONDITION:
                log.errors[e.code.name] += 1
                log.unexpected.append(f"Sessions/Delete {name}: {e}")
                return
            log.session_delete_retries += 1
            await asyncio.sleep(0.1)
    log.unexpected.append(f"Sessions/Delete {name}: still busy after {DELETE_TRIES} tries")


async def run_conversation(client: AsyncClient, job: Job, name: str, log: RunLog) -> None:
    log.open_sessions.add(name)  # before the call: a client cut during it leaves a session to clean up
    try:
        await client.create_session(name)
    except StatemeshError as e:
        log.open_sessions.discard(name)
        log.errors[e.code.name] += 1
        log.unexpected.append(f"Sessions/Create {name}: {e}")
        return
    log.sessions_created += 1
    for ask in job.asks:
        if (await run_ask(client, ask, job, name, log)).status != "OK":
            break
        log.session_turns += 1
    await delete_session(client, name, log)


async def client_loop(client: AsyncClient, mix: Mix, pool: Pool, rng: random.Random, tag: str, log: RunLog) -> None:
    """Job after job until the time is up."""
    for n in itertools.count():
        if log.stopping:
            return
        job = draw_job(mix, pool, rng)
        if job.session:
            await run_conversation(client, job, f"{tag}-{n}", log)
        else:
            await run_ask(client, job.asks[0], job, None, log)


# ---- the server's processes and memory ---------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB ({} once it is gone)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    return out


def process_tree(root: int) -> dict[int, str]:
    """Every live process under `root`, itself included: pid -> its command name."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            stat = (entry / "stat").read_text()
            names[int(entry.name)] = stat[stat.index("(") + 1 : stat.rindex(")")]
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 1 :].split()[1])
    tree = {root} if root in names else set()
    grew = True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= found
        grew = bool(found)
    return {pid: names[pid] for pid in sorted(tree)}


def process_labels(server_pid: int, workers: dict[int, str]) -> dict[int, str]:
    """The processes to watch, named: the coordinator, each worker by its id, Ray's by command name
    and pid, and this bench."""
    labels = {pid: f"{name}:{pid}" for pid, name in process_tree(server_pid).items()}
    labels |= {server_pid: "coordinator", os.getpid(): "bench"}
    labels |= {pid: worker_id for pid, worker_id in workers.items()}
    return labels


@dataclass(frozen=True)
class Snapshot:
    """The server at rest: whether it was idle, what it held, and its processes' resident memory."""

    idle: bool
    running: int
    waiting: int
    migrating: int
    sessions: int
    memory_bytes: dict[str, int]  # "<worker_id>/<component>" -> bytes
    rss_kb: dict[str, int]  # process label -> VmRSS
    hwm_kb: dict[str, int]  # process label -> VmHWM: its peak so far


async def worker_pids(client: AsyncClient) -> dict[int, str]:
    replicas = await asyncio.wait_for(client.replicas(), CALL_TIMEOUT_S)
    return {w.pid: w.worker_id for r in replicas for w in r.workers}


async def snapshot(client: AsyncClient, server_pid: int, idle_timeout_s: float) -> Snapshot:
    """Once the server is idle (or `idle_timeout_s` passed): queues, sessions, memory and RSS."""
    deadline = time.monotonic() + idle_timeout_s
    while True:
        stats = await asyncio.wait_for(client.stats(), CALL_TIMEOUT_S)
        replicas = await asyncio.wait_for(client.replicas(), CALL_TIMEOUT_S)
        migrating = sum(r.migrating for r in replicas)
        idle = stats.requests_running == 0 and stats.requests_waiting == 0 and migrating == 0
        if idle or time.monotonic() > deadline:
            break
        await asyncio.sleep(IDLE_POLL_S)
    await asyncio.sleep(SETTLE_S)
    sessions = await asyncio.wait_for(client.list_sessions(), CALL_TIMEOUT_S)
    replicas = await asyncio.wait_for(client.replicas(), CALL_TIMEOUT_S)
    memory = {
        f"{w.worker_id}/{name}": int(n) for r in replicas for w in r.workers for name, n in w.memory_bytes.items()
    }
    labels = process_labels(server_pid, {w.pid: w.worker_id for r in replicas for w in r.workers})
    status = {label: proc_status(pid) for pid, label in labels.items()}
    rss = {label: kb.get("VmRSS", 0) for label, kb in status.items()}
    hwm = {label: kb.get("VmHWM", 0) for label, kb in status.items()}
    return Snapshot(idle, int(stats.requests_running), int(stats.requests_waiting), migrating, len(sessions), memory,
                    rss, hwm)  # fmt: skip


@dataclass
class Sampler:
    """Samples the server while the run goes on: its processes' RSS, its queues and memory_bytes."""

    client: AsyncClient
    labels: dict[int, str]  # the processes to sample (`process_labels`)
    peak_rss_kb: dict[str, int] = field(default_factory=dict)  # the largest VmRSS sampled
    peak_running: int = 0
    peak_waiting: int = 0
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    failures: list[str] = field(default_factory=list)
    stopped: bool = False

    async def run(self, every_s: float) -> None:
        while not self.stopped:
            await self.sample()
            await asyncio.sleep(every_s)

    async def sample(self) -> None:
        for pid, label in self.labels.items():
            rss = proc_status(pid).get("VmRSS")
            if rss is not None:
                self.peak_rss_kb[label] = max(self.peak_rss_kb.get(label, 0), rss)
        try:
            stats = await asyncio.wait_for(self.client.stats(), CALL_TIMEOUT_S)
            replicas = await asyncio.wait_for(self.client.replicas(), CALL_TIMEOUT_S)
        except (StatemeshError, TimeoutError) as e:  # reported: the server did not answer its own API in time
            self.failures.append(f"{type(e).__name__}: {e}")
            return
        self.peak_running = max(self.peak_running, int(stats.requests_running))
        self.peak_waiting = max(self.peak_waiting, int(stats.requests_waiting))
        for r in replicas:
            for w in r.workers:
                for name, n in w.memory_bytes.items():
                    key = f"{w.worker_id}/{name}"
                    self.peak_memory_bytes[key] = max(self.peak_memory_bytes.get(key, 0), int(n))
        self.samples += 1


def peak_rss_mb(labels: dict[int, str]) -> dict[str, float]:
    """Each process's VmHWM: the kernel's record of its peak since it started."""
    out = {}
    for pid, label in labels.items():
        hwm = proc_status(pid).get("VmHWM")
        if hwm is not None:
            out[label] = round(hwm / 1024, 1)
    return out


# ---- one client count -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    address: str
    server_pid: int
    mix: Mix
    pool: Pool
    seed: int
    idle_timeout_s: float
    sample_every_s: float


async def load_run(setting: Setting, clients: int, seconds: float, tag: str,
                   sampler: Sampler | None = None) -> tuple[RunLog, float]:  # fmt: skip
    """N clients for `seconds`, then every one cancelled where it stands and the sessions left open
    deleted. Returns the log and when the clock started."""
    connections = [AsyncClient(setting.address) for _ in range(clients)]
    log = RunLog()
    try:
        await asyncio.gather(*(c.channel.channel_ready() for c in connections))
        watcher = asyncio.create_task(sampler.run(setting.sample_every_s)) if sampler is not None else None
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(client_loop(c, setting.mix, setting.pool, random.Random(f"{tag}-{setting.seed}-{i}"),
                                            f"{tag}-{i}", log))
            for i, c in enumerate(connections)
        ]  # fmt: skip
        await asyncio.sleep(seconds)
        await stop_all(tasks, watcher, log, sampler)
        for name in sorted(log.open_sessions):
            await delete_session(connections[0], name, log, absent_ok=True)
        return log, start
    finally:
        await asyncio.gather(*(c.close() for c in connections))


async def stop_all(tasks: list[asyncio.Task[None]], watcher: asyncio.Task[None] | None, log: RunLog,
                   sampler: Sampler | None) -> None:  # fmt: skip
    """Cancel the clients and the sampler. The flags stop their loops as well: on Python 3.11 a
    cancellation that meets a finishing `asyncio.wait_for` can be lost, and one lost run would
    never end. A client that has not stopped after STOP_TIMEOUT_S is reported, and left."""
    log.stopping = True
    if sampler is not None:
        sampler.stopped = True
    everything = [*tasks, *([watcher] if watcher is not None else [])]
    for task in everything:
        task.cancel()
    _, pending = await asyncio.wait(everything, timeout=STOP_TIMEOUT_S)
    if pending:
        log.unexpected.append(f"{len(pending)} client or sampler tasks did not stop within {STOP_TIMEOUT_S} s")
    for task in everything:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.unexpected.append(f"a client or the sampler failed: {task.exception()!r}")


def latency(log: RunLog, start: float, seconds: float) -> dict[str, Any]:
    """Tokens/s within the run, TTFT and inter-token latency percentiles."""
    end = start + seconds
    tokens = sum(n for o in log.outcomes for when, n in o.chunks if when <= end)
    ttft = np.array([o.chunks[0][0] - o.sent for o in log.outcomes if o.chunks] or [math.nan])
    gaps = [
        (now - before) / n for o in log.outcomes for (before, _), (now, n) in zip(o.chunks, o.chunks[1:], strict=False)
        for _ in range(n)
    ]  # fmt: skip
    itl = np.array(gaps or [math.nan])
    return {
        "tokens": tokens, "tokens_per_s": tokens / seconds,
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "itl_p50_s": float(np.percentile(itl, 50)), "itl_p99_s": float(np.percentile(itl, 99)),
    }  # fmt: skip


def correctness(log: RunLog, reference: Reference) -> dict[str, Any]:
    """Pooled requests against their reference (whole when completed, a prefix otherwise), and every
    completed request's length against its max_tokens."""
    counts: Counter[str] = Counter()
    completed_by_key: Counter[tuple[str, int, int]] = Counter()
    wrong: list[str] = []
    for o in log.outcomes:
        done = o.status == "OK"
        if done:
            counts["completed"] += 1
            if not length_ok(o):
                wrong.append(f"{o.key or 'unpooled'}: {len(o.tokens)} tokens, finish {o.finish_reason!r}, "
                             f"max_tokens {o.max_tokens}, ignore_eos {o.ignore_eos}")  # fmt: skip
        if o.key is None:
            continue
        tokens, finish = reference[o.key]
        if done:
            counts["pooled_completed_checked"] += 1
            completed_by_key[o.key] += 1
            if o.tokens != tokens or o.finish_reason != finish:
                wrong.append(f"{o.key}: {o.tokens[:8]}... ({len(o.tokens)}, {o.finish_reason}) != reference "
                             f"{tokens[:8]}... ({len(tokens)}, {finish})")  # fmt: skip
        elif o.tokens:
            counts["pooled_prefix_checked"] += 1
            if o.tokens != tokens[: len(o.tokens)]:
                wrong.append(f"{o.key} ({o.status}): its {len(o.tokens)} tokens are not the reference's first ones")
    counts["pooled_repeated"] = sum(1 for n in completed_by_key.values() if n > 1)
    return {"correct": not wrong, "correctness": {**counts, "wrong": len(wrong), "examples": wrong[:5]}}


def length_ok(o: Outcome) -> bool:
    if o.finish_reason == "length":
        return len(o.tokens) == o.max_tokens
    if o.finish_reason == "stop":
        return not o.ignore_eos and len(o.tokens) <= o.max_tokens
    return False


def leaks(start: Snapshot, after: Snapshot) -> dict[str, Any]:
    """The snapshot after the run against the one before it. A process is a leak suspect when its RSS
    after the run exceeds its peak before the run (VmHWM, the warm-up's high-water mark included)."""
    ratios = {label: round(after.rss_kb[label] / kb, 3) for label, kb in start.rss_kb.items()
              if kb and after.rss_kb.get(label)}  # fmt: skip
    over_peak = {label: round(after.rss_kb[label] / kb, 3) for label, kb in start.hwm_kb.items()
                 if kb and after.rss_kb.get(label)}  # fmt: skip
    suspects = sorted(
        label for label, kb in start.hwm_kb.items()
        if label in over_peak and over_peak[label] > LEAK_RSS_RATIO and (after.rss_kb[label] - kb) / 1024 > LEAK_RSS_MB
    )  # fmt: skip
    memory = {name: {"start": n, "after": after.memory_bytes.get(name)} for name, n in start.memory_bytes.items()}
    grew = sorted(name for name, n in start.memory_bytes.items() if after.memory_bytes.get(name, 0) > n)
    gone = sorted(label for label in start.rss_kb if start.rss_kb[label] and not after.rss_kb.get(label))
    # Ray starts and ends helper processes as it likes; the coordinator and the workers must stay
    served_gone = [label for label in gone if label == "coordinator" or "/" in label]
    leaked = bool(
        suspects or grew or served_gone or not (start.idle and after.idle) or start.sessions or after.sessions
    )
    return {
        "rss_mb_start": {k: round(v / 1024, 1) for k, v in start.rss_kb.items()},
        "rss_mb_after": {k: round(v / 1024, 1) for k, v in after.rss_kb.items()},
        "rss_after_vs_start": ratios, "rss_after_vs_peak_before": over_peak, "leak_suspect": suspects,
        "leak_rss_ratio": LEAK_RSS_RATIO, "leak_rss_mb": LEAK_RSS_MB, "memory_in_use_after_vs_start": memory,
        "memory_grew": grew,
        "idle_after": after.idle, "running_after": after.running, "waiting_after": after.waiting,
        "migrating_after": after.migrating, "sessions_left_at_start": start.sessions,
        "sessions_left": after.sessions, "processes_gone": gone, "leaked": leaked,
    }  # fmt: skip


async def measure_clients(setting: Setting, clients: int, seconds: float, warm_s: float,
                          reference: Reference) -> dict[str, Any]:  # fmt: skip
    """Warm-up, snapshot, the measured run (sampled), snapshot: the report of one client count."""
    admin = AsyncClient(setting.address)
    try:
        warm, _ = await load_run(setting, clients, warm_s, f"warm{clients}")
        start_snap = await snapshot(admin, setting.server_pid, setting.idle_timeout_s)
        labels = process_labels(setting.server_pid, await worker_pids(admin))
        sampler = Sampler(admin, labels)
        meter = CpuMeter([setting.server_pid], [pid for pid, label in labels.items() if label != "bench"])
        meter.start()
        log, start = await load_run(setting, clients, seconds, f"c{clients}", sampler)
        other_cores = meter.other_cores()
        peaks = peak_rss_mb(labels)
        after_snap = await snapshot(admin, setting.server_pid, setting.idle_timeout_s)
    finally:
        await admin.close()
    statuses = Counter(o.status for o in log.outcomes)
    report = {
        "clients": clients, "seconds": seconds, "warm_seconds": warm_s, "requests": len(log.outcomes),
        "requests_ok": statuses["OK"], "cancelled": statuses["cancelled"], "cut_at_end": statuses["cut_at_end"],
        "outcomes": dict(statuses), "errors_by_code": dict(log.errors), "errors_unexpected": len(log.unexpected),
        "unexpected_examples": log.unexpected[:5],
        "resource_exhausted_retries": sum(o.refusals for o in log.outcomes),
        "retry_after_ms": sorted(log.retry_after_ms), "sessions_created": log.sessions_created,
        "sessions_deleted": log.sessions_deleted, "session_delete_retries": log.session_delete_retries,
        "session_turns": log.session_turns, **latency(log, start, seconds),
        "peak_running": sampler.peak_running, "peak_waiting": sampler.peak_waiting,
        "peak_rss_mb_by_process": peaks,
        "sampled_peak_rss_mb_by_process": {k: round(v / 1024, 1) for k, v in sampler.peak_rss_kb.items()},
        "peak_memory_bytes": sampler.peak_memory_bytes, "samples": sampler.samples,
        "sample_failures": sampler.failures[:5],
        **leaks(start_snap, after_snap), **correctness(log, reference),
        # the warm-up's requests are checked too, though not reported
        "warm_correct": correctness(warm, reference)["correct"], "warm_errors_unexpected": len(warm.unexpected),
        "warm_unexpected_examples": warm.unexpected[:5],
        "other_cpu_cores": round(other_cores, 3), "load_1m": os.getloadavg()[0],
        "worker_settings_by_process": {label: process_env(pid, tuple(worker_environment()))
                                       for pid, label in labels.items() if label in ("coordinator", "bench")
                                       or "/" in label},
    }  # fmt: skip
    report["ok"] = (report["correct"] and report["warm_correct"] and not report["leaked"] and not log.unexpected
                    and not warm.unexpected and not sampler.failures)  # fmt: skip
    return report


# ---- the run ------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file or Hugging Face folder (default: SmolLM2)")
    parser.add_argument("--clients", type=int, nargs="+", help="concurrent clients, one run each (default 16 64 128)")
    parser.add_argument("--seconds", type=float, help="of each measured run (default 60)")
    parser.add_argument("--warm-seconds", type=float, help="of each warm-up (default: --seconds)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-seqs", type=int, help="of each replica (default 32)")
    parser.add_argument("--n-ctx", type=int, help="token cells of each replica (default 8192)")
    parser.add_argument("--max-in-flight", type=int, help="of each replica (default 96: below the most clients)")
    parser.add_argument("--serve-args", default="", help="more flags for the server, e.g. '--checkpoint-every 0'")
    parser.add_argument("--seed", type=int, default=0, help="of the workload")
    parser.add_argument("--sample-every", type=float, help="seconds between samples of the server (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the llama fixture, clients 4 8, 3 s each")
    args = parser.parse_args()
    for name in ("clients", "replicas", "max_seqs", "n_ctx", "max_in_flight"):
        values = getattr(args, name)
        if values is not None and min(values if isinstance(values, list) else [values]) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {values}")
    for name in ("seconds", "warm_seconds", "sample_every"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds, got {getattr(args, name)}")
    return args


@dataclass(frozen=True)
class Plan:
    """The run's sizes, the quick run's or the full one's, each overridable by its flag."""

    model_path: str
    clients: list[int]
    seconds: float
    warm_s: float
    max_seqs: int
    n_ctx: int
    max_in_flight: int
    idle_timeout_s: float
    sample_every_s: float


def plan_of(args: argparse.Namespace) -> Plan:
    quick = args.quick
    seconds = args.seconds or (3.0 if quick else 60.0)
    return Plan(
        model_path=str(args.model or (QUICK_MODEL if quick else default_model_path())),
        clients=args.clients or ([4, 8] if quick else [16, 64, 128]), seconds=seconds,
        warm_s=args.warm_seconds or seconds,
        max_seqs=args.max_seqs or (4 if quick else 32), n_ctx=args.n_ctx or (256 if quick else 8192),
        max_in_flight=args.max_in_flight or (6 if quick else 96), idle_timeout_s=20.0 if quick else 60.0,
        sample_every_s=args.sample_every or (0.25 if quick else 1.0),
    )  # fmt: skip


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a caller's timeout) ends the run through its `finally`s: the server is stopped too."""
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    plan = plan_of(args)
    started = time.perf_counter()
    model = load_model(plan.model_path, backend="numpy", progress=False)
    mix = quick_mix(model.config.vocab_size) if args.quick else full_mix(model.config.vocab_size)
    pool = make_pool(mix, args.seed)
    reference = reference_outputs(model, pool)
    del model  # the server loads its own
    fields = {**machine_fields(), "model": plan.model_path,
              "replicas": args.replicas, "max_seqs": plan.max_seqs, "n_ctx": plan.n_ctx,
              "max_in_flight": plan.max_in_flight, "seed": args.seed, "quick": args.quick}  # fmt: skip
    emit(bench="load_reference", **fields, pooled_requests=len(reference), seconds=time.perf_counter() - started)
    serve_args = ["--model", plan.model_path, "--replicas", str(args.replicas), "--max-seqs", str(plan.max_seqs),
                  "--n-ctx", str(plan.n_ctx), "--max-in-flight", str(plan.max_in_flight),
                  *shlex.split(args.serve_args)]  # fmt: skip
    stops: list[dict[str, Any]] = []
    reports = []
    with serving(serve_args, {**fields, "serve_args": args.serve_args}, stops) as server:
        setting = Setting(server.address, server.process.pid, mix, pool, args.seed, plan.idle_timeout_s,
                          plan.sample_every_s)  # fmt: skip
        for clients in plan.clients:
            report = asyncio.run(measure_clients(setting, clients, plan.seconds, plan.warm_s, reference))
            emit(bench="load", **fields, **report)
            reports.append(report)
    if not all(r["ok"] for r in reports) or any(s["exit_code"] != 0 or s["leftover_pids_killed"] for s in stops):
        sys.exit(1)


if __name__ == "__main__":
    main()
