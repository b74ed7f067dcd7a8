"""`ShardWorker` and its Ray actor, `ShardActor`: a model's layers, their memory and the replica's
engine in one worker process. The one module of `statemesh.worker` that imports Ray.

The coordinator talks to it with plain data only: `ShardSpec` to start it, `GenerateOrder` for a
request, `WorkerInfo` and dicts back. Every request's events leave through one stream, `events`,
which the coordinator opens once: each of its items holds what every request got since the
previous one (one engine step's tokens for all of them, usually), so tokens flow back in batches,
one item a step for the whole replica, never one call a token or a stream a request. The engine
runs on its own thread (`EngineLoop`); the actor's event loop only queues work and forwards
events, so a decode step costs no call to the coordinator.

A replica of one stage is one such worker holding every layer. (A pipeline of stages, whose later
stages hold their layers' memory beside their weights, builds on the same worker.)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import ray

from statemesh.memory import Batch
from statemesh.worker.architectures.model import Model
from statemesh.worker.engine.engine import (
    Checkpoint,
    Engine,
    EngineConfig,
    Request,
    SessionBusy,
    UnknownSession,
)
from statemesh.worker.engine.loop import EngineLoop, Event
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.engine.sequence_state import MAX_HEADER_BYTES
from statemesh.worker.errors import InvalidTokens
from statemesh.worker.loading.loader import load_model
from statemesh.worker.pipeline import PipelineMemory, PipelineModel, StageWorker, split_layers

T = TypeVar("T")


@dataclass(frozen=True)
class ShardSpec:
    """What a worker hosts: stage `stage` of `n_stages` (its share of the layers, `split_layers`)
    of the model at `model_path`; stage 0 runs the replica's engine."""

    replica_id: str
    model_path: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    backend: str = "numpy"  # "numpy", or "cupy" on a worker given a GPU
    weights: str = "f32"  # how the large matrices are kept: f32, or packed q8 / q4 (`load_model`)
    stage: int = 0
    n_stages: int = 1

    @property
    def worker_id(self) -> str:
        return f"{self.replica_id}/s{self.stage}"

    def layers(self, n_layers: int) -> tuple[int, int]:
        return split_layers(n_layers, self.n_stages)[self.stage]


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as `Cluster/ListReplicas` shows it; `memory_bytes` by memory component."""

    worker_id: str
    model: str
    first_layer: int
    end_layer: int
    node_id: str
    pid: int
    device: str
    memory_kind: str  # kv, iswa, recurrent, hybrid, hybrid_iswa
    memory_bytes: dict[str, int]
    vocab_size: int
    n_ctx: int
    weight_bytes: int  # the model weights this worker holds (its layers', and the ends it needs)
    max_state_bytes: int = 0  # the first stage's: the largest sequence state its engine reads (0: not the first)


@dataclass(frozen=True)
class GenerateOrder:
    """One request as the coordinator sends it: the prompt's token ids (for a session, the new
    turn's, which follow the session's history)."""

    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    session: str | None = None
    replay: tuple[int, ...] = ()  # tokens it produced on a worker that died (`Engine.add`)


def memory_kind(stats: dict[str, Any]) -> str:
    """The API's name for a memory's kind, from its `stats()`."""
    kind = str(stats["kind"])
    if kind == "windowed_kv":
        return "iswa"
    if kind == "hybrid":
        return "hybrid_iswa" if stats["components"][0]["kind"] == "iswa" else "hybrid"
    return kind


def memory_components(stats: dict[str, Any], prefix: str = "") -> dict[str, int]:
    """Bytes by component (`kv`, `kv_dense`, `windowed_kv`, `recurrent`, ...) from `stats()`."""
    if "components" in stats:
        out: dict[str, int] = {}
        for part in stats["components"]:
            for name, n in memory_components(part).items():
                out[name] = out.get(name, 0) + n
        return out
    out = {prefix + str(stats["kind"]): int(stats["bytes"])}
    if stats.get("dense_bytes"):
        out[prefix + str(stats["kind"]) + "_dense"] = int(stats["dense_bytes"])
    return out


class ShardWorker:
    """A replica's first stage and its engine, without Ray (tests drive it in process; `ShardActor`
    is its actor). `later` are the actors of the replica's other stages, in order."""

    def __init__(self, spec: ShardSpec, later: list[Any] | None = None):
        self.spec = spec
        self.model = load_stage(spec)  # with later stages, only its own layers' weights
        model: Model = self.model
        if later:
            ranges = split_layers(self.model.n_layers, spec.n_stages)
            model = PipelineModel(self.model, ranges, [RayStage(actor) for actor in later])
        self.engine = Engine(model, spec.engine)
        self.loop = EngineLoop(self.engine, name=f"engine {spec.worker_id}")
        self._outbox: _Outbox | None = None  # made in the actor's event loop, on first use

    async def _call(self, fn: Callable[[Engine], T]) -> T:
        return await asyncio.wrap_future(self.loop.call(fn))

    # ---- facts ----------------------------------------------------------------------------------------

    async def info(self) -> WorkerInfo:
        def local_stats(engine: Engine) -> dict[str, Any]:
            memory = engine.memory
            return memory.local.stats() if isinstance(memory, PipelineMemory) else memory.stats()

        stats = await self._call(local_stats)
        components = memory_components(stats)
        components["session_store"] = await self._call(lambda e: e.sessions.stored_bytes())
        info = worker_info(self.spec, self.model, stats, components)
        return replace(info, max_state_bytes=self.engine.memory.max_snapshot_bytes + MAX_HEADER_BYTES)

    async def stats(self) -> dict[str, Any]:
        return await self._call(lambda e: e.stats())

    async def load(self) -> tuple[int, int, int]:
        """(running, waiting) requests, and sequences held for migrations (parked or arriving)."""
        return await self._call(lambda e: (len(e.running), len(e.waiting), len(e.parked) + len(e.incoming)))

    # ---- text ------------------------------------------------------------------------------------------

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.model.tokenizer.encode(text, add_bos=None if add_special_tokens else False)

    async def detokenize(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids)

    async def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.model.tokenizer
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    # ---- requests --------------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[dict[str, list[Event]]]:
        """Every request's events, for as long as this worker lives (call with
        num_returns="streaming", once): each item maps a request id to what it got since the
        previous item, in order (lists of `TokenEvent`s, the last with the finish reason; a
        `Checkpoint`; `Detached` when it left this engine; `EngineFailure` when a step failed)."""
        outbox = self._outbox_here()
        while True:
            tokens, rest = _split_at_checkpoints(await outbox.take())
            if tokens:
                yield tokens
            if rest:
                yield rest

    def _outbox_here(self) -> _Outbox:
        if self._outbox is None:
            self._outbox = _Outbox()
        return self._outbox

    def _listener(self, request_id: str) -> Callable[[Event], None]:
        outbox = self._outbox_here()
        return lambda event: outbox.put(request_id, event)

    async def generate(self, order: GenerateOrder) -> None:
        """Queue one request; its events go out through `events`. Raises when the request is
        refused (nothing queued then)."""
        listener = self._listener(order.request_id)
        await asyncio.wrap_future(self.loop.submit(lambda e: self._request(e, order), listener, order.replay))

    async def resume(self, state: bytes, request_id: str, migration_id: str | None = None) -> int:
        """Continue request `request_id`, which another worker detached (its `SequenceState`; after
        a pre-copy into `migration_id`, its last piece); returns the state's size in bytes once it
        is queued here (the handover is done). Its events go out through `events`."""
        await asyncio.wrap_future(self.loop.attach(state, self._listener(request_id), migration_id))
        return len(state)

    async def recover(self, chain: list[bytes], replay: tuple[int, ...], recovery_id: str, request_id: str) -> None:
        """Continue request `request_id`, whose worker died, from its recovery checkpoints and the
        tokens since (`Engine.recover`); returns once it is queued here."""
        listener = self._listener(request_id)
        await asyncio.wrap_future(self.loop.recover(chain, replay, recovery_id, listener))

    async def reattach(self, request_id: str) -> None:
        """A request parked here by `detach(park=True)` goes on here (its move failed); returns once
        it runs again."""
        await asyncio.wrap_future(self.loop.reattach(request_id, self._listener(request_id)))

    async def detach(
        self, request_id: str, after: int | None = None, epoch: int | None = None, park: bool = False
    ) -> bytes:
        """Take a request out of this engine between two steps, as its portable state (after a
        pre-copy, the piece since `after`; with `park`, its memory stays here until `release` or
        `reattach`); its `generate` stream here ends without a finish reason."""
        return await asyncio.wrap_future(self.loop.detach(request_id, after, epoch, park))

    async def release(self, request_id: str) -> bool:
        """A parked request runs elsewhere now: free its memory here."""
        return await self._call(lambda e: e.release(request_id))

    # ---- live migration's pre-copy (`Engine.precopy`, `receive`) ---------------------------------------

    async def precopy(
        self, request_id: str, p0: int, epoch: int | None, max_tokens: int
    ) -> tuple[bytes, dict[str, int]]:
        """A piece of a running request's cells, while it keeps running (call with num_returns=2:
        the piece goes to the target through the object store, the small answer to the caller)."""
        piece, info = await self._call(lambda e: e.precopy(request_id, p0, epoch, max_tokens))
        return piece, {**info, "bytes": len(piece)}

    async def receive(self, migration_id: str, piece: bytes) -> None:
        await self._call(lambda e: e.receive(migration_id, piece))

    async def abort_incoming(self, migration_id: str) -> bool:
        return await self._call(lambda e: e.abort_incoming(migration_id))

    @staticmethod
    def _request(engine: Engine, order: GenerateOrder) -> Request:
        """The engine's request for `order`: a session's turn follows its history."""
        prompt = list(order.prompt)
        if order.session is not None:
            history = engine.session_history(order.session)
            if history is None:
                raise UnknownSession(f"no session {order.session!r} on this replica")
            if engine.session_in_use(order.session):
                raise SessionBusy(f"session {order.session!r} is busy with another request; wait for it or cancel it")
            prompt = history + prompt
        if not prompt:
            raise InvalidTokens("the prompt is empty (and there is no session history to continue)")
        return Request(order.request_id, tuple(prompt), order.params, order.session)

    async def cancel(self, request_id: str) -> bool:
        return await asyncio.wrap_future(self.loop.cancel(request_id))

    # ---- sessions --------------------------------------------------------------------------------------

    async def open_session(self, name: str) -> None:
        await self._call(lambda e: e.open_session(name))

    async def drop_session(self, name: str) -> bool:
        return await self._call(lambda e: e.drop_session(name))

    async def session_info(self, name: str) -> dict[str, Any] | None:
        """n_tokens, state_bytes (of its memory or its host snapshot) and busy; None if unknown."""

        def info(engine: Engine) -> dict[str, Any] | None:
            session = engine.sessions.get(name)
            if session is None:
                return None
            if session.snapshot is not None:
                state = len(session.snapshot)
            elif session.seq is not None and session.tokens:
                state = len(engine.memory.state_write_buffer(session.seq))
            else:
                state = 0
            return {"n_tokens": len(session.history), "state_bytes": state, "busy": engine.session_in_use(name)}

        return await self._call(info)

    async def fork_session(self, name: str, new_name: str) -> None:
        await self._call(lambda e: e.fork_session(name, new_name))

    async def truncate_session(self, name: str, n_tokens: int) -> None:
        await self._call(lambda e: e.truncate_session(name, n_tokens))

    async def export_session(self, name: str) -> bytes:
        """The session's portable state (`SequenceState` bytes)."""
        return await self._call(lambda e: e.export_session(name))

    async def import_session(self, name: str, data: bytes) -> None:
        await self._call(lambda e: e.import_session(name, data))

    async def session_piece(self, name: str, p0: int) -> tuple[bytes, int]:
        """The session's state from position `p0` on (`Engine.session_piece`), and where it starts."""
        return await self._call(lambda e: e.session_piece(name, p0))

    async def restore_session(self, name: str, chain: list[bytes]) -> None:
        await self._call(lambda e: e.restore_session(name, chain))

    async def shutdown(self) -> None:
        self.loop.stop()


class _Outbox:
    """Every request's events, handed from the engine's thread (`put`, their listeners) to the
    actor's event loop, where `take` gathers all that came since it last ran."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pending: dict[str, list[Event]] = {}
        self.ready = asyncio.Event()

    def put(self, request_id: str, event: Event) -> None:
        self.loop.call_soon_threadsafe(self._add, request_id, event)

    def _add(self, request_id: str, event: Event) -> None:
        events = self.pending.setdefault(request_id, [])
        if isinstance(event, list) and events and isinstance(events[-1], list):
            events[-1] = events[-1] + event  # tokens after tokens: one list
        else:
            events.append(event)
        self.ready.set()

    async def take(self) -> dict[str, list[Event]]:
        await self.ready.wait()
        self.ready.clear()
        taken, self.pending = self.pending, {}
        return taken


def _split_at_checkpoints(taken: dict[str, list[Event]]) -> tuple[dict[str, list[Event]], dict[str, list[Event]]]:
    """A take in two items: each request's events before its first checkpoint, then the rest. A
    checkpoint is large (hundreds of KB: Ray sends it through its object store); the step's tokens,
    small, go ahead of it in an item of their own. Each request's order is kept."""
    first: dict[str, list[Event]] = {}
    rest: dict[str, list[Event]] = {}
    for request_id, events in taken.items():
        cut = next((i for i, e in enumerate(events) if isinstance(e, Checkpoint)), len(events))
        if cut:
            first[request_id] = events[:cut]
        if cut < len(events):
            rest[request_id] = events[cut:]
    return first, rest


def load_stage(spec: ShardSpec) -> Model:
    """The weights of the worker's layers alone (`split_layers` of the model's layer count, which the
    loader gives once it has read the config): a stage never holds the whole model."""

    def layers(n_layers: int) -> range:
        return range(*spec.layers(n_layers))

    return load_model(spec.model_path, backend=spec.backend, progress=False, layers=layers, weights=spec.weights)


def worker_info(spec: ShardSpec, model: Model, stats: dict[str, Any], components: dict[str, int]) -> WorkerInfo:
    context = ray.get_runtime_context() if ray.is_initialized() else None
    first, end = spec.layers(model.n_layers)
    return WorkerInfo(
        worker_id=spec.worker_id,
        model=model.config.name,
        first_layer=first,
        end_layer=end,
        node_id=context.get_node_id() if context is not None else "",
        pid=os.getpid(),
        device="cpu" if model.backend.is_host else "cuda:0",
        memory_kind=memory_kind(stats),
        memory_bytes={**components, "weights": model.weight_bytes},  # the proto's Worker.memory_bytes
        vocab_size=model.config.vocab_size,
        n_ctx=spec.engine.n_ctx,
        weight_bytes=model.weight_bytes,
    )


class StageHost:
    """A later stage of a replica (`PipelineModel`): its layers' weights and memory, driven by the
    first stage's engine through `RayStage`. Methods run one at a time (a plain actor)."""

    def __init__(self, spec: ShardSpec):
        self.spec = spec
        self.model = load_stage(spec)
        first, end = spec.layers(self.model.n_layers)
        c = spec.engine
        self.stage = StageWorker(self.model, first, end, c.n_ctx, c.n_seq_max + c.prefix_cache_seqs, c.n_ubatch)

    def plan(self, batch: Batch, n_ubatch: int) -> None:
        self.stage.plan(batch, n_ubatch)

    def forward(self, batch: Batch, hidden: Any, n_ubatch: int) -> Any:
        return self.stage.forward(batch, hidden, n_ubatch)

    def memory(self, op: str, *args: Any) -> Any:
        return self.stage.memory(op, *args)

    def info(self) -> WorkerInfo:
        stats = self.stage.mem.stats()
        return worker_info(self.spec, self.model, stats, memory_components(stats))


class RayStage:
    """A later stage as the first stage's engine calls it (`pipeline.Stage`), through Ray: calls
    wait for their answers, except `forward`, whose output reference goes straight to the next
    stage (activations never pass through the first stage on their way)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def plan(self, batch: Batch, n_ubatch: int) -> None:
        _get(self.actor.plan.remote(batch, n_ubatch))

    def forward(self, batch: Batch, hidden: Any, n_ubatch: int) -> Any:
        return self.actor.forward.remote(batch, hidden, n_ubatch)

    def result(self, ref: Any) -> Any:
        return _get(ref)

    def memory(self, op: str, *args: Any) -> Any:
        return _get(self.actor.memory.remote(op, *args))


def _get(ref: Any) -> Any:
    """ray.get, with a stage's own error (MemoryFull, a SnapshotError) raised as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, BaseException):
            raise e.cause from None
        raise


ShardActor = ray.remote(ShardWorker)
StageActor = ray.remote(StageHost)
