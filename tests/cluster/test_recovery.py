"""A worker dies mid-stream (issue 15): SIGKILL of a shard actor's process (its pid from ListReplicas)
while a request streams from it. The coordinator notices, marks the replica dead, and the request goes
on on the other replica from its last recovery checkpoint, the tokens since replayed: the client's
stream has no token lost, repeated or changed — equal to an undisturbed run — on a KV, an ISWA, a
recurrent and a hybrid fixture, with 1 and 2 stages, and before the first checkpoint too."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import grpc
import pytest

from statemesh.cluster import Client
from statemesh.cluster.client import StatemeshError
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams

from .conftest import FIXTURES, leftovers, start_service

SEEDED = {"temperature": 0.8, "top_k": 40, "seed": 3, "ignore_eos": True}
SLOW = pytest.mark.slow  # ~20 s a server: the other kinds run under `make test-slow`


@cache
def fixture(name: str) -> Model:
    return load_model(FIXTURES / name, backend="numpy", progress=False)


def engine_tokens(name: str, prompt: list[int], **sampling: object) -> list[int]:
    engine = Engine(fixture(name), EngineConfig(n_ctx=1024, n_seq_max=2))
    return [e.token for e in engine.generate([Request("x", tuple(prompt), SamplingParams(**sampling))])["x"]]  # type: ignore[arg-type]


def kill_mid_stream(
    client: Client, prompt: list[int], sampling: dict, worker: int, after: int
) -> tuple[list[int], list[str], str]:  # type: ignore[type-arg]
    """Stream a request; after `after` tokens, SIGKILL worker `worker` (a stage) of its replica;
    return every token the stream gave, the replica of each chunk, and the killed replica."""
    stream = client.generate(prompt, **sampling)
    tokens: list[int] = []
    replicas: list[str] = []
    killed = ""
    for chunk in stream:
        tokens += chunk.token_ids
        replicas.append(chunk.replica_id)
        if not killed and len(tokens) >= after:
            killed = chunk.replica_id
            replica = next(r for r in client.replicas() if r.replica_id == killed)
            os.kill(replica.workers[worker].pid, signal.SIGKILL)
    return tokens, replicas, killed


@pytest.fixture
def service_of(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started = []

    def start(name: str, *extra: str):  # type: ignore[no-untyped-def]
        args = ["--model", str(FIXTURES / name), "--replicas", "2", "--n-ctx", "1024", "--max-seqs", "4", *extra]
        service = start_service(args, tmp_path / f"{name}.log")
        with Client(service.address) as client:
            service.worker_pids = [w.pid for r in client.replicas() for w in r.workers]
        started.append(service)
        return service

    yield start
    for service in started:
        assert service.stop() == 0, service.log.read_text()[-2000:]
        assert leftovers(service, service.worker_pids) == []


@pytest.mark.parametrize(
    ("name", "stages", "worker", "every"),
    [("llama", 1, 0, 8), pytest.param("gemma2", 1, 0, 8, marks=SLOW), pytest.param("mamba2", 1, 0, 8, marks=SLOW),
     pytest.param("bamba", 1, 0, 8, marks=SLOW), ("bamba", 2, 1, 8), ("llama", 1, 0, 10_000)],
    ids=["kv", "iswa", "recurrent", "hybrid", "hybrid-2-stages-later-stage-dies", "kv-before-any-checkpoint"],
)  # fmt: skip
def test_a_killed_worker_loses_no_token(service_of, name: str, stages: int, worker: int, every: int) -> None:  # type: ignore[no-untyped-def]
    service = service_of(name, "--stages", str(stages), "--checkpoint-every", str(every))
    prompt = [(13 * k) % 300 + 20 for k in range(40)]
    sampling = {**SEEDED, "max_tokens": 600}
    with Client(service.address) as client:
        tokens, replicas, killed = kill_mid_stream(client, prompt, sampling, worker, after=30)
        assert tokens == engine_tokens(name, prompt, **sampling)  # none lost, repeated or changed
        assert replicas[0] == killed != replicas[-1]
        states = {r.replica_id: r.state for r in client.replicas()}
        assert states[replicas[-1]] == "ready"
        if states[killed] == "ready":  # rebuilt already (test_resilience.py follows a rebuild through)
            assert all(
                w.pid in service.worker_pids for r in client.replicas() if r.replica_id != killed for w in r.workers
            )
        else:
            assert states[killed] in ("dead", "starting")
        assert client.stats().recoveries == 1
        # the survivor serves new requests as before
        assert client.complete(prompt, max_tokens=8, temperature=0.0).token_ids == engine_tokens(
            name, prompt, max_tokens=8, temperature=0.0
        )


def test_with_no_replica_left_a_request_ends_unavailable_not_hanging(service_of) -> None:  # type: ignore[no-untyped-def]
    service = service_of("llama", "--checkpoint-every", "8")
    with Client(service.address) as client:
        stream = client.generate([5, 6, 7], max_tokens=900, temperature=0.0, ignore_eos=True)
        first = next(stream)
        others = [r for r in client.replicas() if r.replica_id != first.replica_id]
        os.kill(others[0].workers[0].pid, signal.SIGKILL)  # the other one first: nowhere to go
        time.sleep(1.0)  # it is gone before the request's own replica goes
        mine = next(r for r in client.replicas() if r.replica_id == first.replica_id)
        os.kill(mine.workers[0].pid, signal.SIGKILL)
        with pytest.raises(StatemeshError) as e:
            for _ in stream:
                pass
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "no other replica" in e.value.message
