"""Who may call the service: a bearer token on every RPC but health's, and TLS for the channel.

The token comes from `--token-file` (or `STATEMESH_TOKEN`); a client sends it as the metadata
`authorization: Bearer <token>`. It is compared in constant time (`hmac.compare_digest`), so how
long a refusal takes says nothing about how much of a guess was right. Health checks need no token:
load balancers and Kubernetes probes ask without one.
"""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "STATEMESH_TOKEN"
MIN_TOKEN_CHARS = 16
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # prefixes of the methods anyone may call


class AuthConfigError(ValueError):
    """A token or TLS file that cannot be used; the message says which and why."""


def read_token(token_file: str | None) -> str | None:
    """The token from `token_file`, else from $STATEMESH_TOKEN, else None (no token asked for)."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise AuthConfigError(f"--token-file {token_file}: {e.strerror}") from None
        source = f"--token-file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise AuthConfigError(
            f"{source}: a token is at least {MIN_TOKEN_CHARS} characters without spaces "
            f"(got {len(token)}); e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return token


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and private key, PEM (`--tls-cert`, `--tls-key`)."""

    cert: bytes
    key: bytes
    cert_file: str = ""  # where they came from: Python's ssl (the HTTP front) reads files
    key_file: str = ""

    @staticmethod
    def read(cert_file: str | None, key_file: str | None) -> TlsFiles | None:
        if not cert_file and not key_file:
            return None
        if not (cert_file and key_file):
            raise AuthConfigError("TLS needs both --tls-cert and --tls-key (PEM files)")
        try:
            return TlsFiles(Path(cert_file).read_bytes(), Path(key_file).read_bytes(), cert_file, key_file)
        except OSError as e:
            raise AuthConfigError(f"{e.filename}: {e.strerror}") from None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)])

    def ssl_context(self) -> ssl.SSLContext:
        """The same certificate for an HTTP server (the OpenAI front)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def token_matches(metadata: Any, token: str) -> bool:
    """Whether the call's `authorization` metadata is `Bearer <token>` (constant-time compare)."""
    given = next((value for key, value in metadata or () if key == "authorization"), "")
    if isinstance(given, bytes):
        given = given.decode("latin-1")
    return hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {token}".encode())


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call without the token (but health checks) with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(OPEN_METHODS) or token_matches(details.invocation_metadata, self.token):
            return handler
        return _refusal(handler)


MESSAGE = "this server needs a bearer token: send the metadata `authorization: Bearer <token>` (the server's token)"


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only says UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)
        yield  # pragma: no cover - an async generator that never yields

    requests, responses = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, requests, responses)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, requests, responses)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, requests, responses)
    return grpc.stream_stream_rpc_method_handler(streaming, requests, responses)
