"""The Python client of API.md: `Client` (blocking) and `AsyncClient` (asyncio), the same methods.

    from statemesh.cluster import Client
    client = Client("127.0.0.1:50051")
    for chunk in client.generate("The capital of France is", max_tokens=16, temperature=0):
        print(chunk.text, end="", flush=True)

Errors raise `StatemeshError`, carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from statemesh.protos.statemesh.v1 import statemesh_pb2 as pb
from statemesh.protos.statemesh.v1 import statemesh_pb2_grpc as pb_grpc

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "logprobs", "stop", "stop_token_ids", "ignore_eos")  # fmt: skip


class StatemeshError(Exception):
    """A failed call: `code` is the gRPC status code, the message the server's."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: pb.Usage
    replica_ids: list[str]  # the replicas that produced it, in order (more than one after a migration)


def generate_request(
    prompt: str | list[int] | list[dict[str, str]] | None,
    session_id: str | None,
    request_id: str | None,
    sampling: dict[str, Any],
) -> pb.GenerateRequest:
    """A `GenerateRequest`: text, token ids, or chat messages ({"role", "content"} dicts)."""
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling fields {sorted(unknown)}; known: {list(SAMPLING_FIELDS)}")
    msg = pb.GenerateRequest(request_id=request_id or "", session_id=session_id or "")
    if isinstance(prompt, str):
        msg.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        msg.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in prompt]))  # type: ignore[arg-type]
    elif prompt:
        msg.token_ids.CopyFrom(pb.TokenIds(ids=prompt))  # type: ignore[arg-type]
    for name, value in sampling.items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(msg.sampling, name).extend(value)
        else:
            setattr(msg.sampling, name, value)
    return msg


def _credentials(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def _channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _completion(chunks: list[pb.GenerateResponse]) -> Completion:
    last = chunks[-1]
    replicas: list[str] = []
    for c in chunks:
        if c.replica_id and (not replicas or replicas[-1] != c.replica_id):
            replicas.append(c.replica_id)
    return Completion(
        "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], last.finish_reason, last.usage,
        replicas,
    )  # fmt: skip


class Client:
    def __init__(self, address: str = "127.0.0.1:50051", token: str | None = None, tls_ca: bytes | None = None):
        if tls_ca is not None:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), _channel_options())
        else:
            self.channel = grpc.insecure_channel(address, _channel_options())
        self.metadata = _credentials(token)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.sessions = pb_grpc.SessionsStub(self.channel)
        self.cluster = pb_grpc.ClusterStub(self.channel)

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise StatemeshError(e.code(), e.details() or "") from None

    def generate(
        self,
        prompt: str | list[int] | list[dict[str, str]] | None = None,
        *,
        session_id: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Iterator[pb.GenerateResponse]:
        """Stream a request's responses (a text prompt, token ids, or chat messages)."""
        stream = self.inference.Generate(
            generate_request(prompt, session_id, request_id, sampling), metadata=self.metadata, timeout=timeout
        )
        try:
            yield from stream
        except grpc.RpcError as e:
            raise StatemeshError(e.code(), e.details() or "") from None
        finally:
            stream.cancel()  # a caller that stops reading ends the request (a no-op once it finished)

    def complete(self, prompt: str | list[int] | list[dict[str, str]] | None = None, **kwargs: Any) -> Completion:
        """The whole of a request: text, token ids, finish reason, usage."""
        return _completion(list(self.generate(prompt, **kwargs)))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self._call(self.inference.Tokenize, request).token_ids)

    def detokenize(self, token_ids: list[int]) -> str:
        return str(self._call(self.inference.Detokenize, pb.DetokenizeRequest(token_ids=token_ids)).text)

    def create_session(self, session_id: str | None = None, replica_id: str | None = None) -> pb.Session:
        request = pb.CreateSessionRequest(session_id=session_id or "", replica_id=replica_id or "")
        return self._call(self.sessions.Create, request)

    def get_session(self, session_id: str) -> pb.Session:
        return self._call(self.sessions.Get, pb.GetSessionRequest(session_id=session_id))

    def list_sessions(self) -> list[pb.Session]:
        return list(self._call(self.sessions.List, pb.ListSessionsRequest()).sessions)

    def delete(self, session_id: str) -> None:
        self._call(self.sessions.Delete, pb.DeleteSessionRequest(session_id=session_id))

    def fork(self, session_id: str, new_session_id: str | None = None) -> pb.Session:
        request = pb.ForkSessionRequest(session_id=session_id)
        if new_session_id:
            request.new_session_id = new_session_id
        return self._call(self.sessions.Fork, request)

    def truncate(self, session_id: str, n_tokens: int) -> pb.Session:
        return self._call(self.sessions.Truncate, pb.TruncateSessionRequest(session_id=session_id, n_tokens=n_tokens))

    def export_session(self, session_id: str) -> bytes:
        """The session's whole state, as bytes that `import_session` takes (on any replica of the model)."""
        try:
            chunks = self.sessions.Export(pb.ExportSessionRequest(session_id=session_id), metadata=self.metadata)
            return b"".join(c.data for c in chunks)
        except grpc.RpcError as e:
            raise StatemeshError(e.code(), e.details() or "") from None

    def import_session(self, data: bytes, session_id: str | None = None) -> pb.Session:
        def chunks() -> Iterator[pb.SnapshotChunk]:
            for i, start in enumerate(range(0, max(len(data), 1), 1 << 20)):
                chunk = pb.SnapshotChunk(data=data[start : start + (1 << 20)])
                if i == 0 and session_id:
                    chunk.session_id = session_id
                yield chunk

        return self._call(self.sessions.Import, chunks())

    def migrate(
        self, session_id: str | None = None, target_replica_id: str | None = None, *, request_id: str | None = None
    ) -> pb.MigrateResponse:
        """Move a session (between its turns) or a running request (its stream goes on) elsewhere."""
        request = pb.MigrateRequest(request_id=request_id) if request_id else pb.MigrateRequest(session_id=session_id)
        if target_replica_id:
            request.target_replica_id = target_replica_id
        return self._call(self.sessions.Migrate, request)

    def replicas(self) -> list[pb.Replica]:
        return list(self._call(self.cluster.ListReplicas, pb.ListReplicasRequest()).replicas)

    def stats(self) -> pb.StatsResponse:
        return self._call(self.cluster.Stats, pb.StatsRequest())

    def drain(self, replica_id: str) -> pb.DrainResponse:
        """Stop routing to a replica and move what it holds elsewhere, without ending any stream."""
        return self._call(self.cluster.Drain, pb.DrainRequest(replica_id=replica_id))

    def undrain(self, replica_id: str) -> pb.Replica:
        return self._call(self.cluster.Undrain, pb.UndrainRequest(replica_id=replica_id))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """`Client`'s methods, as coroutines (and `generate` as an async iterator)."""

    def __init__(self, address: str = "127.0.0.1:50051", token: str | None = None, tls_ca: bytes | None = None):
        if tls_ca is not None:
            self.channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), _channel_options())
        else:
            self.channel = grpc.aio.insecure_channel(address, _channel_options())
        self.metadata = _credentials(token)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.sessions = pb_grpc.SessionsStub(self.channel)
        self.cluster = pb_grpc.ClusterStub(self.channel)

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise StatemeshError(e.code(), e.details() or "") from None

    async def generate(
        self,
        prompt: str | list[int] | list[dict[str, str]] | None = None,
        *,
        session_id: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[pb.GenerateResponse]:
        call = self.inference.Generate(
            generate_request(prompt, session_id, request_id, sampling), metadata=self.metadata, timeout=timeout
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as e:
            raise StatemeshError(e.code(), e.details() or "") from None
        finally:
            call.cancel()

    async def complete(self, prompt: str | list[int] | list[dict[str, str]] | None = None, **kwargs: Any) -> Completion:
        return _completion([c async for c in self.generate(prompt, **kwargs)])

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list((await self._call(self.inference.Tokenize, request)).token_ids)

    async def detokenize(self, token_ids: list[int]) -> str:
        return str((await self._call(self.inference.Detokenize, pb.DetokenizeRequest(token_ids=token_ids))).text)

    async def create_session(self, session_id: str | None = None, replica_id: str | None = None) -> pb.Session:
        request = pb.CreateSessionRequest(session_id=session_id or "", replica_id=replica_id or "")
        return await self._call(self.sessions.Create, request)

    async def get_session(self, session_id: str) -> pb.Session:
        return await self._call(self.sessions.Get, pb.GetSessionRequest(session_id=session_id))

    async def list_sessions(self) -> list[pb.Session]:
        return list((await self._call(self.sessions.List, pb.ListSessionsRequest())).sessions)

    async def delete(self, session_id: str) -> None:
        await self._call(self.sessions.Delete, pb.DeleteSessionRequest(session_id=session_id))

    async def fork(self, session_id: str, new_session_id: str | None = None) -> pb.Session:
        request = pb.ForkSessionRequest(session_id=session_id)
        if new_session_id:
            request.new_session_id = new_session_id
        return await self._call(self.sessions.Fork, request)

    async def truncate(self, session_id: str, n_tokens: int) -> pb.Session:
        request = pb.TruncateSessionRequest(session_id=session_id, n_tokens=n_tokens)
        return await self._call(self.sessions.Truncate, request)

    async def replicas(self) -> list[pb.Replica]:
        return list((await self._call(self.cluster.ListReplicas, pb.ListReplicasRequest())).replicas)

    async def stats(self) -> pb.StatsResponse:
        return await self._call(self.cluster.Stats, pb.StatsRequest())

    async def migrate(
        self, session_id: str | None = None, target_replica_id: str | None = None, *, request_id: str | None = None
    ) -> pb.MigrateResponse:
        request = pb.MigrateRequest(request_id=request_id) if request_id else pb.MigrateRequest(session_id=session_id)
        if target_replica_id:
            request.target_replica_id = target_replica_id
        return await self._call(self.sessions.Migrate, request)

    async def drain(self, replica_id: str) -> pb.DrainResponse:
        return await self._call(self.cluster.Drain, pb.DrainRequest(replica_id=replica_id))

    async def undrain(self, replica_id: str) -> pb.Replica:
        return await self._call(self.cluster.Undrain, pb.UndrainRequest(replica_id=replica_id))

    async def close(self) -> None:
        await self.channel.close()
