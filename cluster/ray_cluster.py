"""Ray at the coordinator's edge: an embedded local cluster on loopback (or an existing cluster), a
replica's workers reserved together in a placement group, and a teardown that leaves no process.

Facts this follows (ENVIRONMENT.md, measured here): Ray takes the machine's outward address even for
a local cluster unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set and 127.0.0.1 is passed as the
node address; `address="local"` starts a new cluster whatever a stale `/tmp/ray` says; a worker
started with a `runtime_env` gets a process of its own, with those variables set before anything
is imported (the worker settings of `statemesh.worker.runtime` must be).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from statemesh.worker.runtime import worker_environment
from statemesh.worker.shard_actor import ShardActor, ShardSpec, StageActor

LOOPBACK = "127.0.0.1"
PLACEMENT_TIMEOUT_S = 120.0


class PlacementError(RuntimeError):
    """The Ray cluster cannot hold a replica's workers (too few CPUs or GPUs); says what was asked
    for and what the cluster has."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start an embedded local cluster on loopback
    num_cpus: int | None = None  # of the embedded cluster (None: the machine's)
    temp_dir: str | None = None  # of the embedded cluster's sessions and logs


def start_ray(options: RayOptions) -> None:
    """Join the cluster at `options.address`, or start an embedded one bound to loopback."""
    if options.address is not None:
        loopback = options.address.split(":")[0] in (LOOPBACK, "localhost")
        ray.init(address=options.address, _node_ip_address=LOOPBACK if loopback else None)
        return
    ray.init(
        address="local",
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=options.num_cpus,
        _temp_dir=options.temp_dir,
        # a dead worker is noticed in ~3 s instead of ~15
        _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    )


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


@dataclass
class Placement:
    """A replica's workers and the placement group that reserves their CPUs (and GPUs) together."""

    group: PlacementGroup
    actors: list[Any]


def gpu_counts() -> tuple[float, float]:
    """(GPUs the Ray cluster has, GPUs free now)."""
    return float(ray.cluster_resources().get("GPU", 0.0)), float(ray.available_resources().get("GPU", 0.0))


def gpus_per_worker(n_stages: int) -> float:
    """A GPU replica's one GPU, split evenly across its stages' workers, rounded down to Ray's
    resource granularity (1e-4) so that the shares never add up to more than the whole GPU:
    2 stages -> 0.5 each, 3 -> 0.3333 each."""
    return math.floor(10_000 / max(n_stages, 1)) / 10_000


def cpus_per_worker(n_workers: int) -> float:
    """An even share of the cluster's CPUs for each of `n_workers` workers (at most 1, at least
    0.01): Ray's CPU counts only place workers, and every worker's threads use every core."""
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.01, min(1.0, round(total / max(n_workers, 1), 2)))


async def place_replica(specs: list[ShardSpec], cpus: float, gpus: float = 0.0) -> Placement:
    """Start a replica's workers, one per spec (a pipeline's stages, in order), packed on one node
    where they fit; returns once each has loaded its model. The later stages start first: the
    first, which runs the engine, is given their handles. `gpus` is each worker's share of a GPU:
    Ray reserves it in the placement group and sets CUDA_VISIBLE_DEVICES for the worker."""
    bundle: dict[str, float] = {"CPU": cpus}
    if gpus:
        bundle["GPU"] = gpus
    group = placement_group([dict(bundle) for _ in specs], strategy="PACK")
    try:
        await _ready(group)

        def options(i: int) -> dict[str, Any]:
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            return dict(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy,
                        runtime_env={"env_vars": worker_environment()})  # fmt: skip

        later = [StageActor.options(**options(i)).remote(spec) for i, spec in enumerate(specs) if i > 0]  # type: ignore[attr-defined]
        first = ShardActor.options(**options(0)).remote(specs[0], later)  # type: ignore[attr-defined]
        actors = [first, *later]
        for actor in actors:
            await actor.info.remote()  # type: ignore[attr-defined, union-attr]  # what the constructor raised
    except BaseException:
        remove_placement_group(group)
        raise
    return Placement(group, actors)


async def _ready(group: PlacementGroup) -> None:
    try:
        await asyncio.wait_for(group.ready(), PLACEMENT_TIMEOUT_S)
    except TimeoutError:
        raise PlacementError(
            f"the cluster has no room for a replica's workers ({group.bundle_specs}) after {PLACEMENT_TIMEOUT_S:.0f} s"
        ) from None


def release(placement: Placement) -> None:
    """Stop a replica's workers and free what they reserved."""
    for actor in placement.actors:
        ray.kill(actor, no_restart=True)
    remove_placement_group(placement.group)
