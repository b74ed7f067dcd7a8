"""The gRPC contract (protos/statemesh/v1/statemesh.proto, API.md): the committed generated code is
what the .proto gives today, every RPC and field that API.md names exists with its shape, and every
service, RPC, message, oneof and field carries a comment."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor
from grpc_tools import protoc

from statemesh.protos.statemesh.v1 import statemesh_pb2, statemesh_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
PROTO = Path("statemesh/v1/statemesh.proto")  # relative to PROTO_ROOT, as protoc names it
GENERATED = ["statemesh_pb2.py", "statemesh_pb2.pyi", "statemesh_pb2_grpc.py"]

# API.md's services: (service, rpc, request, response, client streams, server streams).
RPCS = [
    ("Inference", "Generate", "GenerateRequest", "GenerateResponse", False, True),
    ("Inference", "Tokenize", "TokenizeRequest", "TokenizeResponse", False, False),
    ("Inference", "Detokenize", "DetokenizeRequest", "DetokenizeResponse", False, False),
    ("Sessions", "Create", "CreateSessionRequest", "Session", False, False),
    ("Sessions", "Get", "GetSessionRequest", "Session", False, False),
    ("Sessions", "List", "ListSessionsRequest", "ListSessionsResponse", False, False),
    ("Sessions", "Fork", "ForkSessionRequest", "Session", False, False),
    ("Sessions", "Truncate", "TruncateSessionRequest", "Session", False, False),
    ("Sessions", "Delete", "DeleteSessionRequest", "DeleteSessionResponse", False, False),
    ("Sessions", "Export", "ExportSessionRequest", "SnapshotChunk", False, True),
    ("Sessions", "Import", "SnapshotChunk", "Session", True, False),
    ("Sessions", "Migrate", "MigrateRequest", "MigrateResponse", False, False),
    ("Cluster", "ListReplicas", "ListReplicasRequest", "ListReplicasResponse", False, False),
    ("Cluster", "Drain", "DrainRequest", "DrainResponse", False, False),
    ("Cluster", "Undrain", "UndrainRequest", "Replica", False, False),
    ("Cluster", "Stats", "StatsRequest", "StatsResponse", False, False),
]

# API.md's messages and the fields it names, space-separated (a message may have more).
FIELDS = {
    "GenerateRequest": "request_id text token_ids messages sampling session_id",
    "TokenIds": "ids",
    "ChatMessages": "messages",
    "ChatMessage": "role content",
    "SamplingParams": "max_tokens temperature top_k top_p min_p repetition_penalty presence_penalty frequency_penalty "
    "seed logprobs stop stop_token_ids ignore_eos",
    "GenerateResponse": "request_id token_ids text logprobs finish_reason usage replica_id",
    "TokenLogprob": "token_id logprob top",
    "TopLogprob": "token_id logprob",
    "Usage": "prompt_tokens completion_tokens cached_tokens",
    "TokenizeRequest": "text add_special_tokens",
    "TokenizeResponse": "token_ids",
    "DetokenizeRequest": "token_ids",
    "DetokenizeResponse": "text",
    "Session": "session_id replica_id n_tokens state_bytes memory_kind busy",
    "CreateSessionRequest": "session_id replica_id",
    "GetSessionRequest": "session_id",
    "ListSessionsRequest": "",
    "ListSessionsResponse": "sessions",
    "ForkSessionRequest": "session_id new_session_id",
    "TruncateSessionRequest": "session_id n_tokens",
    "DeleteSessionRequest": "session_id",
    "DeleteSessionResponse": "",
    "ExportSessionRequest": "session_id",
    "SnapshotChunk": "data session_id",
    "MigrateRequest": "session_id request_id target_replica_id",
    "MigrateResponse": "source_replica_id target_replica_id state_bytes pause_ms",
    "ListReplicasRequest": "",
    "ListReplicasResponse": "replicas",
    "DrainRequest": "replica_id",
    "DrainResponse": "moved_requests moved_sessions",
    "UndrainRequest": "replica_id",
    "Replica": "replica_id model state running waiting workers",
    "Worker": "worker_id first_layer end_layer node_id pid device memory_bytes",
    "StatsRequest": "",
    "StatsResponse": "requests_running requests_waiting requests_finished prompt_tokens generation_tokens "
    "prefix_cache_queries prefix_cache_hits preemptions migrations recoveries",
}

# Unset must differ from zero for the scalars (proto3 `optional`): "unset takes the engine's default".
OPTIONAL_SAMPLING = [f for f in FIELDS["SamplingParams"].split() if f not in ("stop", "stop_token_ids")]


def test_generated_code_is_current(tmp_path: Path) -> None:
    """Regenerating gives the committed files, byte for byte (the import fix-up included)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"tools/gen_protos.py failed:\n{result.stdout}\n{result.stderr}"
    stale = []
    for name in GENERATED:
        committed, fresh = PROTO_ROOT / PROTO.parent / name, tmp_path / PROTO.parent / name
        assert fresh.is_file(), f"tools/gen_protos.py did not write {PROTO.parent / name}"
        if not committed.is_file() or committed.read_bytes() != fresh.read_bytes():
            stale.append(str(Path("protos") / PROTO.parent / name))
    assert not stale, f"generated code is stale or missing: {', '.join(stale)}; run make protos"


def test_generated_code_imports_through_the_package() -> None:
    grpc_code = (PROTO_ROOT / PROTO.parent / "statemesh_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from statemesh.protos.statemesh.v1 import statemesh_pb2" in grpc_code
    assert "from statemesh.v1 import" not in grpc_code
    assert statemesh_pb2.GenerateRequest.__module__ == "statemesh.protos.statemesh.v1.statemesh_pb2"
    # The descriptor keeps its proto name: reflection and grpcurl see `statemesh.v1.*`.
    assert statemesh_pb2.DESCRIPTOR.name == PROTO.as_posix()
    assert statemesh_pb2.DESCRIPTOR.package == "statemesh.v1"


def test_proto_ships_with_the_package() -> None:
    proto = resources.files("statemesh.protos.statemesh.v1") / "statemesh.proto"
    assert proto.is_file()
    assert "package statemesh.v1;" in proto.read_text(encoding="utf-8")


@pytest.mark.parametrize(("service", "rpc", "request_type", "response_type", "client_streams", "server_streams"), RPCS)
def test_rpc_exists(
    service: str, rpc: str, request_type: str, response_type: str, client_streams: bool, server_streams: bool
) -> None:
    services = statemesh_pb2.DESCRIPTOR.services_by_name
    assert service in services, f"service statemesh.v1.{service} missing; have {sorted(services)}"
    methods = services[service].methods_by_name
    assert rpc in methods, f"RPC {service}.{rpc} missing; have {sorted(methods)}"
    method = methods[rpc]
    assert method.input_type.full_name == f"statemesh.v1.{request_type}"
    assert method.output_type.full_name == f"statemesh.v1.{response_type}"
    proto = descriptor_pb2.MethodDescriptorProto()
    method.CopyToProto(proto)
    assert (proto.client_streaming, proto.server_streaming) == (client_streams, server_streams)
    # the generated stub and servicer have it too
    assert hasattr(getattr(statemesh_pb2_grpc, f"{service}Servicer"), rpc)
    assert hasattr(statemesh_pb2_grpc, f"add_{service}Servicer_to_server")


def test_every_rpc_is_listed() -> None:
    """A new RPC is welcome, but it joins RPCS above (and API.md) in the same change."""
    declared = {(s.name, m.name) for s in statemesh_pb2.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert declared == {(service, rpc) for service, rpc, *_ in RPCS}


@pytest.mark.parametrize("message", sorted(FIELDS))
def test_message_has_its_fields(message: str) -> None:
    messages = statemesh_pb2.DESCRIPTOR.message_types_by_name
    assert message in messages, f"message statemesh.v1.{message} missing"
    have = messages[message].fields_by_name
    missing = [f for f in FIELDS[message].split() if f not in have]
    assert not missing, f"statemesh.v1.{message} lacks {missing}; has {sorted(have)}"


def test_shapes_api_md_spells_out() -> None:
    request = statemesh_pb2.GenerateRequest.DESCRIPTOR
    assert [f.name for f in request.oneofs_by_name["prompt"].fields] == ["text", "token_ids", "messages"]
    migrate = statemesh_pb2.MigrateRequest.DESCRIPTOR
    assert [f.name for f in migrate.oneofs_by_name["target"].fields] == ["session_id", "request_id"]
    assert migrate.fields_by_name["target_replica_id"].has_presence
    assert statemesh_pb2.SnapshotChunk.DESCRIPTOR.fields_by_name["session_id"].has_presence
    sampling = statemesh_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    assert [f for f in OPTIONAL_SAMPLING if not sampling[f].has_presence] == []
    memory_bytes = statemesh_pb2.Worker.DESCRIPTOR.fields_by_name["memory_bytes"]
    assert memory_bytes.message_type.GetOptions().map_entry
    assert memory_bytes.message_type.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
    assert memory_bytes.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_UINT64
    for name in FIELDS["StatsResponse"].split():
        field = statemesh_pb2.StatsResponse.DESCRIPTOR.fields_by_name[name]
        assert field.type == FieldDescriptor.TYPE_UINT64, f"StatsResponse.{name} is not a uint64 counter"


def _source_info(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """The .proto compiled by protoc with its comments (SourceCodeInfo)."""
    out = tmp_path / "statemesh.pb"
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", "--include_source_info", f"--descriptor_set_out={out}"]
    assert protoc.main([*args, str(PROTO)]) == 0, "protoc could not compile the .proto"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return next(f for f in files if f.name == PROTO.as_posix())


# SourceCodeInfo paths: field numbers of FileDescriptorProto, DescriptorProto, ServiceDescriptorProto...
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM, _MSG_ONEOF = 2, 3, 4, 8
_SERVICE_METHOD, _ENUM_VALUE = 2, 2


Element = tuple[tuple[int, ...], str]  # (SourceCodeInfo path, what it is)


def _enum_elements(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], name: str) -> Iterator[Element]:
    yield path, f"enum {name}"
    for i, value in enumerate(enum.value):
        yield (*path, _ENUM_VALUE, i), f"enum value {name}.{value.name}"


def _message_elements(message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], name: str) -> Iterator[Element]:
    """(path, what) of a message and everything declared in it; map entries are protoc's own."""
    if message.options.map_entry:
        return
    yield path, f"message {name}"
    for i, field in enumerate(message.field):
        yield (*path, _MSG_FIELD, i), f"field {name}.{field.name}"
    synthetic = {f.oneof_index for f in message.field if f.proto3_optional}  # protoc's, one per `optional` field
    for i, oneof in enumerate(message.oneof_decl):
        if i not in synthetic:
            yield (*path, _MSG_ONEOF, i), f"oneof {name}.{oneof.name}"
    for i, nested in enumerate(message.nested_type):
        yield from _message_elements(nested, (*path, _MSG_NESTED, i), f"{name}.{nested.name}")
    for i, enum in enumerate(message.enum_type):
        yield from _enum_elements(enum, (*path, _MSG_ENUM, i), f"{name}.{enum.name}")


def _elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[Element]:
    for i, message in enumerate(file.message_type):
        yield from _message_elements(message, (_FILE_MESSAGE, i), message.name)
    for i, enum in enumerate(file.enum_type):
        yield from _enum_elements(enum, (_FILE_ENUM, i), enum.name)
    for i, service in enumerate(file.service):
        yield (_FILE_SERVICE, i), f"service {service.name}"
        for j, method in enumerate(service.method):
            yield (_FILE_SERVICE, i, _SERVICE_METHOD, j), f"rpc {service.name}.{method.name}"


def test_everything_is_commented(tmp_path: Path) -> None:
    file = _source_info(tmp_path)
    comments = {
        tuple(loc.path): (loc.leading_comments + loc.trailing_comments).strip()
        for loc in file.source_code_info.location
    }
    elements = list(_elements(file))
    assert len(elements) > 100, "the walk over the descriptor found too little to be checking anything"
    bare = [what for path, what in elements if not comments.get(path)]
    assert not bare, f"{len(bare)} declarations of {PROTO} have no comment: {bare}"
