"""Bad input through the service (issue 15): each case gets the status code of API.md and a message
that says what to fix, and changes nothing — the server still answers, and a witness session that
lives through every case continues with the very tokens it would have produced. `Import` is fuzzed
with raw bytes and structured mutations of a valid export."""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import grpc
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statemesh.cluster import Client
from statemesh.cluster.client import StatemeshError
from statemesh.protos.statemesh.v1 import statemesh_pb2 as pb
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.engine.sequence_state import HEAD, SequenceState

from .conftest import FIXTURES, Service, leftovers, start_service

Code = grpc.StatusCode
GREEDY = {"max_tokens": 6, "temperature": 0.0}
WITNESS_TURN = [31, 32, 33, 34]


@cache
def llama() -> Model:
    return load_model(FIXTURES / "llama", backend="numpy", progress=False)


def engine_tokens(prompt: list[int], **sampling: object) -> list[int]:
    engine = Engine(llama(), EngineConfig(n_ctx=512, n_seq_max=4))
    return [e.token for e in engine.generate([Request("x", tuple(prompt), SamplingParams(**sampling))])["x"]]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    args = ["--model", str(FIXTURES / "llama"), "--replicas", "2", "--n-ctx", "512", "--max-seqs", "6"]
    service = start_service(args, tmp_path_factory.mktemp("bad_input") / "server.log")
    pids = [w.pid for r in Client(service.address).replicas() for w in r.workers]
    yield service
    assert service.stop() == 0
    assert leftovers(service, pids) == []


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[Client]:
    with Client(service.address) as client:
        yield client


@pytest.fixture(scope="module")
def witness(client: Client) -> list[int]:
    """A session with one turn behind it; its history, for the check after each case."""
    client.create_session("witness")
    first = client.complete([21, 22, 23], session_id="witness", **GREEDY)
    return [21, 22, 23, *first.token_ids]


@pytest.fixture
def unchanged(client: Client, witness: list[int]) -> Iterator[None]:
    """After the case: the server answers, nothing runs, the sessions are those there were, and
    the witness's next turn is what it would have been (then undone, for the next case)."""
    sessions = sorted(s.session_id for s in client.list_sessions())
    yield
    assert sorted(s.session_id for s in client.list_sessions()) == sessions
    deadline = time.monotonic() + 10
    while any(r.running + r.waiting + r.migrating for r in client.replicas()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(r.running + r.waiting + r.migrating == 0 for r in client.replicas())
    client.fork("witness", "witness-probe")
    got = client.complete(WITNESS_TURN, session_id="witness-probe", **GREEDY).token_ids
    client.delete("witness-probe")
    assert got == engine_tokens([*witness, *WITNESS_TURN], **GREEDY)


def refused(call: object, code: grpc.StatusCode, *says: str) -> StatemeshError:
    with pytest.raises(StatemeshError) as e:
        call()  # type: ignore[operator]
    assert e.value.code == code, e.value
    for words in says:
        assert words in e.value.message, e.value
    return e.value


# ---- unknown names ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("unchanged")
def test_unknown_sessions_requests_and_replicas_are_not_found(client: Client) -> None:
    for call in (
        lambda: client.get_session("ghost"),
        lambda: client.delete("ghost"),
        lambda: client.fork("ghost", "ghost-2"),
        lambda: client.truncate("ghost", 1),
        lambda: client.export_session("ghost"),
        lambda: client.migrate("ghost"),
        lambda: client.complete([5, 6], session_id="ghost", **GREEDY),
    ):
        refused(call, Code.NOT_FOUND, "ghost")
    refused(lambda: client.migrate(request_id="no-such-request"), Code.NOT_FOUND, "no-such-request")
    for call in (
        lambda: client.drain("r9"),
        lambda: client.undrain("r9"),
        lambda: client.create_session("placed", replica_id="r9"),
        lambda: client.migrate("witness", "r9"),
    ):
        refused(call, Code.NOT_FOUND, "r9")


@pytest.mark.usefixtures("unchanged")
def test_malformed_ids_are_invalid(client: Client) -> None:
    for bad in ("has space", "x" * 200, "semi;colon"):
        refused(lambda bad=bad: client.create_session(bad), Code.INVALID_ARGUMENT, "characters")
        refused(lambda bad=bad: client.complete([5, 6], request_id=bad, **GREEDY), Code.INVALID_ARGUMENT, "characters")


# ---- sampling and prompts --------------------------------------------------------------------------

BAD_SAMPLING = [
    ("temperature", -0.5),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("min_p", -0.1),
    ("min_p", 2.0),
    ("min_p", -math.inf),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", math.nan),
    ("presence_penalty", math.inf),
    ("frequency_penalty", -math.inf),
    ("frequency_penalty", math.nan),
    ("logprobs", 10_000),
    ("max_tokens", 0),
    ("stop_token_ids", [384]),
]  # fmt: skip  (top_k, logprobs, max_tokens and seed are unsigned in the proto: no negative reaches us)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("name", "value"), BAD_SAMPLING, ids=[f"{n}={str(v)[:12]}" for n, v in BAD_SAMPLING])
def test_every_sampling_field_out_of_range_is_invalid_and_named(client: Client, name: str, value: object) -> None:
    refused(lambda: client.complete([5, 6], **{**GREEDY, name: value}), Code.INVALID_ARGUMENT, name)


@pytest.mark.usefixtures("unchanged")
def test_prompts_that_cannot_run_say_why(client: Client) -> None:
    refused(lambda: client.complete([5, 384], **GREEDY), Code.INVALID_ARGUMENT, "outside the vocabulary 0 .. 383")
    refused(lambda: client.complete([], **GREEDY), Code.INVALID_ARGUMENT, "prompt")
    refused(lambda: client.complete([k % 300 + 1 for k in range(600)], **GREEDY), Code.OUT_OF_RANGE, "context")
    refused(lambda: client.complete([5, 6], max_tokens=2**31 - 1), Code.OUT_OF_RANGE, "context")


@pytest.mark.usefixtures("unchanged")
def test_a_message_over_the_size_limit_is_resource_exhausted(client: Client) -> None:
    refused(lambda: client.complete("x" * (80 << 20), **GREEDY), Code.RESOURCE_EXHAUSTED)


# ---- busy sessions, moves that make no sense --------------------------------------------------------


@pytest.mark.usefixtures("unchanged")
def test_a_busy_session_refuses_what_would_change_it_under_its_request(client: Client) -> None:
    client.create_session("busy")
    stream = client.generate([40, 41], session_id="busy", max_tokens=400, temperature=0.0, ignore_eos=True)
    first = next(stream)
    refused(lambda: client.complete([5], session_id="busy", **GREEDY), Code.FAILED_PRECONDITION, "busy")
    refused(lambda: client.truncate("busy", 1), Code.FAILED_PRECONDITION, "busy")
    refused(lambda: client.export_session("busy"), Code.FAILED_PRECONDITION, "busy")
    refused(lambda: client.migrate(request_id=first.request_id, target_replica_id=first.replica_id),
            Code.FAILED_PRECONDITION, first.replica_id)  # fmt: skip
    stream.close()  # the client goes away: the request is cancelled
    deadline = time.monotonic() + 10
    while client.get_session("busy").busy and time.monotonic() < deadline:
        time.sleep(0.05)
    client.delete("busy")


@pytest.mark.usefixtures("unchanged")
def test_migrating_a_session_to_where_it_is_is_refused(client: Client) -> None:
    here = client.get_session("witness").replica_id
    refused(lambda: client.migrate("witness", here), Code.FAILED_PRECONDITION, here)


# ---- callers that leave --------------------------------------------------------------------------


@pytest.mark.usefixtures("unchanged")
def test_a_deadline_that_passes_mid_stream_frees_the_request(client: Client) -> None:
    stream = client.generate([50, 51, 52], max_tokens=505, temperature=0.0, ignore_eos=True, timeout=0.15)
    with pytest.raises(StatemeshError) as e:
        for _ in stream:
            pass
    assert e.value.code == Code.DEADLINE_EXCEEDED  # the `unchanged` check then finds nothing running


# ---- imports ---------------------------------------------------------------------------------------


@cache
def valid_export(address: str) -> bytes:
    with Client(address) as client:
        client.create_session("exported")
        client.complete([61, 62, 63, 64], session_id="exported", **GREEDY)
        data = client.export_session("exported")
        client.delete("exported")
    return data


def with_checksum(body: bytes) -> bytes:
    """A state whose checksum is right again after a change (a forger can compute it)."""
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


@pytest.mark.usefixtures("unchanged")
def test_damaged_forged_oversized_and_foreign_imports_are_refused(client: Client, service: Service) -> None:
    data = valid_export(service.address)
    state = SequenceState.decode(data, max_bytes=1 << 30)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x04
    forged_history = SequenceState((*state.history, 7), state.fed + 1, state.snapshot).encode()
    snapshot_flip = bytearray(state.snapshot)
    snapshot_flip[200] ^= 0x01  # inside the memory snapshot, under its own checksum
    forged_snapshot = SequenceState(state.history, state.fed, bytes(snapshot_flip)).encode()
    huge_header = with_checksum(HEAD.pack(b"SMSTATE\n", 1, 0, 0xFFFFFFFF, 1 << 40))  # declares a terabyte
    foreign_model = load_model(FIXTURES / "gemma2", backend="numpy", progress=False)
    foreign_engine = Engine(foreign_model, EngineConfig(n_ctx=128, n_seq_max=2))
    foreign_engine.open_session("f")
    foreign_engine.generate([Request("t", (21, 22, 23), SamplingParams(**GREEDY), "f")])  # type: ignore[arg-type]
    cases = [
        (bytes(flipped), Code.INVALID_ARGUMENT, "checksum"),
        (data[:-9], Code.INVALID_ARGUMENT, "declares"),
        (data[:10], Code.INVALID_ARGUMENT, "shorter"),
        (b"\x00" * 64, Code.INVALID_ARGUMENT, "magic"),
        (b"PK\x03\x04 a zip, say", Code.INVALID_ARGUMENT, "magic"),
        (forged_history, Code.INVALID_ARGUMENT, "header says"),
        (forged_snapshot, Code.INVALID_ARGUMENT, "checksum"),
        (huge_header, Code.INVALID_ARGUMENT, "malformed"),
        (foreign_engine.export_session("f"), Code.FAILED_PRECONDITION, "another model"),
    ]
    for i, (bad, code, says) in enumerate(cases):
        refused(lambda bad=bad, i=i: client.import_session(bad, f"bad-{i}"), code, says)
    refused(lambda: client.import_session(b"", "empty"), Code.INVALID_ARGUMENT, "empty")


@pytest.mark.usefixtures("unchanged")
def test_an_import_stream_that_never_ends_is_cut_at_the_largest_state_the_model_has(client: Client) -> None:
    """The server stops reading at the cap (the replicas' memory, full), not at the stream's end."""

    def endless() -> Iterator[pb.SnapshotChunk]:
        yield pb.SnapshotChunk(data=b"SMSTATE\n" + bytes((1 << 20) - 8), session_id="endless")
        while True:
            yield pb.SnapshotChunk(data=bytes(1 << 20))

    with pytest.raises(grpc.RpcError) as e:
        client.sessions.Import(endless(), timeout=60)
    assert e.value.code() == Code.RESOURCE_EXHAUSTED and "at most" in (e.value.details() or "")


MUTATIONS = st.one_of(
    st.binary(max_size=512).map(lambda raw: ("raw", raw)),
    st.tuples(st.integers(0, 10_000), st.integers(0, 7)).map(lambda flip: ("flip", flip)),
    st.integers(0, 10_000).map(lambda n: ("truncate", n)),
    st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=16)).map(lambda put: ("splice", put)),
    st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=16)).map(lambda put: ("forge", put)),
)


def mutate(data: bytes, mutation: tuple[str, object]) -> bytes:
    kind, arg = mutation
    if kind == "raw":
        return arg  # type: ignore[return-value]
    if kind == "flip":
        at, bit = arg  # type: ignore[misc]
        out = bytearray(data)
        out[at % len(out)] ^= 1 << bit
        return bytes(out)
    if kind == "truncate":
        return data[: arg % len(data)]  # type: ignore[operator]
    at, put = arg  # type: ignore[misc]
    at %= len(data) - 8
    body = data[:at] + put + data[at + len(put) : -8]
    return body + data[-8:] if kind == "splice" else with_checksum(body[: len(data) - 8])


@settings(
    max_examples=2 * settings.default.max_examples,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutation=MUTATIONS)
def test_import_fuzz_refuses_cleanly_and_changes_nothing(client: Client, service: Service, mutation: tuple) -> None:  # type: ignore[type-arg]
    data = valid_export(service.address)
    bad = mutate(data, mutation)
    try:
        client.import_session(bad, "fuzzed")
    except StatemeshError as e:
        assert e.code in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION), e
        assert e.message and "Traceback" not in e.message
    else:  # a mutation that left the state valid (e.g. a flipped bit of padding the checksum covers)
        client.delete("fuzzed")
    assert "fuzzed" not in {s.session_id for s in client.list_sessions()}


def test_after_the_fuzz_the_witness_is_unchanged(client: Client, witness: list[int]) -> None:
    client.fork("witness", "after-fuzz")
    got = client.complete(WITNESS_TURN, session_id="after-fuzz", **GREEDY).token_ids
    client.delete("after-fuzz")
    assert got == engine_tokens([*witness, *WITNESS_TURN], **GREEDY)


def test_too_many_requests_get_resource_exhausted_with_a_retry_hint(tmp_path: Path) -> None:
    """Backpressure, never an unbounded queue: past --max-in-flight a request is refused at once
    with RESOURCE_EXHAUSTED, a message that says when to retry and `retry-after-ms` metadata."""
    args = ["--model", str(FIXTURES / "llama"), "--n-ctx", "512", "--max-seqs", "2", "--max-in-flight", "1"]
    service = start_service(args, tmp_path / "server.log")
    try:
        with Client(service.address) as client:
            stream = client.generate([9, 10], max_tokens=500, temperature=0.0, ignore_eos=True)
            next(stream)  # the one request in flight
            with pytest.raises(grpc.RpcError) as e:
                list(client.inference.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6])), timeout=30))
            assert e.value.code() == Code.RESOURCE_EXHAUSTED and "retry in" in (e.value.details() or "")
            hint = dict(e.value.trailing_metadata() or ())
            assert int(hint["retry-after-ms"]) > 0
            stream.close()
            deadline = time.monotonic() + 20
            while client.replicas()[0].running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.complete([5, 6], **GREEDY).finish_reason == "length"  # room again
    finally:
        assert service.stop() == 0
    assert leftovers(service) == []
