"""`run_service`: the whole service in one process, the Ray driver — Ray (embedded on loopback, or
joined), the replicas' workers, the coordinator and its gRPC server — until SIGINT or SIGTERM, then
a clean stop: no new calls, running streams cancelled (their memory freed), workers stopped, the
embedded cluster shut down. Prints the ready line of API.md once everything serves."""

from __future__ import annotations

import asyncio
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from statemesh.cluster import ray_cluster
from statemesh.cluster.auth import TlsFiles
from statemesh.cluster.coordinator import Coordinator
from statemesh.cluster.http_front import HttpFront
from statemesh.cluster.metrics import Metrics, MetricsEndpoint
from statemesh.cluster.replica import Replica
from statemesh.cluster.saved_sessions import SavedSessions
from statemesh.cluster.server import Server
from statemesh.worker.engine.engine import EngineConfig
from statemesh.worker.shard_actor import ShardSpec

STOP_GRACE_S = 5.0
BACKENDS = ("auto", "numpy", "cupy")


@dataclass(frozen=True)
class ServiceConfig:
    model_path: str
    replicas: int = 1
    stages: int = 1
    host: str = "127.0.0.1"
    port: int = 50051
    # the array backend of each replica's workers: one for every replica, or one per replica (r0,
    # r1, ...); "cupy" reserves a GPU for the replica, "auto" takes cupy when the cluster has a GPU free
    backends: tuple[str, ...] = ("numpy",)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ray: ray_cluster.RayOptions = field(default_factory=ray_cluster.RayOptions)
    max_in_flight: int = 256  # requests a replica takes before RESOURCE_EXHAUSTED
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: a free one); None: off
    http_port: int | None = None  # the OpenAI-compatible HTTP API on this port (0: a free one); None: off
    token: str | None = field(default=None, repr=False)  # the bearer token every RPC but health's needs
    weights: str = "f32"  # the workers' weights: f32, or packed q8 / q4 (GGUF, NumPy workers)
    snapshot_dir: str | None = None  # sessions saved here survive the server (read back when it starts on it)
    tls: TlsFiles | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"--backend {','.join(self.backends)}: unknown backend {unknown[0]!r}; expected "
                             f"one of {', '.join(BACKENDS)}, or a comma-separated list of them")  # fmt: skip
        if len(self.backends) not in (1, self.replicas):
            raise ValueError(
                f"--backend lists {len(self.backends)} backends ({','.join(self.backends)}) for {self.replicas} "
                f"replicas; give one backend for every replica, or exactly one per replica"
            )

    def requested_backends(self) -> tuple[str, ...]:
        """One backend per replica, as asked for ("auto" not yet resolved)."""
        return self.backends * self.replicas if len(self.backends) == 1 else self.backends


def parse_backends(text: str) -> tuple[str, ...]:
    """`--backend cupy,numpy` -> ("cupy", "numpy"); ServiceConfig checks the values and the count."""
    return tuple(part.strip() for part in text.split(","))


def resolve_backends(requested: tuple[str, ...], gpus_total: float, gpus_free: float) -> tuple[str, ...]:
    """Each replica's backend, "auto" made concrete: a cupy replica takes one whole GPU, and an
    "auto" one becomes cupy while a GPU is left free after the cupy ones, numpy after that.
    Raises PlacementError when the cupy replicas need more GPUs than the cluster has at all (the
    placement group would wait for them forever). E.g. (auto, cupy, auto) with 2 GPUs free ->
    (cupy, cupy, numpy)."""
    wanted = [f"r{i}" for i, backend in enumerate(requested) if backend == "cupy"]
    if len(wanted) > gpus_total:
        raise ray_cluster.PlacementError(
            f"--backend puts {len(wanted)} replica(s) ({', '.join(wanted)}) on cupy, each needing 1 GPU, but the "
            f"Ray cluster has {gpus_total:g} GPUs; use --backend numpy (or auto) for them, or join a cluster "
            f"with GPUs (--ray-address)"
        )
    spare = math.floor(gpus_free) - len(wanted)
    resolved = []
    for backend in requested:
        if backend == "auto":
            backend = "cupy" if spare >= 1 else "numpy"
            spare -= backend == "cupy"
        resolved.append(backend)
    return tuple(resolved)


@dataclass(frozen=True)
class ReplicaBuilder:
    """How the replicas' workers start: each replica's backend and every worker's CPU share, fixed
    when the service starts, so a dead replica is rebuilt as it was (`Coordinator.rebuild`)."""

    config: ServiceConfig
    backends: tuple[str, ...]
    cpus: float

    async def place(self, i: int) -> ray_cluster.Placement:
        config = self.config
        specs = [ShardSpec(f"r{i}", config.model_path, config.engine, self.backends[i], config.weights, stage,
                           config.stages) for stage in range(config.stages)]  # fmt: skip
        gpus = ray_cluster.gpus_per_worker(config.stages) if self.backends[i] == "cupy" else 0.0
        return await ray_cluster.place_replica(specs, self.cpus, gpus)

    async def rebuild(self, replica: Replica) -> ray_cluster.Placement:
        return await self.place(int(replica.replica_id.removeprefix("r")))


def replica_builder(config: ServiceConfig) -> ReplicaBuilder:
    backends = resolve_backends(config.requested_backends(), *ray_cluster.gpu_counts())
    return ReplicaBuilder(config, backends, ray_cluster.cpus_per_worker(config.replicas * config.stages))


async def start_replicas(config: ServiceConfig, builder: ReplicaBuilder | None = None) -> list[Replica]:
    """Every replica's workers, started side by side; each returns once its model is loaded. If
    one fails, the others are stopped and its error raised."""
    builder = builder or replica_builder(config)

    async def one(i: int) -> Replica:
        placement = await builder.place(i)
        workers = [await actor.info.remote() for actor in placement.actors]
        return Replica(f"r{i}", workers[0].model, placement.actors, placement, workers, state="ready")

    started = await asyncio.gather(*(one(i) for i in range(config.replicas)), return_exceptions=True)
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        for r in started:
            if isinstance(r, Replica):
                ray_cluster.release(r.placement)
        raise failed[0]
    return [r for r in started if isinstance(r, Replica)]


async def run_service(config: ServiceConfig, ready_line: bool = True) -> None:
    if config.stages < 1:
        raise SystemExit(f"--stages must be 1 or more, got {config.stages}")
    stop = _stop_on_signals()  # from the start: a Ctrl-C while the model loads stops cleanly too
    replicas: list[Replica] = []
    server: Server | None = None
    coordinator: Coordinator | None = None
    endpoint: MetricsEndpoint | None = None
    http: HttpFront | None = None
    try:
        # Ray starts on a thread of its own: the loop keeps answering signals meanwhile (and Ray,
        # off the main thread, leaves the process's SIGTERM handler alone)
        await asyncio.get_running_loop().run_in_executor(None, ray_cluster.start_ray, config.ray)
        if stop.is_set():
            return
        builder = replica_builder(config)
        starting = asyncio.ensure_future(start_replicas(config, builder))
        await asyncio.wait([starting, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        replicas = starting.result()
        metrics = Metrics() if config.metrics_port is not None else None
        saved = SavedSessions(Path(config.snapshot_dir) if config.snapshot_dir else None)
        coordinator = Coordinator(replicas, config.engine.prefix_block, config.max_in_flight, metrics,
                                  saved=saved, rebuild=builder.rebuild)  # fmt: skip
        for session_id, why in await coordinator.restore_saved():
            print(f"statemesh: session {session_id} in {config.snapshot_dir} not restored: {why}", file=sys.stderr)
        coordinator.start()
        if metrics is not None and config.metrics_port is not None:
            endpoint = MetricsEndpoint(metrics, lambda: metrics.refresh(coordinator))
            port = await endpoint.start(config.host, config.metrics_port)
            if ready_line:
                print(f"statemesh metrics listening on {config.host}:{port}", flush=True)
        if config.http_port is not None:
            http = HttpFront(coordinator, config.host, config.http_port, replicas[0].model, config.token, config.tls)
            await http.start()
            if ready_line:
                print(f"statemesh http listening on {config.host}:{http.port}", flush=True)
        server = Server(coordinator, config.host, config.port, config.token, config.tls)
        await server.start()
        if ready_line:
            print(f"statemesh listening on {config.host}:{server.port}", flush=True)
        await stop.wait()
    finally:
        print("statemesh stopping", file=sys.stderr, flush=True)
        if http is not None:
            await http.stop()
        if server is not None:
            await server.stop(STOP_GRACE_S)
        if endpoint is not None:
            await endpoint.stop()
        if coordinator is not None:
            await coordinator.close()
        for r in replicas:
            ray_cluster.release(r.placement)
        ray_cluster.stop_ray()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
