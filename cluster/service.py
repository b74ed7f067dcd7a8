"""`run_service`: the whole service in one process, the Ray driver — Ray (embedded on loopback, or
joined), the replicas' workers, the coordinator and its gRPC server — until SIGINT or SIGTERM, then
a clean stop: no new calls, running streams cancelled (their memory freed), workers stopped, the
embedded cluster shut down. Prints the ready line of API.md once everything serves."""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field

from statemesh.cluster import ray_cluster
from statemesh.cluster.coordinator import Coordinator
from statemesh.cluster.replica import Replica
from statemesh.cluster.server import Server
from statemesh.worker.engine.engine import EngineConfig
from statemesh.worker.shard_actor import ShardSpec

STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class ServiceConfig:
    model_path: str
    replicas: int = 1
    stages: int = 1
    host: str = "127.0.0.1"
    port: int = 50051
    backend: str = "numpy"
    engine: EngineConfig = field(default_factory=EngineConfig)
    ray: ray_cluster.RayOptions = field(default_factory=ray_cluster.RayOptions)
    max_in_flight: int = 256  # requests a replica takes before RESOURCE_EXHAUSTED


async def start_replicas(config: ServiceConfig) -> list[Replica]:
    """Every replica's workers, started side by side; each returns once its model is loaded."""
    cpus = ray_cluster.cpus_per_worker(config.replicas * config.stages)

    async def one(i: int) -> Replica:
        specs = [ShardSpec(f"r{i}", config.model_path, config.engine, config.backend, stage, config.stages)
                 for stage in range(config.stages)]  # fmt: skip
        placement = await ray_cluster.place_replica(specs, cpus)
        workers = [await actor.info.remote() for actor in placement.actors]
        return Replica(f"r{i}", workers[0].model, placement.actors, placement, workers, state="ready")

    return list(await asyncio.gather(*(one(i) for i in range(config.replicas))))


async def run_service(config: ServiceConfig, ready_line: bool = True) -> None:
    if config.stages < 1:
        raise SystemExit(f"--stages must be 1 or more, got {config.stages}")
    stop = _stop_on_signals()  # from the start: a Ctrl-C while the model loads stops cleanly too
    replicas: list[Replica] = []
    server: Server | None = None
    coordinator: Coordinator | None = None
    try:
        # Ray starts on a thread of its own: the loop keeps answering signals meanwhile (and Ray,
        # off the main thread, leaves the process's SIGTERM handler alone)
        await asyncio.get_running_loop().run_in_executor(None, ray_cluster.start_ray, config.ray)
        if stop.is_set():
            return
        starting = asyncio.ensure_future(start_replicas(config))
        await asyncio.wait([starting, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        replicas = starting.result()
        coordinator = Coordinator(replicas, config.engine.prefix_block, config.max_in_flight)
        server = Server(coordinator, config.host, config.port)
        await server.start()
        if ready_line:
            print(f"statemesh listening on {config.host}:{server.port}", flush=True)
        await stop.wait()
    finally:
        print("statemesh stopping", file=sys.stderr, flush=True)
        if server is not None:
            await server.stop(STOP_GRACE_S)
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
