"""`Metrics`: the service's Prometheus metrics, named in vLLM's style under a `statemesh:` prefix, in a
CollectorRegistry of their own (one per service, never the process-wide default); and
`MetricsEndpoint`, which serves them at /metrics on a port of their own, in the coordinator's asyncio
loop.

Two sources feed them. The coordinator reports events as they happen: a request's tokens as its
stream carries them (`RequestTimer`), its end, a migration, a recovery. The replicas' own numbers
(requests running and waiting, preemptions, prefix-cache queries and hits, memory by worker and
component) are read from them at scrape time (`Metrics.refresh`), so a scrape is never stale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from statemesh.cluster.errors import CannotListen

if TYPE_CHECKING:
    from statemesh.cluster.coordinator import Coordinator, Migration, ReplicaView

PREFIX = "statemesh:"
# vLLM's buckets (v1/metrics/loggers.py), with a few finer ones at the low end: a small model or a
# GPU answers in milliseconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                       2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# a migration's pause: one engine step plus the last piece of state moving worker to worker
PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineCounter:
    """A Prometheus counter (one series per replica) that follows a total an engine keeps. Each
    refresh adds what the total grew by since the last one; a total that went down (its engine
    restarted from zero) adds its whole new value. So the counter never goes back, as Prometheus's
    `rate()` expects, and what a replica counted before it restarted stays counted."""

    def __init__(self, counter: Counter):
        self.counter = counter
        self.last: dict[str, int] = {}  # replica id -> the engine's total at the last refresh

    def follow(self, replica_id: str, total: int) -> None:
        last = self.last.get(replica_id, 0)
        self.counter.labels(replica=replica_id).inc(total - last if total >= last else total)
        self.last[replica_id] = total


@dataclass
class RequestTimer:
    """One request's timing as its client sees its stream. A chunk of k tokens that comes g seconds
    after the previous one counts k inter-token gaps of g/k; the tokens of the first chunk after the
    first one came with it (gaps of 0). E.g. chunks of 3, 2 and 1 tokens at 0.2 s, 0.5 s and 0.6 s
    after the request came: time to first token 0.2 s, then gaps 0, 0, 0.15, 0.15, 0.1."""

    metrics: Metrics
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)  # when the request came
    last: float | None = None  # when its latest tokens came; None until the first

    def __post_init__(self) -> None:
        self.started = self.clock()

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = self.clock()
        if self.last is None:
            self.metrics.time_to_first_token.observe(now - self.started)
            gaps, gap = n - 1, 0.0
        else:
            gaps, gap = n, (now - self.last) / n
        for _ in range(gaps):
            self.metrics.inter_token_latency.observe(gap)
        self.metrics.generation_tokens.inc(n)
        self.last = now

    def finished(self, prompt_tokens: int) -> None:
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.e2e_request_latency.observe(self.clock() - self.started)


class Metrics:
    """The metrics of one service instance, in `registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # what the coordinator sees: every request's stream, every migration
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens streamed to clients", registry=r)
        self.time_to_first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "From a request's arrival to its first token", buckets=TTFT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            f"{PREFIX}inter_token_latency_seconds", "Time between two tokens of a stream, as its client sees them",
            buckets=INTER_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e_request_latency = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "From a request's arrival to its last token (finished ones)",
            buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.migrations = Counter(f"{PREFIX}migrations", "Requests and sessions moved between replicas", registry=r)
        self.migration_bytes = Counter(f"{PREFIX}migration_bytes", "State bytes that migrations moved", registry=r)
        self.migration_pause = Histogram(
            f"{PREFIX}migration_pause_seconds", "How long a migration paused its request (or session)",
            buckets=PAUSE_BUCKETS, registry=r,
        )  # fmt: skip
        self.recoveries = Counter(f"{PREFIX}recoveries", "Sequences restored after their worker died", registry=r)
        # what the replicas report, read at scrape time
        self.running = Gauge(f"{PREFIX}num_requests_running", "Requests in an engine's batch", ["replica"], registry=r)
        self.waiting = Gauge(f"{PREFIX}num_requests_waiting", "Requests waiting in an engine", ["replica"], registry=r)
        self.memory_bytes = Gauge(
            f"{PREFIX}memory_bytes", "Memory a worker holds, by component (kv, recurrent, session_store, weights, ...)",
            ["replica", "worker", "component"], registry=r,
        )  # fmt: skip
        self.preemptions = EngineCounter(
            Counter(f"{PREFIX}num_preemptions", "Requests preempted for memory", ["replica"], registry=r)
        )
        self.prefix_cache_queries = EngineCounter(
            Counter(f"{PREFIX}prefix_cache_queries", "Prompts looked up in the prefix cache", ["replica"], registry=r)
        )
        self.prefix_cache_hits = EngineCounter(
            Counter(f"{PREFIX}prefix_cache_hits", "Prompts that found a cached prefix", ["replica"], registry=r)
        )

    # ---- events, as the coordinator sees them ---------------------------------------------------------

    def request_started(self) -> RequestTimer:
        return RequestTimer(self)

    def migrated(self, migration: Migration) -> None:
        self.migrations.inc()
        self.migration_bytes.inc(migration.state_bytes)
        self.migration_pause.observe(migration.pause_ms / 1000)

    def recovered(self) -> None:
        self.recoveries.inc()

    # ---- the replicas' numbers ------------------------------------------------------------------------

    async def refresh(self, coordinator: Coordinator) -> None:
        """Read the replicas' numbers now (what a scrape does first)."""
        self.set_replicas(await coordinator.list_replicas(), await coordinator.engine_stats())

    def set_replicas(self, views: list[ReplicaView], engine_stats: dict[str, dict[str, Any]]) -> None:
        """The gauges as `Coordinator.list_replicas` saw the replicas, the engine counters as their
        `stats()` totals. Gauges are set anew: a replica or worker gone takes its series along."""
        self.running.clear()
        self.waiting.clear()
        self.memory_bytes.clear()
        for view in views:
            replica = view.replica
            if replica.state not in ("ready", "draining"):
                continue
            self.running.labels(replica=replica.replica_id).set(view.running)
            self.waiting.labels(replica=replica.replica_id).set(view.waiting)
            for worker in replica.workers:
                for component, size in worker.memory_bytes.items():
                    self.memory_bytes.labels(replica.replica_id, worker.worker_id, component).set(size)
        for replica_id, stats in engine_stats.items():
            self.preemptions.follow(replica_id, int(stats["preemptions"]))
            self.prefix_cache_queries.follow(replica_id, int(stats["prefix_queries"]))
            self.prefix_cache_hits.follow(replica_id, int(stats["prefix_hits"]))


class MetricsEndpoint:
    """GET /metrics on a port of its own (aiohttp, in the running asyncio loop). A scrape first
    awaits `refresh` (which reads the replicas), then renders the registry in the format the scraper
    asks for (Prometheus text, or OpenMetrics)."""

    def __init__(self, metrics: Metrics, refresh: Callable[[], Awaitable[None]]):
        self.metrics = metrics
        self.refresh = refresh
        self.port = 0
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        self._runner = web.AppRunner(app, access_log=None)
        # one scrape at a time: two refreshes interleaved could feed an engine counter an older total
        # after a newer one, which would read as an engine restart
        self._scraping = asyncio.Lock()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the port."""
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as e:
            await self._runner.cleanup()
            raise CannotListen(f"--metrics-port: cannot listen on {host}:{port} ({e.strerror})") from None
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _scrape(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        async with self._scraping:
            try:
                await self.refresh()
            except Exception as error:  # a scrape that cannot read the replicas says why, and the server goes on
                return web.Response(status=500, text=f"refresh failed: {error!r}\n")
            return web.Response(body=encoder(self.metrics.registry), headers={"Content-Type": content_type})
