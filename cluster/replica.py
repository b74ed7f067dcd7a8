"""`Replica`: the coordinator's view of one replica — its workers (Ray actors, one per pipeline
stage; the first runs the engine), its state, the requests in flight on it, and the prompt blocks
recently sent to it (for routing by cached prefix). No gRPC here; Ray only through the handles."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from statemesh.cluster.replica_events import ReplicaEvents
from statemesh.worker.shard_actor import WorkerInfo

STATES = ("starting", "ready", "draining", "dead")
PREFIX_KEYS_KEPT = 4096  # block keys remembered per replica (~the prompts its prefix cache may hold)


@dataclass
class Replica:
    replica_id: str
    model: str
    actors: list[Any]  # Ray actor handles, stage 0 first
    placement: Any  # what `ray_cluster.release` frees
    workers: list[WorkerInfo] = field(default_factory=list)
    state: str = "starting"
    in_flight: set[str] = field(default_factory=set)  # request ids the coordinator is streaming from it
    prefix_keys: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    events: ReplicaEvents | None = None  # its engine's event stream, opened by the first request

    @property
    def engine(self) -> Any:
        """The actor that runs the replica's engine (its first stage)."""
        return self.actors[0]

    @property
    def load(self) -> int:
        return len(self.in_flight)

    def remember_prefix(self, keys: list[bytes]) -> None:
        for key in keys:
            self.prefix_keys[key] = None
            self.prefix_keys.move_to_end(key)
        while len(self.prefix_keys) > PREFIX_KEYS_KEPT:
            self.prefix_keys.popitem(last=False)

    def cached_depth(self, keys: list[bytes]) -> int:
        """How many of a prompt's leading blocks were sent here before."""
        depth = 0
        for key in keys:
            if key not in self.prefix_keys:
                break
            depth += 1
        return depth
