"""The OpenAI-compatible HTTP front: `GET /v1/models`, `POST /v1/completions` and `POST
/v1/chat/completions` (streamed as server-sent events when asked), an aiohttp server in the
coordinator's asyncio loop, beside gRPC, over the same `Coordinator` (routing, sessions, counters).

Like the gRPC servicer it is thin: it turns OpenAI's JSON into a `GenerateCall`, runs it, and turns
the chunks into OpenAI's shapes. Errors come from the same table (`server.STATUS`): a domain error's
gRPC code picks the HTTP status, and the body is OpenAI's `{"error": {message, type, param, code}}`.
Unknown JSON fields are ignored (clients send fields of newer API versions); known fields statemesh
cannot honour (`n` > 1, `echo`, `logit_bias`, tools, ...) are refused, never silently dropped. The
fields statemesh has beyond OpenAI's (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`, `session_id`) are taken as extras, as vLLM does.

A client that goes away closes the request's chunk stream (the handler is cancelled, or its next
write fails, and `finally` closes the generator), which cancels the request on its replica and
frees its memory.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from aiohttp import web

from statemesh.cluster.auth import TlsFiles
from statemesh.cluster.coordinator import Chunk, Coordinator, GenerateCall, Prompt, Usage
from statemesh.cluster.errors import CannotListen, QueueFull
from statemesh.cluster.server import status_of
from statemesh.worker.engine.engine import TokenEvent
from statemesh.worker.engine.sampling import InvalidSampling, SamplingParams

log = logging.getLogger(__name__)
Code = grpc.StatusCode
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY_BYTES = 64 << 20  # as gRPC's message limit (server.MAX_MESSAGE_BYTES)
STOP_GRACE_S = 5.0  # how long `stop` lets running responses finish before it cancels them
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat takes the engine's
# A domain error's gRPC code (server.STATUS) -> the HTTP status OpenAI's clients expect for it.
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.OUT_OF_RANGE: 400,  # a prompt longer than the context
    Code.FAILED_PRECONDITION: 400,  # e.g. chat messages for a model without a chat template
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
SAMPLING_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
SAMPLING_INTS = ("top_k", "seed")


class ApiError(Exception):
    """An OpenAI-style error: the HTTP status and the body's fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def api_error(error: Exception) -> ApiError:
    """The OpenAI-style error for a domain error (its gRPC code in `server.STATUS` picks the status);
    anything the table does not know is a bug: 500."""
    if isinstance(error, ApiError):
        return error
    code = status_of(error)
    if code is None:
        log.error("internal error in the HTTP front", exc_info=error)
        return ApiError(500, f"internal error ({type(error).__name__}); the server log has the details")
    headers = {}
    if isinstance(error, QueueFull):  # Retry-After counts whole seconds; OpenAI's clients also read the ms
        headers = {
            "Retry-After": str(math.ceil(error.retry_after_ms / 1000)),
            "retry-after-ms": str(error.retry_after_ms),
        }
    return ApiError(HTTP_STATUS.get(code, 500), str(error), _named_field(str(error)), code.name.lower(), headers)


def _named_field(message: str) -> str | None:
    """The request field a sampling error names first ("temperature must be in [0, 100] ..."), as `param`."""
    first = message.split(" ", 1)[0]
    return first if first in (*SAMPLING_FLOATS, *SAMPLING_INTS, "max_tokens", "logprobs", "stop") else None


# ---- JSON -> the domain -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed completions or chat request."""

    chat: bool
    call: GenerateCall
    stream: bool = False
    include_usage: bool = False  # stream: a last chunk with the usage (`stream_options.include_usage`)
    logprobs: bool = False  # the response carries logprobs


def _typed(body: dict[str, Any], name: str, kind: type, what: str) -> Any:
    """body[name] if it is of `kind` (None when absent or null); a bool is not a number here."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ApiError(400, f"{name} must be {what}, got {value!r}", name)
    return float(value) if kind is float else value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ApiError(400, f"stop must be a string or a list of strings, got {value!r}", "stop")


def sampling_params(body: dict[str, Any], max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The request's sampling values; absent ones take the engine's defaults. Values outside the
    engine's ranges are refused with the range (InvalidSampling's message)."""
    fields: dict[str, Any] = {"stop": _stop(body)}
    for name in SAMPLING_FLOATS:
        fields[name] = _typed(body, name, float, "a finite number")
    for name in SAMPLING_INTS:
        fields[name] = _typed(body, name, int, "an integer")
    fields["ignore_eos"] = _typed(body, "ignore_eos", bool, "true or false")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise ApiError(400, f"stop_token_ids must be a list of token ids, got {stop_ids!r}", "stop_token_ids")
    fields["stop_token_ids"] = tuple(stop_ids)
    fields["max_tokens"], fields["logprobs"] = max_tokens, logprobs
    given = {name: value for name, value in fields.items() if value is not None}
    try:
        return SamplingParams(**given)
    except InvalidSampling as e:
        raise ApiError(400, str(e), _named_field(str(e)), "invalid_argument") from None


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Known OpenAI fields whose other values statemesh cannot honour: refused rather than ignored."""
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise ApiError(400, f"{name} must be 1 (one choice per request), got {body[name]!r}", name)
    if body.get("echo"):
        raise ApiError(400, "echo must be false: the response never repeats the prompt", "echo")
    if body.get("suffix"):
        raise ApiError(400, "suffix is not supported (no fill-in-the-middle)", "suffix")
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported; use stop, stop_token_ids or the penalties", "logit_bias")
    if body.get("tools") or body.get("functions"):
        raise ApiError(400, "tools and functions are not supported", "tools")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, 'response_format must be {"type": "text"}: no JSON mode', "response_format")


def _check_model(body: dict[str, Any], served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served!r}", "model",
                       "model_not_found")  # fmt: skip


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(_typed(body, "stream", bool, "true or false"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {options!r}", "stream_options")
    include_usage = bool(_typed(options, "include_usage", bool, "true or false"))
    return stream, stream and include_usage


def completion_prompt(value: Any) -> Prompt:
    """A string or a list of token ids; a batch of exactly one of those too."""
    if isinstance(value, str):
        return Prompt(text=value)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        return completion_prompt(value[0])
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return Prompt(token_ids=tuple(value))
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def chat_prompt(value: Any) -> Prompt:
    """`messages`: {role, content} objects; content a string or a list of text parts."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role", f"messages[{i}].role")
        messages.append((message["role"], _content_text(message.get("content"), i)))
    return Prompt(messages=tuple(messages))


def _content_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _session(body: dict[str, Any]) -> str | None:
    return _typed(body, "session_id", str, "a session id (a string)") or None


def completion_request(body: dict[str, Any]) -> OpenAIRequest:
    _refuse_unsupported(body)
    session_id = _session(body)
    prompt = completion_prompt(body.get("prompt", "" if session_id else None))
    if session_id and prompt.text == "":
        prompt = Prompt(token_ids=())  # continue the session's text
    max_tokens = _typed(body, "max_tokens", int, "an integer")
    logprobs = _typed(body, "logprobs", int, "an integer (how many top tokens)")
    params = sampling_params(body, COMPLETION_MAX_TOKENS if max_tokens is None else max_tokens, logprobs)
    stream, include_usage = _stream_flags(body)
    call = GenerateCall(f"cmpl-{uuid.uuid4().hex}", prompt, params, session_id)
    return OpenAIRequest(False, call, stream, include_usage, logprobs is not None)


def chat_request(body: dict[str, Any]) -> OpenAIRequest:
    _refuse_unsupported(body)
    prompt = chat_prompt(body.get("messages"))
    max_tokens = _typed(body, "max_completion_tokens", int, "an integer")
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", int, "an integer")
    wants_logprobs = bool(_typed(body, "logprobs", bool, "true or false"))
    top = _typed(body, "top_logprobs", int, "an integer")
    if top is not None and not wants_logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    params = sampling_params(body, max_tokens, (top or 0) if wants_logprobs else None)
    stream, include_usage = _stream_flags(body)
    call = GenerateCall(f"chatcmpl-{uuid.uuid4().hex}", prompt, params, _session(body))
    return OpenAIRequest(True, call, stream, include_usage, wants_logprobs)


# ---- the domain -> JSON -----------------------------------------------------------------------------


def usage_json(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class TokenTexts:
    """Each token's own text (logprobs name tokens by their text), asked of a replica once per
    token id and remembered: at most the vocabulary's size."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator
        self.known: dict[int, str] = {}

    async def of(self, events: list[TokenEvent]) -> dict[int, str]:
        ids = {e.token for e in events} | {t for e in events for t, _ in e.top_logprobs}
        missing = sorted(ids - self.known.keys())
        texts = await asyncio.gather(*(self.coordinator.detokenize([t]) for t in missing))
        self.known.update(zip(missing, texts, strict=True))
        return self.known


def completion_logprobs(events: list[TokenEvent], texts: dict[int, str], offset: int) -> dict[str, Any]:
    """The legacy completions shape; `offset` is where these events' text starts in the completion
    (text_offset counts characters of the returned text)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        out["tokens"].append(texts[e.token])
        out["token_logprobs"].append(e.logprob)
        top: dict[str, float] = {}
        for t, lp in e.top_logprobs:  # tokens that read the same (byte pieces: U+FFFD) keep the likeliest
            top[texts[t]] = max(lp, top.get(texts[t], -math.inf))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(e.text)
    return out


def chat_logprobs(events: list[TokenEvent], texts: dict[int, str]) -> dict[str, Any]:
    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        return {"token": texts[token], "logprob": logprob, "bytes": list(texts[token].encode())}

    content = [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
               for e in events]  # fmt: skip
    return {"content": content, "refusal": None}


@dataclass(frozen=True)
class Reply:
    """What the chunks of one response (or one SSE event) are turned into: the request, its model
    name and creation time."""

    request: OpenAIRequest
    model: str
    created: int

    def envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.request.chat else "text_completion"
        return {"id": self.request.call.request_id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def choice(self, text: str, logprobs: dict[str, Any] | None, finish_reason: str, stream: bool) -> dict[str, Any]:
        finish = finish_reason or None  # "" until the last chunk: null, as OpenAI's
        if not self.request.chat:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        message = "delta" if stream else "message"
        body = {"content": text} if stream else {"role": "assistant", "content": text}
        return {"index": 0, message: body, "logprobs": logprobs, "finish_reason": finish}


# ---- the server -------------------------------------------------------------------------------------


class HttpFront:
    """The aiohttp server: `start` binds (port 0: a free one, then in `port`), `stop` closes."""

    def __init__(
        self, coordinator: Coordinator, host: str, port: int, model: str, token: str | None = None,
        tls: TlsFiles | None = None,
    ):  # fmt: skip
        self.coordinator = coordinator
        self.tls = tls
        self.host = host
        self.port = port
        self.model = model or "statemesh"
        self.token = token
        self.created = int(time.time())
        self.texts = TokenTexts(coordinator)
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model}", self.one_model)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        # handler_cancellation: a client that disconnects cancels its handler, and with it its request
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=STOP_GRACE_S)

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.tls.ssl_context() if self.tls else None)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            raise CannotListen(f"--http-port: cannot listen on {self.host}:{self.port} ({e.strerror})") from None
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop accepting; a response still running after STOP_GRACE_S is cancelled (its request too)."""
        await self.runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The bearer token first, then the handler; every error leaves as an OpenAI-style body."""
        try:
            self._check_token(request)
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own: unknown route (404), wrong method (405), too large (413)
            if e.status < 400:
                raise
            return ApiError(
                e.status, f"{request.method} {request.path}: {e.reason}", code=e.reason.lower().replace(" ", "_")
            ).response()
        except Exception as e:
            return api_error(e).response()

    def _check_token(self, request: web.Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        # compare_digest: the time taken says nothing about how much of the token was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", code="invalid_api_key")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: web.Request) -> web.Response:
        _check_model({"model": request.match_info["model"]}, self.model)
        return web.json_response(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "statemesh"}

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._respond(request, completion_request(body))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._respond(request, chat_request(body))

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        _check_model(body, self.model)
        return body

    async def _respond(self, request: web.Request, parsed: OpenAIRequest) -> web.StreamResponse:
        # the coordinator's generator: closing it cancels the request on its replica
        chunks = cast(AsyncGenerator[Chunk, None], self.coordinator.generate(parsed.call))
        reply = Reply(parsed, self.model, int(time.time()))
        try:
            first = await anext(chunks)  # a refused request raises here, before any byte is sent
            if parsed.stream:
                return await self._stream(request, reply, first, chunks)
            return await self._whole(reply, first, chunks)
        finally:
            await chunks.aclose()  # a no-op when it ran to the end

    async def _whole(self, reply: Reply, first: Chunk, chunks: AsyncGenerator[Chunk, None]) -> web.Response:
        collected = [first] + [chunk async for chunk in chunks]
        events = [e for c in collected for e in c.events if e.token >= 0]
        text = "".join(c.text for c in collected)
        logprobs = await self._logprobs(reply, events, 0)
        choice = reply.choice(text, logprobs, collected[-1].finish_reason, stream=False)
        return web.json_response({**reply.envelope([choice], False), "usage": usage_json(collected[-1].usage)})

    async def _stream(
        self, request: web.Request, reply: Reply, first: Chunk, chunks: AsyncGenerator[Chunk, None]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            if reply.request.chat:  # OpenAI's first chat chunk names the role
                first_choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}  # fmt: skip
                await _send(response, reply.envelope([first_choice], True))
            usage = await self._stream_chunks(response, reply, first, chunks)
            if reply.request.include_usage:
                await _send(response, {**reply.envelope([], True), "usage": usage_json(usage)})
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass  # the client left: `_respond` closes the request's stream
        return response

    async def _stream_chunks(
        self, response: web.StreamResponse, reply: Reply, first: Chunk, chunks: AsyncGenerator[Chunk, None]
    ) -> Usage | None:
        """One SSE event per chunk; an error after the first chunk goes as an `error` event (the
        status line has gone already). Returns the last chunk's usage."""
        chunk: Chunk | None = first
        offset = 0
        usage = None
        while chunk is not None:
            events = [e for e in chunk.events if e.token >= 0]
            logprobs = await self._logprobs(reply, events, offset)
            offset += len(chunk.text)
            choice = reply.choice(chunk.text, logprobs, chunk.finish_reason, stream=True)
            await _send(response, reply.envelope([choice], True))
            usage = chunk.usage or usage
            try:
                chunk = await anext(chunks, None)
            except Exception as e:
                await _send(response, api_error(e).body())
                return usage
        return usage

    async def _logprobs(self, reply: Reply, events: list[TokenEvent], offset: int) -> dict[str, Any] | None:
        if not reply.request.logprobs:
            return None
        texts = await self.texts.of(events)
        return chat_logprobs(events, texts) if reply.request.chat else completion_logprobs(events, texts, offset)


async def _send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
