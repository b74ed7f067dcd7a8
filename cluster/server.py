"""The gRPC face of the coordinator (grpc.aio): thin servicers that turn protobuf into the domain's
calls (`coordinator.py`) and the domain's typed errors into status codes, in one table; standard
health checking and server reflection, so `grpcurl` needs no proto files.

Every RPC but health's fails with a status whose message says what was wrong and what is allowed;
a failed call changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from statemesh.cluster.auth import TlsFiles, TokenInterceptor
from statemesh.cluster.coordinator import Chunk, Coordinator, GenerateCall, Prompt, ReplicaView, SessionView
from statemesh.cluster.errors import AlreadyExists, Busy, CannotListen, InvalidRequest, NotFound, QueueFull, Unavailable
from statemesh.cluster.replica import Replica
from statemesh.memory.errors import InvalidInput, SnapshotError, SnapshotIncompatible
from statemesh.protos.statemesh.v1 import statemesh_pb2 as pb
from statemesh.protos.statemesh.v1 import statemesh_pb2_grpc as pb_grpc
from statemesh.worker.engine.engine import (
    CannotTruncate,
    PromptTooLong,
    RequestExists,
    SessionBusy,
    SessionExists,
    UnknownRequest,
    UnknownSession,
)
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.errors import ModelError

T = TypeVar("T")
Code = grpc.StatusCode

# The domain's errors and their status codes: the first matching row wins, so subclasses go first.
STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (PromptTooLong, Code.OUT_OF_RANGE),
    (SessionBusy, Code.FAILED_PRECONDITION),
    (CannotTruncate, Code.FAILED_PRECONDITION),
    (Busy, Code.FAILED_PRECONDITION),
    (SessionExists, Code.ALREADY_EXISTS),
    (AlreadyExists, Code.ALREADY_EXISTS),
    (UnknownSession, Code.NOT_FOUND),
    (UnknownRequest, Code.NOT_FOUND),
    (RequestExists, Code.ALREADY_EXISTS),
    (NotFound, Code.NOT_FOUND),
    (SnapshotIncompatible, Code.FAILED_PRECONDITION),
    (SnapshotError, Code.INVALID_ARGUMENT),
    (QueueFull, Code.RESOURCE_EXHAUSTED),
    (Unavailable, Code.UNAVAILABLE),
    (InvalidRequest, Code.INVALID_ARGUMENT),
    (InvalidInput, Code.INVALID_ARGUMENT),  # refused requests, sampling values, token ids
    (ModelError, Code.FAILED_PRECONDITION),  # e.g. chat messages for a model without a chat template
]
SERVICES = ("statemesh.v1.Inference", "statemesh.v1.Sessions", "statemesh.v1.Cluster")
MAX_MESSAGE_BYTES = 64 << 20
EXPORT_CHUNK_BYTES = 1 << 20
MAX_IMPORT_BYTES = 4 << 30


def status_of(error: BaseException) -> grpc.StatusCode | None:
    for kind, code in STATUS:
        if isinstance(error, kind):
            return code
    return None


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    code = status_of(error)
    if code is None:
        raise error  # a bug: grpc answers UNKNOWN, and the server logs it
    if isinstance(error, QueueFull):
        context.set_trailing_metadata((("retry-after-ms", str(error.retry_after_ms)),))
    await context.abort(code, str(error))


async def _unary(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
    try:
        return await call
    except Exception as e:
        await _abort(context, e)
        raise  # unreachable: abort raises


# ---- protobuf <-> domain ----------------------------------------------------------------------------


def sampling_from(msg: pb.SamplingParams) -> SamplingParams:
    """The request's sampling values; unset fields take the engine's defaults. Out-of-range and
    non-finite values are refused (InvalidSampling) with the allowed range."""
    fields: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "logprobs", "ignore_eos"):  # fmt: skip
        if msg.HasField(name):
            value = getattr(msg, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequest(f"sampling.{name} must be a finite number, got {value}")
            fields[name] = value
    fields["stop"] = tuple(msg.stop)
    fields["stop_token_ids"] = tuple(msg.stop_token_ids)
    return SamplingParams(**fields)


def generate_call(msg: pb.GenerateRequest) -> GenerateCall:
    kind = msg.WhichOneof("prompt")
    if kind == "text":
        prompt = Prompt(text=msg.text)
    elif kind == "token_ids":
        prompt = Prompt(token_ids=tuple(msg.token_ids.ids))
    elif kind == "messages":
        prompt = Prompt(messages=tuple((m.role, m.content) for m in msg.messages.messages))
    elif msg.session_id:
        prompt = Prompt(token_ids=())  # continue the session's text
    else:
        raise InvalidRequest("give a prompt (text, token_ids or messages), or a session_id to continue")
    return GenerateCall(msg.request_id, prompt, sampling_from(msg.sampling), msg.session_id or None)


def chunk_message(chunk: Chunk) -> pb.GenerateResponse:
    out = pb.GenerateResponse(
        request_id=chunk.request_id,
        token_ids=chunk.token_ids,
        text=chunk.text,
        finish_reason=chunk.finish_reason,
        replica_id=chunk.replica_id,
    )
    for e in chunk.events:
        if e.token >= 0 and e.logprob is not None:
            top = [pb.TopLogprob(token_id=t, logprob=lp) for t, lp in e.top_logprobs]
            out.logprobs.append(pb.TokenLogprob(token_id=e.token, logprob=e.logprob, top=top))
    if chunk.usage is not None:
        u = chunk.usage
        out.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                    cached_tokens=u.cached_tokens))  # fmt: skip
    return out


def session_message(view: SessionView) -> pb.Session:
    return pb.Session(
        session_id=view.session_id, replica_id=view.replica_id, n_tokens=view.n_tokens,
        state_bytes=view.state_bytes, memory_kind=view.memory_kind, busy=view.busy,
    )  # fmt: skip


def replica_message(view: ReplicaView) -> pb.Replica:
    r = view.replica
    out = pb.Replica(replica_id=r.replica_id, model=r.model, state=r.state, running=view.running, waiting=view.waiting,
                     migrating=view.migrating)  # fmt: skip
    for w in r.workers:
        worker = pb.Worker(worker_id=w.worker_id, first_layer=w.first_layer, end_layer=w.end_layer,
                           node_id=w.node_id, pid=w.pid, device=w.device)  # fmt: skip
        worker.memory_bytes.update(w.memory_bytes)
        out.workers.append(worker)
    return out


# ---- the services -----------------------------------------------------------------------------------


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for chunk in self.c.generate(generate_call(request)):
                yield chunk_message(chunk)
        except Exception as e:
            await _abort(context, e)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await _unary(context, self.c.tokenize(request.text, add_special))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        text = await _unary(context, self.c.detokenize(list(request.token_ids)))
        return pb.DetokenizeResponse(text=text)


class SessionsServicer(pb_grpc.SessionsServicer):
    """Every session RPC of API.md; Migrate moves an idle session or a running request (its stream
    goes on)."""

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    async def Create(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        call = self.c.create_session(request.session_id or None, request.replica_id or None)
        return session_message(await _unary(context, call))

    async def Get(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return session_message(await _unary(context, self.c.get_session(request.session_id)))

    async def List(self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        views = await _unary(context, self.c.list_sessions())
        return pb.ListSessionsResponse(sessions=[session_message(v) for v in views])

    async def Delete(
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        await _unary(context, self.c.delete_session(request.session_id))
        return pb.DeleteSessionResponse()

    async def Fork(self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        call = self.c.fork_session(request.session_id, request.new_session_id or None)
        return session_message(await _unary(context, call))

    async def Truncate(self, request: pb.TruncateSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return session_message(await _unary(context, self.c.truncate_session(request.session_id, request.n_tokens)))

    async def Export(
        self, request: pb.ExportSessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SnapshotChunk]:
        try:
            data = await self.c.export_session(request.session_id)
        except Exception as e:
            await _abort(context, e)
            return
        for start in range(0, len(data), EXPORT_CHUNK_BYTES):
            yield pb.SnapshotChunk(data=data[start : start + EXPORT_CHUNK_BYTES])

    async def Import(
        self, request_iterator: AsyncIterator[pb.SnapshotChunk], context: grpc.aio.ServicerContext
    ) -> pb.Session:
        parts: list[bytes] = []
        session_id, total = None, 0
        cap = min(MAX_IMPORT_BYTES, self.c.max_import_bytes() or MAX_IMPORT_BYTES)
        async for chunk in request_iterator:
            if not parts and chunk.HasField("session_id"):
                session_id = chunk.session_id or None
            total += len(chunk.data)
            if total > cap:  # refused as it comes: a stream that never ends holds at most the cap here
                await context.abort(
                    Code.RESOURCE_EXHAUSTED,
                    f"a session state of this model is at most {cap} bytes (its replicas' memory, full); "
                    "this import is larger: is it a state Sessions/Export gave?",
                )
            parts.append(chunk.data)
        if total == 0:
            await context.abort(Code.INVALID_ARGUMENT, "the import is empty: stream the chunks Sessions/Export gave")
        return session_message(await _unary(context, self.c.import_session(b"".join(parts), session_id, None)))

    async def Migrate(self, request: pb.MigrateRequest, context: grpc.aio.ServicerContext) -> pb.MigrateResponse:
        target = request.target_replica_id if request.HasField("target_replica_id") else None
        which = request.WhichOneof("target")
        if which == "request_id":
            moved = await _unary(context, self.c.migrate_request(request.request_id, target))
        elif which == "session_id":
            moved = await _unary(context, self.c.migrate_session(request.session_id, target))
        else:
            await context.abort(Code.INVALID_ARGUMENT, "name the session_id or the request_id to migrate")
        return pb.MigrateResponse(
            source_replica_id=moved.source_replica_id, target_replica_id=moved.target_replica_id,
            state_bytes=moved.state_bytes, pause_ms=moved.pause_ms, precopy_bytes=moved.precopy_bytes,
            precopy_rounds=moved.precopy_rounds, pause_bytes=moved.pause_bytes,
        )  # fmt: skip


class ClusterServicer(pb_grpc.ClusterServicer):
    """ListReplicas, Drain, Undrain and Stats."""

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    async def ListReplicas(
        self, request: pb.ListReplicasRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReplicasResponse:
        views = await _unary(context, self.c.list_replicas())
        return pb.ListReplicasResponse(replicas=[replica_message(v) for v in views])

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        moved_requests, moved_sessions = await _unary(context, self.c.drain(request.replica_id))
        return pb.DrainResponse(moved_requests=moved_requests, moved_sessions=moved_sessions)

    async def Undrain(self, request: pb.UndrainRequest, context: grpc.aio.ServicerContext) -> pb.Replica:
        replica = await _unary(context, self._undrain(request.replica_id))
        return replica_message(next(v for v in await self.c.list_replicas() if v.replica is replica))

    async def _undrain(self, replica_id: str) -> Replica:
        return self.c.undrain(replica_id)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        return pb.StatsResponse(**await _unary(context, self.c.stats()))


class Server:
    """The grpc.aio server with the three services, health and reflection."""

    def __init__(
        self, coordinator: Coordinator, host: str, port: int, token: str | None = None, tls: TlsFiles | None = None
    ):
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]  # fmt: skip
        interceptors = [TokenInterceptor(token)] if token else []
        self.grpc = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(coordinator), self.grpc)
        pb_grpc.add_SessionsServicer_to_server(SessionsServicer(coordinator), self.grpc)
        pb_grpc.add_ClusterServicer_to_server(ClusterServicer(coordinator), self.grpc)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        self.host = host
        address = f"{host}:{port}"
        self.port = (
            self.grpc.add_secure_port(address, tls.credentials()) if tls else self.grpc.add_insecure_port(address)
        )
        if self.port == 0:
            raise CannotListen(f"--port: cannot listen on {host}:{port} (in use, or not an address of this machine)")

    async def start(self) -> None:
        await self.grpc.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.grpc.stop(grace)
