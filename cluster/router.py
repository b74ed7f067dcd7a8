"""Routing: which replica runs a request. A session's replica first (its state lives there); then the
replica that was sent the longest prefix of the prompt (its prefix cache may hold it); then the
least loaded. Replicas that are not `ready`, or whose queue is full, are passed over."""

from __future__ import annotations

from statemesh.cluster.errors import QueueFull, Unavailable
from statemesh.cluster.replica import Replica
from statemesh.worker.engine.prefix_cache import block_keys

RETRY_AFTER_MS = 250


def choose(replicas: list[Replica], prompt: list[int], block: int, max_in_flight: int) -> tuple[Replica, list[bytes]]:
    """The replica for a prompt, and the prompt's block keys (to remember where it went)."""
    ready = [r for r in replicas if r.state == "ready"]
    if not ready:
        raise Unavailable("no replica is ready to serve (see Cluster/ListReplicas)")
    open_ = [r for r in ready if r.load < max_in_flight]
    if not open_:
        raise QueueFull(
            f"every replica has {max_in_flight} requests in flight; retry in {RETRY_AFTER_MS} ms", RETRY_AFTER_MS
        )
    keys = block_keys(prompt, block)
    best = max(open_, key=lambda r: (r.cached_depth(keys), -r.load))
    return best, keys
