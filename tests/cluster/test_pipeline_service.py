"""Replicas that are pipelines (issue 14): `statemesh serve --replicas 2 --stages 2` runs two
replicas of two shard actors each; a stage holds its layers' memory; what comes out equals the
in-process engine; a running request migrates from one pipeline to the other mid-stream; a session
exported from a 2-stage replica continues in a 1-stage engine, and one from there comes back."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import pytest

from statemesh.cluster import Client
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams

from .conftest import FIXTURES, Service, leftovers, start_service

GREEDY = {"max_tokens": 12, "temperature": 0.0}


@cache
def bamba() -> Model:
    return load_model(FIXTURES / "bamba", backend="numpy", progress=False)


def engine_tokens(prompt: list[int], **sampling: object) -> list[int]:
    engine = Engine(bamba(), EngineConfig(n_ctx=512, n_seq_max=4))
    out = engine.generate([Request("x", tuple(prompt), SamplingParams(**sampling))])  # type: ignore[arg-type]
    return [e.token for e in out["x"]]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Client]]:
    """Two replicas of the hybrid Bamba fixture (4 layers), each two stages of two layers."""
    args = ["--model", str(FIXTURES / "bamba"), "--replicas", "2", "--stages", "2", "--n-ctx", "512", "--max-seqs", "8"]
    service = start_service(args, tmp_path_factory.mktemp("pipelines") / "server.log")
    client = Client(service.address)
    pids = [w.pid for r in client.replicas() for w in r.workers]
    yield service, client
    client.close()
    assert service.stop() == 0
    assert leftovers(service, pids) == []


def test_each_replica_is_two_stages_each_holding_its_layers_memory(pipelines: tuple[Service, Client]) -> None:
    _, client = pipelines
    for replica in client.replicas():
        assert [(w.worker_id, w.first_layer, w.end_layer) for w in replica.workers] == [
            (f"{replica.replica_id}/s0", 0, 2),
            (f"{replica.replica_id}/s1", 2, 4),
        ]
        assert len({w.pid for w in replica.workers}) == 2
        for w in replica.workers:  # Bamba's layers: a state-space mixer, then attention, twice
            assert sum(w.memory_bytes.values()) > 0
        # each stage holds only its layers' weights: together about one model, never two
        whole = load_model(FIXTURES / "bamba", backend="numpy", progress=False).weight_bytes
        held = [w.memory_bytes["weights"] for w in replica.workers]
        assert all(0 < h < whole for h in held) and sum(held) <= whole * 1.25, (held, whole)


def test_a_pipeline_gives_what_the_engine_gives(pipelines: tuple[Service, Client]) -> None:
    _, client = pipelines
    for i in range(3):
        prompt = [20 + i, 40, 60, 80, 100 + i, 7]
        seeded = {"max_tokens": 12, "temperature": 0.9, "seed": i}
        assert client.complete(prompt, **GREEDY).token_ids == engine_tokens(prompt, **GREEDY)
        assert client.complete(prompt, **seeded).token_ids == engine_tokens(prompt, **seeded)


def test_a_running_request_migrates_between_pipelines(pipelines: tuple[Service, Client]) -> None:
    _, client = pipelines
    params = {"max_tokens": 300, "temperature": 0.7, "seed": 5, "ignore_eos": True}
    stream = client.generate([11, 12, 13, 14], request_id="piped", **params)
    chunks = [next(stream)]
    moved = client.migrate(request_id="piped")
    chunks += list(stream)
    assert [t for c in chunks for t in c.token_ids] == engine_tokens([11, 12, 13, 14], **params)
    assert chunks[0].replica_id == moved.source_replica_id != chunks[-1].replica_id == moved.target_replica_id


def test_a_session_moves_between_a_two_stage_replica_and_a_one_piece_engine(pipelines: tuple[Service, Client]) -> None:
    _, client = pipelines
    client.create_session("split")
    first = client.complete([30, 31, 32], session_id="split", **GREEDY)
    elsewhere = Engine(bamba(), EngineConfig(n_ctx=256, n_seq_max=2))  # one stage, another process
    elsewhere.import_session("split", client.export_session("split"))
    history = [30, 31, 32, *first.token_ids, 33]
    there = elsewhere.generate([Request("t2", tuple(history), SamplingParams(**GREEDY), "split")])["t2"]  # type: ignore[arg-type]
    assert [e.token for e in there] == engine_tokens(history, **GREEDY)
    back = client.import_session(elsewhere.export_session("split"), session_id="rejoined")
    again = client.complete([34], session_id="rejoined", **GREEDY)
    assert back.n_tokens == len(history) + 12
    assert again.token_ids == engine_tokens([*history, *[e.token for e in there], 34], **GREEDY)
