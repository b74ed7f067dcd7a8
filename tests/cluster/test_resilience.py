"""What outlives a worker, and the server (issue 15): a dead replica is rebuilt (ListReplicas shows
it dead or starting, then ready) and the idle sessions it held come back on a survivor from their
saved state; sessions saved under --snapshot-dir come back when a server starts again on the
directory; a worker killed in the middle of a migration or of a drain loses no token of any stream.
Each asserts the exact tokens of an undisturbed run (the in-process engine)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import pytest

from statemesh.cluster import Client
from statemesh.cluster.client import StatemeshError
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams

from .conftest import FIXTURES, Service, leftovers, start_service

GREEDY = {"temperature": 0.0, "ignore_eos": True}
SEEDED = {"temperature": 0.8, "top_k": 40, "seed": 11, "ignore_eos": True}
REBUILD_TIMEOUT_S = 90.0


@cache
def llama() -> Model:
    return load_model(FIXTURES / "llama", backend="numpy", progress=False)


def engine_turns(turns: list[list[int]], **sampling: Any) -> list[list[int]]:
    """Each turn's tokens in one session of the in-process engine: the undisturbed run."""
    engine = Engine(llama(), EngineConfig(n_ctx=1024, n_seq_max=2))
    engine.open_session("s")
    out = []
    for i, prompt in enumerate(turns):
        request = Request(f"t{i}", tuple((engine.session_history("s") or []) + prompt), SamplingParams(**sampling), "s")
        out.append([e.token for e in engine.generate([request])[f"t{i}"]])
    return out


def engine_tokens(prompt: list[int], **sampling: Any) -> list[int]:
    return engine_turns([prompt], **sampling)[0]


def turn(client: Client, session_id: str, prompt: list[int], **sampling: Any) -> list[int]:
    return [t for chunk in client.generate(prompt, session_id=session_id, **sampling) for t in chunk.token_ids]


def wait_for_state(client: Client, replica_id: str, wanted: str) -> list[str]:
    """Poll ListReplicas until `replica_id` is `wanted`; returns the states seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + REBUILD_TIMEOUT_S
    while time.monotonic() < deadline:
        state = next(r.state for r in client.replicas() if r.replica_id == replica_id)
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == wanted:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"replica {replica_id} never became {wanted}; states seen: {seen}")


def pids(client: Client) -> list[int]:
    return [w.pid for r in client.replicas() for w in r.workers]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Starts llama-fixture servers with two replicas; stops each at the end, checking it leaves
    nothing behind (rebuilt workers included)."""
    started: list[Service] = []

    def start(*extra: str) -> Service:
        args = ["--model", str(FIXTURES / "llama"), "--replicas", "2", "--n-ctx", "1024", "--max-seqs", "4", *extra]
        service = start_service(args, tmp_path / f"server{len(started)}.log")
        started.append(service)
        return service

    yield start
    for service in started:
        seen = []
        if service.process.poll() is None:
            with Client(service.address) as client:
                seen = pids(client)
        assert service.stop() == 0, service.log.read_text()[-2000:]
        assert leftovers(service, service.worker_pids + seen) == []


def test_a_dead_replica_is_rebuilt_and_its_idle_sessions_come_back(servers) -> None:  # type: ignore[no-untyped-def]
    service = servers("--checkpoint-every", "4")
    turns = [[20 + k for k in range(12)], [90, 91, 92, 93], [7, 8, 9]]
    expected = engine_turns(turns, max_tokens=10, **GREEDY)
    with Client(service.address) as client:
        service.worker_pids = pids(client)
        client.create_session("kept", replica_id="r0")
        assert turn(client, "kept", turns[0], max_tokens=10, **GREEDY) == expected[0]
        client.create_session("fresh", replica_id="r0")  # never used: it comes back empty
        dead_pid = next(r for r in client.replicas() if r.replica_id == "r0").workers[0].pid
        os.kill(dead_pid, signal.SIGKILL)  # nothing runs: the coordinator's watch notices

        seen = wait_for_state(client, "r0", "ready")
        assert seen[0] in ("ready", "dead", "starting") and ("dead" in seen or "starting" in seen), seen
        rebuilt = next(r for r in client.replicas() if r.replica_id == "r0")
        assert dead_pid not in [w.pid for w in rebuilt.workers]

        # the sessions came back on the survivor, as of their last turn
        assert client.get_session("kept").replica_id == "r1"
        assert client.get_session("kept").n_tokens == len(turns[0]) + 10
        assert turn(client, "kept", turns[1], max_tokens=10, **GREEDY) == expected[1]
        assert client.get_session("fresh").n_tokens == 0
        assert turn(client, "fresh", turns[0], max_tokens=10, **GREEDY) == expected[0]

        # the rebuilt replica serves: a session placed on it, then moved back to it
        client.create_session("new", replica_id="r0")
        assert turn(client, "new", turns[0], max_tokens=10, **GREEDY) == expected[0]
        client.migrate("kept", "r0")
        assert turn(client, "kept", turns[2], max_tokens=10, **GREEDY) == expected[2]


def test_a_session_turn_killed_before_its_first_checkpoint_goes_on_from_the_saved_session(servers) -> None:  # type: ignore[no-untyped-def]
    """Checkpoints every 10,000 tokens: the second turn has none when its worker dies, so it goes on
    from the session as its first turn left it, the turn run again with its tokens replayed."""
    service = servers("--checkpoint-every", "10000")
    turns = [[30 + k for k in range(10)], [5, 6, 7]]
    expected = engine_turns(turns, max_tokens=300, **SEEDED)
    with Client(service.address) as client:
        service.worker_pids = pids(client)
        client.create_session("s", replica_id="r0")
        assert turn(client, "s", turns[0], max_tokens=300, **SEEDED) == expected[0]
        tokens: list[int] = []
        for chunk in client.generate(turns[1], session_id="s", max_tokens=300, **SEEDED):
            if not tokens:
                os.kill(next(r for r in client.replicas() if r.replica_id == "r0").workers[0].pid, signal.SIGKILL)
            tokens += chunk.token_ids
        assert tokens == expected[1]
        assert client.get_session("s").replica_id == "r1"


def test_sessions_survive_a_restart_of_the_server_with_snapshot_dir(servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    snapshots = tmp_path / "sessions"
    turns = [[40 + k for k in range(9)], [3, 4, 5, 6], [11, 12]]
    expected = engine_turns(turns, max_tokens=12, **SEEDED)
    first = servers("--snapshot-dir", str(snapshots), "--checkpoint-every", "5")
    with Client(first.address) as client:
        first.worker_pids = pids(client)
        client.create_session("chat")
        assert turn(client, "chat", turns[0], max_tokens=12, **SEEDED) == expected[0]
        assert turn(client, "chat", turns[1], max_tokens=12, **SEEDED) == expected[1]
        client.fork("chat", "branch")
        client.create_session("gone")
        client.delete("gone")
    assert first.stop() == 0
    assert sorted(p.suffix for p in snapshots.iterdir()) == [".chain", ".chain"]  # chat and branch

    second = servers("--snapshot-dir", str(snapshots))
    with Client(second.address) as client:
        second.worker_pids = pids(client)
        assert sorted(s.session_id for s in client.list_sessions()) == ["branch", "chat"]
        n = len(turns[0]) + len(turns[1]) + 24
        assert client.get_session("chat").n_tokens == n and client.get_session("branch").n_tokens == n
        assert turn(client, "chat", turns[2], max_tokens=12, **SEEDED) == expected[2]
        assert turn(client, "branch", turns[2], max_tokens=12, **SEEDED) == expected[2]


def test_a_worker_killed_during_a_migration_loses_no_token(servers) -> None:  # type: ignore[no-untyped-def]
    """The source's worker dies while its request is being moved, then the target's while the
    next one is: whichever way each move ends (done, or refused), every stream is exact."""
    service = servers("--checkpoint-every", "8")
    prompt = [(7 * k) % 250 + 20 for k in range(30)]
    sampling = {**SEEDED, "max_tokens": 400}
    expected = engine_tokens(prompt, **sampling)
    with Client(service.address) as client:
        service.worker_pids = pids(client)
        for victim in ("source", "target"):
            wait_for_state(client, "r0", "ready")
            wait_for_state(client, "r1", "ready")
            tokens: list[int] = []
            outcome: list[Any] = []
            request_id = f"moved-{victim}"
            mover = None
            for chunk in client.generate(prompt, request_id=request_id, **sampling):
                if mover is None and len(tokens) >= 20:
                    source = chunk.replica_id
                    target = "r1" if source == "r0" else "r0"
                    mover = threading.Thread(target=_migrate, args=(service, request_id, target, outcome))
                    mover.start()
                    dying = source if victim == "source" else target
                    time.sleep(0.02)  # the move under way
                    os.kill(next(r for r in client.replicas() if r.replica_id == dying).workers[0].pid, signal.SIGKILL)
                tokens += chunk.token_ids
            assert mover is not None
            mover.join(60)
            assert not mover.is_alive(), "Migrate hung after a worker died"
            assert tokens == expected, victim
            assert outcome[0] == "moved" or outcome[0][0] in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
            ), outcome  # fmt: skip  (refused: "it goes on on" the source; or its worker died)


def _migrate(service: Service, request_id: str, target: str, outcome: list[Any]) -> None:
    with Client(service.address) as client:
        try:
            client.migrate(request_id=request_id, target_replica_id=target)
            outcome.append("moved")
        except StatemeshError as e:
            outcome.append((e.code, e.message))


def test_a_worker_killed_during_a_drain_loses_no_token(servers) -> None:  # type: ignore[no-untyped-def]
    service = servers("--checkpoint-every", "8")
    prompts = [[(k * (i + 3)) % 200 + 20 for k in range(16 + i)] for i in range(3)]
    sampling = {**SEEDED, "max_tokens": 300}
    expected = [engine_tokens(p, **sampling) for p in prompts]
    with Client(service.address) as client:
        service.worker_pids = pids(client)
        client.create_session("idle", replica_id="r0")
        results: list[list[int]] = [[] for _ in prompts]
        first_chunk = [threading.Event() for _ in prompts]

        def stream(i: int) -> None:
            with Client(service.address) as own:
                for chunk in own.generate(prompts[i], session_id=None, **sampling):
                    results[i] += chunk.token_ids
                    first_chunk[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for e in first_chunk:
            assert e.wait(60)
        drained: list[Any] = []
        drainer = threading.Thread(target=lambda: drained.append(_drain(service, "r0")))
        drainer.start()
        time.sleep(0.05)
        os.kill(next(r for r in client.replicas() if r.replica_id == "r0").workers[0].pid, signal.SIGKILL)
        for t in threads:
            t.join(120)
        drainer.join(60)
        assert not drainer.is_alive(), "Drain hung after the drained replica's worker died"
        assert isinstance(drained[0], int) or drained[0][0] in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
        ), drained  # fmt: skip
        assert results == expected
        assert client.get_session("idle").replica_id == "r1"  # moved by the drain, or restored after the death


def _drain(service: Service, replica_id: str) -> Any:
    with Client(service.address) as client:
        try:
            return client.drain(replica_id).moved_requests
        except StatemeshError as e:
            return (e.code, e.message)
