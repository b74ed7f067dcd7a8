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
