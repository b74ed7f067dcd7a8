"""Two Ray nodes (issue 14): a `ray.cluster_utils.Cluster` of two nodes on loopback, each with one
CPU, and `statemesh serve --ray-address` joining it; its two replicas land on different nodes, and a
running request migrates from one node to the other mid-stream with the very tokens it would have
had."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only

from ray.cluster_utils import Cluster

from statemesh.cluster import Client
from statemesh.worker import load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams

from .conftest import FIXTURES, leftovers, start_service


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    node = dict(node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False, object_store_memory=100 << 20)
    cluster = Cluster(initialize_head=True, head_node_args=node)
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_a_request_migrates_from_one_node_to_the_other(two_nodes: Cluster, tmp_path: Path) -> None:
    args = ["--model", str(FIXTURES / "llama"), "--replicas", "2", "--ray-address", two_nodes.address,
            "--n-ctx", "512", "--max-seqs", "4"]  # fmt: skip
    service = start_service(args, tmp_path / "server.log")
    try:
        with Client(service.address) as client:
            replicas = client.replicas()
            nodes = {r.replica_id: r.workers[0].node_id for r in replicas}
            assert len(set(nodes.values())) == 2, nodes  # one replica a node
            params = {"max_tokens": 400, "temperature": 0.8, "seed": 9, "ignore_eos": True}
            stream = client.generate([5, 6, 7, 8], request_id="across", **params)
            chunks = [next(stream)]
            moved = client.migrate(request_id="across")
            chunks += list(stream)
            assert nodes[moved.source_replica_id] != nodes[moved.target_replica_id]
            model = load_model(FIXTURES / "llama", backend="numpy", progress=False)
            want = Engine(model, EngineConfig(n_ctx=512, n_seq_max=4)).generate(
                [Request("x", (5, 6, 7, 8), SamplingParams(**params))]  # type: ignore[arg-type]
            )["x"]
            assert [t for c in chunks for t in c.token_ids] == [e.token for e in want]
            assert chunks[-1].replica_id == moved.target_replica_id
    finally:
        assert service.stop() == 0
    assert leftovers(service) == []


def test_a_request_whose_node_is_removed_goes_on_on_the_other_node(two_nodes: Cluster, tmp_path: Path) -> None:
    """Issue 15: the node holding a request's replica leaves the cluster mid-stream
    (`Cluster.remove_node`); the request goes on on the other node from its last checkpoint, every
    token the one an undisturbed run gives. (This test runs last: the module's cluster loses a node.)"""
    args = ["--model", str(FIXTURES / "llama"), "--replicas", "2", "--ray-address", two_nodes.address,
            "--n-ctx", "512", "--max-seqs", "4", "--checkpoint-every", "8"]  # fmt: skip
    service = start_service(args, tmp_path / "server.log")
    try:
        with Client(service.address) as client:
            worker_node = next(iter(two_nodes.worker_nodes))
            on_worker_node = next(r for r in client.replicas() if r.workers[0].node_id == worker_node.node_id)
            client.create_session("leaving", replica_id=on_worker_node.replica_id)
            params = {"max_tokens": 400, "temperature": 0.8, "seed": 4, "ignore_eos": True}
            tokens: list[int] = []
            replicas: list[str] = []
            for chunk in client.generate([9, 10, 11, 12], session_id="leaving", **params):
                tokens += chunk.token_ids
                replicas.append(chunk.replica_id)
                if len(tokens) >= 30 and worker_node in two_nodes.worker_nodes:
                    two_nodes.remove_node(worker_node)
            model = load_model(FIXTURES / "llama", backend="numpy", progress=False)
            want = Engine(model, EngineConfig(n_ctx=512, n_seq_max=4)).generate(
                [Request("x", (9, 10, 11, 12), SamplingParams(**params))]  # type: ignore[arg-type]
            )["x"]
            assert tokens == [e.token for e in want]
            assert replicas[0] == on_worker_node.replica_id != replicas[-1]
            assert client.stats().recoveries == 1
            # then rebuilt where there is room: the node left, so never on it again
            gone = next(r for r in client.replicas() if r.replica_id == on_worker_node.replica_id)
            assert gone.state in ("dead", "starting") or all(w.node_id != worker_node.node_id for w in gone.workers)
    finally:
        assert service.stop() == 0
    assert leftovers(service) == []
