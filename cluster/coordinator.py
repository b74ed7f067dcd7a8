"""`Coordinator`: the service's domain, in plain Python — routing, requests in flight, sessions and the
cluster's view. It knows nothing of gRPC (`server.py` turns protobuf into these calls and errors
into status codes) and reaches the replicas only through their Ray actor handles.

A request's tokens come from its replica's engine through the replica's one event stream
(`ReplicaEvents`: one Ray message per engine step for all the replica's requests, never a call per
token, never a call per step from here), each request reading its own `Feed` of it. A request
whose caller goes away (cancelled, deadline passed) is cancelled on its replica, which frees its
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from statemesh.cluster import ray_cluster, router
from statemesh.cluster.errors import AlreadyExists, Busy, InvalidRequest, NotFound, Unavailable
from statemesh.cluster.ray_cluster import Placement
from statemesh.cluster.replica import Replica
from statemesh.cluster.replica_events import Feed, ReplicaEvents
from statemesh.cluster.saved_sessions import SavedSessions
from statemesh.worker.engine.engine import Checkpoint, TokenEvent, UnknownRequest
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.shard_actor import GenerateOrder

if TYPE_CHECKING:
    from statemesh.cluster.metrics import Metrics

DRAIN_ROUNDS = 8
# A migration's pre-copy sends a running request's cells in pieces of at most this many tokens (a
# piece is written between two engine steps: bounded, so the replica's other streams barely notice),
# until a round finds fewer than PRECOPY_DONE_TOKENS new ones: those go at the pause, with the
# recurrent and sampler state, so the pause does not grow with the sequence.
PRECOPY_PIECE_TOKENS = 512
PRECOPY_DONE_TOKENS = 32
PRECOPY_MAX_ROUNDS = 64
LIVENESS_TIMEOUT_S = 10.0  # a worker that does not answer within this is taken for dead
REBUILD_RETRY_S = 5.0  # a dead replica's rebuild waits this long for room before it tries again
WATCH_PERIOD_S = 2.0  # how often the coordinator looks for replicas that died with nothing running
ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/")
MAX_ID = 128


@dataclass(frozen=True)
class Prompt:
    """One of: text, token ids, or chat messages (role, content) rendered by the model's template."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class GenerateCall:
    request_id: str  # "" : the coordinator makes one
    prompt: Prompt
    params: SamplingParams
    session_id: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Chunk:
    """Part of a request's stream: the tokens since the previous chunk, from `replica_id`."""

    request_id: str
    events: list[TokenEvent]  # the sampled tokens (a cancellation's event carries none)
    replica_id: str
    finish_reason: str = ""
    usage: Usage | None = None

    @property
    def token_ids(self) -> list[int]:
        return [e.token for e in self.events if e.token >= 0]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


@dataclass(frozen=True)
class SessionView:
    session_id: str
    replica_id: str
    n_tokens: int
    state_bytes: int
    memory_kind: str
    busy: bool


@dataclass(frozen=True)
class ReplicaView:
    replica: Replica
    running: int
    waiting: int
    migrating: int = 0


@dataclass(frozen=True)
class Migration:
    source_replica_id: str
    target_replica_id: str
    state_bytes: int  # all that moved: the pre-copy's pieces and the last piece
    pause_ms: float
    precopy_bytes: int = 0  # moved while the request kept running
    precopy_rounds: int = 0
    pause_bytes: int = 0  # moved while it was paused


@dataclass
class Recovery:
    """What it takes to recover a running request if its replica dies: its order, the tokens the
    caller has had, and its recovery checkpoints (`Checkpoint`: a whole one, then pieces)."""

    order: GenerateOrder
    delivered: list[int] = field(default_factory=list)
    chain: list[Checkpoint] = field(default_factory=list)

    def checkpointed(self, checkpoint: Checkpoint) -> None:
        if checkpoint.p0 == 0:
            self.chain = []  # a whole one: what came before is not needed
        self.chain.append(checkpoint)


def _seeded(params: SamplingParams) -> SamplingParams:
    """The request's sampling with a seed of its own when it had none: a request recovered from its
    prompt then draws the very tokens it drew before."""
    if params.greedy or params.seed is not None:
        return params
    return dataclasses.replace(params, seed=secrets.randbits(63))


@dataclass(frozen=True)
class Precopy:
    """How far a migration's pre-copy got: the target holds the request's cells below `sent`, as
    of the source's preemption count `epoch`."""

    sent: int = 0
    epoch: int | None = None
    bytes: int = 0
    rounds: int = 0


@dataclass
class Counters:
    requests_finished: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    migrations: int = 0
    recoveries: int = 0


@dataclass
class Coordinator:
    replicas: list[Replica]
    prefix_block: int = 16  # the engines' prefix-cache block, for routing by cached prefix
    max_in_flight: int = 256  # requests a replica takes before it counts as full
    metrics: Metrics | None = None  # the service's Prometheus metrics; None: off
    requests: dict[str, Replica] = field(default_factory=dict)  # running request id -> its replica
    request_sessions: dict[str, str] = field(default_factory=dict)  # running request id -> its session
    sessions: dict[str, Replica] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    saved: SavedSessions = field(default_factory=SavedSessions)  # each session's state as of its last turn
    # starts a dead replica's workers again (service.py); None: a dead replica stays dead
    rebuild: Callable[[Replica], Awaitable[Placement]] | None = None
    _rebuilding: set[str] = field(default_factory=set)
    _orphans: dict[str, Replica] = field(default_factory=dict)  # session id -> the dead replica that held it
    _moves: dict[str, asyncio.Future[tuple[Replica, Feed]]] = field(default_factory=dict)  # handovers in flight
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    # ---- lookups ---------------------------------------------------------------------------------

    def replica(self, replica_id: str) -> Replica:
        for r in self.replicas:
            if r.replica_id == replica_id:
                return r
        raise NotFound(f"no replica {replica_id!r}; replicas: {[r.replica_id for r in self.replicas]}")

    def any_ready(self) -> Replica:
        ready = [r for r in self.replicas if r.state == "ready"]
        if not ready:
            raise Unavailable("no replica is ready (see Cluster/ListReplicas)")
        return min(ready, key=lambda r: r.load)

    def session_replica(self, session_id: str) -> Replica:
        replica = self.sessions.get(session_id)
        if replica is None:
            raise NotFound(f"no session {session_id!r}; create it with Sessions/Create")
        if replica.state not in ("ready", "draining"):
            raise Unavailable(f"session {session_id!r} lives on replica {replica.replica_id}, which is {replica.state}")
        return replica

    # ---- text ------------------------------------------------------------------------------------------

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(await _unwrapped(self.any_ready().engine.tokenize.remote(text, add_special_tokens)))

    async def detokenize(self, ids: list[int]) -> str:
        return str(await _unwrapped(self.any_ready().engine.detokenize.remote(ids)))

    async def _prompt_ids(self, prompt: Prompt, replica: Replica) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if prompt.messages is not None:
            messages = [{"role": role, "content": content} for role, content in prompt.messages]
            return list(await _unwrapped(replica.engine.chat_prompt.remote(messages)))
        return list(await _unwrapped(replica.engine.tokenize.remote(prompt.text or "")))

    # ---- requests --------------------------------------------------------------------------------------

    async def generate(self, call: GenerateCall) -> AsyncIterator[Chunk]:
        """Run one request, yielding its chunks. Raises before the first chunk when the request is
        refused (nothing runs then)."""
        timer = self.metrics.request_started() if self.metrics is not None else None
        request_id = call.request_id or f"req-{uuid.uuid4().hex[:16]}"
        check_id("request_id", request_id)
        if request_id in self.requests:
            raise AlreadyExists(f"request {request_id!r} is running; give each request its own id")
        keys: list[bytes] = []
        if call.session_id is not None:
            replica = self.session_replica(call.session_id)
            ids = await self._prompt_ids(call.prompt, replica)
        else:
            ids = await self._prompt_ids(call.prompt, self.any_ready())
            if not ids:
                raise InvalidRequest("the prompt is empty: give text, token_ids or messages (or a session_id)")
            replica, keys = router.choose(self.replicas, ids, self.prefix_block, self.max_in_flight)
        if request_id in self.requests:  # taken while the prompt was tokenized
            raise AlreadyExists(f"request {request_id!r} is running; give each request its own id")
        self.requests[request_id] = replica
        if call.session_id is not None:
            self.request_sessions[request_id] = call.session_id
        replica.in_flight.add(request_id)
        finished, produced = False, 0
        feed: Feed | None = None
        try:
            order = GenerateOrder(request_id, tuple(ids), _seeded(call.params), call.session_id)
            recovery = Recovery(order)
            feed = self._feed(replica, request_id)
            await _unwrapped(replica.engine.generate.remote(order))  # refused: raises, nothing queued
            while not finished:
                try:
                    async for events in feed:
                        if isinstance(events, Checkpoint):
                            recovery.checkpointed(events)
                            continue
                        if not events:
                            continue
                        replica.remember_prefix(keys)
                        n_tokens = sum(1 for e in events if e.token >= 0)
                        produced += n_tokens
                        recovery.delivered += [e.token for e in events if e.token >= 0]
                        last = events[-1]
                        usage = None
                        if timer is not None:
                            timer.tokens(n_tokens)
                        if last.finish_reason is not None:
                            finished = True
                            usage = self._account(last, produced)
                            if timer is not None:
                                timer.finished(usage.prompt_tokens)
                            if call.session_id is not None:  # before the caller can send the next turn
                                await self._save_turn(call.session_id, replica, recovery)
                        yield Chunk(request_id, events, replica.replica_id, last.finish_reason or "", usage)
                except (Unavailable, RuntimeError, ray.exceptions.RayActorError):
                    moved = await self._next_feed(request_id, replica)  # its replica died as it moved
                    if moved is None and not await self._lost(replica):
                        raise  # its replica lives: a real error, the caller hears it
                    replica, feed = moved or await self._recover(request_id, recovery, replica)
                    keys = []
                    continue
                if not finished:  # its feed ended unfinished: the request moved; splice its new feed
                    moved = await self._next_feed(request_id, replica)
                    if moved is None and not await self._lost(replica):  # its move failed, and it lives
                        raise Unavailable(f"replica {replica.replica_id} ended request {request_id}'s stream "
                                          "unfinished")  # fmt: skip
                    replica, feed = moved or await self._recover(request_id, recovery, replica)
                    keys = []
        finally:
            if feed is not None:
                feed.close()
            self.request_sessions.pop(request_id, None)
            replica = self.requests.pop(request_id, replica)
            replica.in_flight.discard(request_id)
            move = self._moves.pop(request_id, None)
            if move is not None and move.done() and not move.cancelled() and move.exception() is None:
                replica, moved_feed = move.result()  # it left mid-handover: it runs there now
                moved_feed.close()
            if not finished:  # the caller left (or the stream broke): free the request's memory
                self._spawn(self._cancel_on(replica, request_id))

    async def _lost(self, replica: Replica) -> bool:
        """Whether `replica` is gone (a worker process died, or its node): asks each of its
        workers; the first to find out marks it dead and stops what is left of it."""
        if replica.state == "dead":
            return True
        try:
            for actor in replica.actors:  # Ray's own no-op method: alive whatever state its engine is in
                await asyncio.wait_for(actor.__ray_ready__.remote(), timeout=LIVENESS_TIMEOUT_S)
            return False
        except (ray.exceptions.RayActorError, TimeoutError):
            if replica.state != "dead":
                self._died(replica)
            return True

    def _died(self, replica: Replica) -> None:
        """`replica` is gone: free what is left of it (its other workers, its reservation), bring its
        idle sessions back elsewhere, and start it again where the cluster has room."""
        replica.state = "dead"
        replica.in_flight.clear()
        with contextlib.suppress(Exception):
            ray_cluster.release(replica.placement)
        self._orphans.update({sid: replica for sid, r in self.sessions.items() if r is replica})
        self._spawn(self._recover_sessions())
        if self.rebuild is not None and replica.replica_id not in self._rebuilding:
            self._rebuilding.add(replica.replica_id)
            self._spawn(self._rebuild(replica))

    async def _rebuild(self, replica: Replica) -> None:
        """Start a dead replica's workers again (ListReplicas shows it `starting`, then `ready`);
        where the cluster has no room for them yet, try again every REBUILD_RETRY_S."""
        assert self.rebuild is not None
        try:
            while True:
                replica.state = "starting"
                try:
                    placement = await self.rebuild(replica)
                    workers = [await actor.info.remote() for actor in placement.actors]
                except Exception:  # no room yet (PlacementError), or a worker failed as it started
                    replica.state = "dead"
                    await asyncio.sleep(REBUILD_RETRY_S)
                    continue
                replica.actors, replica.placement, replica.workers = placement.actors, placement, workers
                replica.events = None
                replica.prefix_keys.clear()
                replica.state = "ready"
                await self._recover_sessions()  # those that waited for a replica
                return
        finally:
            self._rebuilding.discard(replica.replica_id)

    async def _recover_sessions(self) -> None:
        """Each idle session whose replica died, restored on a ready replica from its saved chain
        (`SavedSessions`: as of its last turn). A session in a turn comes back with its request
        (`_recover`); one never saved stays lost (its calls say so)."""
        for session_id, replica in list(self._orphans.items()):
            if self.sessions.get(session_id) is not replica:  # deleted, or back with its turn's request
                self._orphans.pop(session_id, None)
                continue
            chain = self.saved.get(session_id)
            if chain is None:  # never saved (a save failed): lost; its calls say so
                self._orphans.pop(session_id, None)
                continue
            if session_id in self.request_sessions.values():
                continue  # back with its turn's request, or tried again when a replica is rebuilt
            try:
                target = self.any_ready()
                await self._restore_session(target, session_id, chain)
            except Exception:  # tried again when a replica is rebuilt
                continue
            if self.sessions.get(session_id) is replica:
                self.sessions[session_id] = target
                self._orphans.pop(session_id, None)
                if self.metrics is not None:
                    self.metrics.recovered()

    @staticmethod
    async def _restore_session(replica: Replica, session_id: str, chain: list[bytes]) -> None:
        if chain:
            await _unwrapped(replica.engine.restore_session.remote(session_id, chain))
        else:
            await _unwrapped(replica.engine.open_session.remote(session_id))

    async def restore_saved(self) -> list[tuple[str, str]]:
        """The sessions a `--snapshot-dir` holds, restored on the ready replicas (a server started
        again on the directory); returns those that could not be, with why."""
        failed = []
        for session_id, chain in self.saved.load().items():
            ready = [r for r in self.replicas if r.state == "ready"]
            if not ready:
                failed.append((session_id, "no replica is ready"))
                continue
            target = min(ready, key=lambda r: len([s for s in self.sessions.values() if s is r]))
            try:
                await self._restore_session(target, session_id, chain)
            except Exception as error:
                failed.append((session_id, f"{type(error).__name__}: {error}"))
                continue
            self.sessions[session_id] = target
        return failed

    async def _save_turn(self, session_id: str, replica: Replica, recovery: Recovery) -> None:
        """Save a session as its turn ends: the turn's recovery checkpoints and the piece since the
        last of them (the whole state where there is none). A save that fails leaves no stale state
        behind: the session is then not saved until its next turn."""
        chain = [c.data for c in recovery.chain]
        p0 = recovery.chain[-1].fed if recovery.chain else 0
        try:
            piece, start = await _unwrapped(replica.engine.session_piece.remote(session_id, p0))
        except Exception:
            self.saved.forget(session_id)
            return
        self.saved.save(session_id, [*chain, piece] if start else [piece])

    def _feed(self, replica: Replica, request_id: str) -> Feed:
        """A feed of `request_id`'s events on `replica`, opened before the call that starts it there."""
        if replica.events is None:
            replica.events = ReplicaEvents(replica.engine, replica.replica_id)
        return replica.events.open(request_id)

    async def _recover(self, request_id: str, recovery: Recovery, dead: Replica) -> tuple[Replica, Feed]:
        """Go on with a request whose replica died, on another: from its recovery checkpoints, the
        tokens since replayed (not sampled or sent again); or, before its first checkpoint, from its
        prompt with the same seed, every token it sent replayed. UNAVAILABLE when no replica is left."""
        ready = [r for r in self.replicas if r.state == "ready"]
        if not ready:
            raise Unavailable(f"request {request_id}'s replica {dead.replica_id} died and no other replica is "
                              "ready to recover it; retry later")  # fmt: skip
        target = min(ready, key=lambda r: r.load)
        session_chain = None
        if not recovery.chain and recovery.order.session is not None:
            # a session's turn before its first checkpoint: the session as of its last turn, then the turn again
            session_chain = self.saved.get(recovery.order.session)
            if session_chain is None:
                raise Unavailable(f"request {request_id}'s replica {dead.replica_id} died before its first "
                                  "checkpoint, and its session (never saved) with it; start the conversation "
                                  "again")  # fmt: skip
        feed = self._feed(target, request_id)
        try:
            if session_chain is not None:
                assert recovery.order.session is not None
                await self._restore_session(target, recovery.order.session, session_chain)
            if recovery.chain:
                replay = tuple(recovery.delivered[recovery.chain[-1].n_outputs :])
                chain = [c.data for c in recovery.chain]
                recovery_id = f"recovery-{uuid.uuid4().hex[:12]}"
                await _unwrapped(target.engine.recover.remote(chain, replay, recovery_id, request_id))
            else:
                order = dataclasses.replace(recovery.order, replay=tuple(recovery.delivered))
                await _unwrapped(target.engine.generate.remote(order))
        except BaseException:
            feed.close()
            raise
        # the target goes on with the chain (its memory is what the chain says, and the replayed
        # tokens' cells are its own): its next checkpoint is the piece after the last one here
        dead.in_flight.discard(request_id)
        target.in_flight.add(request_id)
        self.requests[request_id] = target
        session = self.request_sessions.get(request_id)
        if session is not None:
            self.sessions[session] = target
        self.counters.recoveries += 1
        if self.metrics is not None:
            self.metrics.recovered()
        return target, feed

    async def _next_feed(self, request_id: str, replica: Replica) -> tuple[Replica, Feed] | None:
        """Where a request whose feed ended (or broke) goes on when a migration of it is under way:
        the handover it sets, once it is done. None when there is none, or it failed (the request
        then runs where it was, or, if its replica died meanwhile, is recovered)."""
        move = self._moves.get(request_id)
        if move is None:
            return None
        try:
            target, feed = await move
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller left
            return None  # it never left its replica
        except Unavailable:
            return None  # it left, and could go back nowhere: its replica died
        finally:
            self._moves.pop(request_id, None)
        replica.in_flight.discard(request_id)
        target.in_flight.add(request_id)
        self.requests[request_id] = target
        return target, feed

    async def migrate_request(self, request_id: str, target_id: str | None) -> Migration:
        """Move a running request, with its state, to another replica, live (Llumnix's pre-copy):
        while it keeps running on its replica, its attention cells go to the target in pieces; then
        it stops between two steps, only what changed since (the last cells, recurrent and sampler
        state) goes over, and it resumes there. Its state goes worker to worker through Ray's
        object store (never through here), and its stream goes on from the target with the very
        tokens it would have had. If anything fails, it goes on where it was, and the error says why."""
        source = self.requests.get(request_id)
        if source is None:
            raise NotFound(f"no running request {request_id!r}")
        if request_id in self._moves:
            raise Busy(f"request {request_id!r} is being migrated already")
        target = self._target(source, target_id)
        move: asyncio.Future[tuple[Replica, Feed]] = asyncio.get_running_loop().create_future()
        self._moves[request_id] = move
        migration_id = f"mig-{uuid.uuid4().hex[:16]}"
        try:
            done = await self._precopy(source, target, request_id, migration_id)
        except BaseException as error:
            self._moves.pop(request_id, None)
            move.cancel()
            await self._quietly(target.engine.abort_incoming.remote(migration_id))
            if isinstance(error, UnknownRequest):
                raise NotFound(f"request {request_id!r} ended before it could move") from None
            raise Busy(f"replica {target.replica_id} could not take request {request_id} ({error}); "
                       f"it goes on on {source.replica_id}") from error  # fmt: skip
        paused = time.monotonic()
        state = source.engine.detach.remote(request_id, done.sent, done.epoch, True)  # parked: held until released
        feed = self._feed(target, request_id)
        try:  # returns once the target has queued it
            size = await _unwrapped(
                target.engine.resume.remote(state, request_id, migration_id if done.rounds else None)
            )
        except BaseException as error:
            feed.close()
            await self._quietly(target.engine.abort_incoming.remote(migration_id))
            try:
                await _unwrapped(state)  # did it leave the source?
            except BaseException:
                self._moves.pop(request_id, None)
                move.cancel()
                raise error from None  # it never left: it runs on where it was
            back = self._feed(source, request_id)
            try:
                await _unwrapped(source.engine.reattach.remote(request_id))
            except BaseException:  # the source died too: the request is recovered from its checkpoints
                back.close()
                move.set_exception(Unavailable(f"request {request_id} could go back to nowhere"))
                raise error from None
            move.set_result((source, back))
            raise Busy(f"replica {target.replica_id} could not take request {request_id} ({error}); "
                       f"it goes on on {source.replica_id}") from error  # fmt: skip
        pause_ms = (time.monotonic() - paused) * 1000
        move.set_result((target, feed))
        await self._quietly(source.engine.release.remote(request_id))  # its memory there is free again
        session = self.request_sessions.get(request_id)
        if session is not None:  # a session's turn brings the session along
            self.sessions[session] = target
        self.counters.migrations += 1
        migration = Migration(source.replica_id, target.replica_id, done.bytes + int(size), pause_ms,
                              done.bytes, done.rounds, int(size))  # fmt: skip
        if self.metrics is not None:
            self.metrics.migrated(migration)
        return migration

    async def _precopy(self, source: Replica, target: Replica, request_id: str, migration_id: str) -> Precopy:
        """Send the request's cells to the target in pieces while it runs; returns how far it got.
        A piece's bytes go from the source's object store to the target; only its numbers come here."""
        done = Precopy()
        for _ in range(PRECOPY_MAX_ROUNDS):
            piece, info_ref = source.engine.precopy.options(num_returns=2).remote(
                request_id, done.sent, done.epoch, PRECOPY_PIECE_TOKENS
            )
            info = await _unwrapped(info_ref)
            if info["p1"] == info["p0"]:  # nothing new: it holds no memory now, or none since
                return Precopy(info["p0"], info["epoch"], done.bytes, done.rounds)
            await _unwrapped(target.engine.receive.remote(migration_id, piece))
            done = Precopy(info["p1"], info["epoch"], done.bytes + info["bytes"], done.rounds + 1)
            if info["p1"] - info["p0"] < PRECOPY_DONE_TOKENS:
                break
        return done

    @staticmethod
    async def _quietly(ref: Any) -> None:
        """Await a clean-up call whose failure changes nothing (e.g. its worker is gone)."""
        with contextlib.suppress(Exception):  # a clean-up that cannot run has nothing left to clean
            await _unwrapped(ref)

    def _account(self, last: TokenEvent, produced: int) -> Usage:
        self.counters.requests_finished += 1
        usage = Usage(last.prompt_tokens or 0, produced, last.cached_tokens or 0)
        self.counters.prompt_tokens += usage.prompt_tokens
        self.counters.cached_tokens += usage.cached_tokens
        return usage

    async def cancel(self, request_id: str) -> bool:
        replica = self.requests.get(request_id)
        if replica is None:
            raise NotFound(f"no running request {request_id!r}")
        return await self._cancel_on(replica, request_id)

    async def _cancel_on(self, replica: Replica, request_id: str) -> bool:
        try:
            return bool(await replica.engine.cancel.remote(request_id))
        except ray.exceptions.RayActorError:
            return False  # the replica is gone, and the request with it

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- sessions ---------------------------------------------------------------------------------------

    async def create_session(self, session_id: str | None, replica_id: str | None) -> SessionView:
        session_id = session_id or f"sess-{uuid.uuid4().hex[:16]}"
        check_id("session_id", session_id)
        if session_id in self.sessions:
            raise AlreadyExists(f"session {session_id!r} exists already; choose another id")
        replica = self.replica(replica_id) if replica_id else self.any_ready()
        if replica.state != "ready":
            raise Unavailable(f"replica {replica.replica_id} is {replica.state}; choose a ready one")
        self.sessions[session_id] = replica
        try:
            await _unwrapped(replica.engine.open_session.remote(session_id))
        except BaseException:
            self.sessions.pop(session_id, None)
            raise
        self.saved.save(session_id, [])
        return await self.get_session(session_id)

    async def get_session(self, session_id: str) -> SessionView:
        replica = self.sessions.get(session_id)
        if replica is None:
            raise NotFound(f"no session {session_id!r}")
        info = await _unwrapped(replica.engine.session_info.remote(session_id))
        if info is None:
            raise NotFound(f"session {session_id!r} is no longer held by replica {replica.replica_id}")
        kind = replica.workers[0].memory_kind if replica.workers else ""
        return SessionView(session_id, replica.replica_id, info["n_tokens"], info["state_bytes"], kind, info["busy"])

    async def list_sessions(self) -> list[SessionView]:
        views = []
        for session_id in list(self.sessions):
            try:
                views.append(await self.get_session(session_id))
            except NotFound:
                continue
        return views

    async def delete_session(self, session_id: str) -> None:
        replica = self.sessions.get(session_id)
        if replica is None:
            raise NotFound(f"no session {session_id!r}")
        if replica.state != "dead":
            await _unwrapped(replica.engine.drop_session.remote(session_id))  # SessionBusy: nothing changed
        self.sessions.pop(session_id, None)
        self.saved.forget(session_id)

    async def fork_session(self, session_id: str, new_id: str | None) -> SessionView:
        """A copy of a session on its replica, sharing its state (copy-on-write where memory can)."""
        replica = self.session_replica(session_id)
        new_id = new_id or f"sess-{uuid.uuid4().hex[:16]}"
        check_id("new_session_id", new_id)
        if new_id in self.sessions:
            raise AlreadyExists(f"session {new_id!r} exists already; fork under another id")
        self.sessions[new_id] = replica
        try:
            await _unwrapped(replica.engine.fork_session.remote(session_id, new_id))
        except BaseException:
            self.sessions.pop(new_id, None)
            raise
        chain = self.saved.get(session_id)
        if chain is not None:  # the fork holds what its source holds
            self.saved.save(new_id, chain)
        return await self.get_session(new_id)

    async def truncate_session(self, session_id: str, n_tokens: int) -> SessionView:
        replica = self.session_replica(session_id)
        await _unwrapped(replica.engine.truncate_session.remote(session_id, n_tokens))
        try:  # saved whole: a cut is rare, and its pieces would not line up with the old chain's
            self.saved.save(session_id, [bytes(await _unwrapped(replica.engine.export_session.remote(session_id)))])
        except Exception:
            self.saved.forget(session_id)
        return await self.get_session(session_id)

    async def export_session(self, session_id: str) -> bytes:
        replica = self.session_replica(session_id)
        return bytes(await _unwrapped(replica.engine.export_session.remote(session_id)))

    def max_import_bytes(self) -> int:
        """The largest session state any live replica would read: an import stream past it is
        refused as it arrives, before the server holds more of it."""
        caps = [r.workers[0].max_state_bytes for r in self.replicas if r.state in ("ready", "draining") and r.workers]
        return max(caps, default=0)

    async def import_session(self, data: bytes, session_id: str | None, replica_id: str | None) -> SessionView:
        """An exported session, on a replica of the same model (any split, any device)."""
        session_id = session_id or f"sess-{uuid.uuid4().hex[:16]}"
        check_id("session_id", session_id)
        if session_id in self.sessions:
            raise AlreadyExists(f"session {session_id!r} exists already; import it under another id")
        replica = self.replica(replica_id) if replica_id else self.any_ready()
        self.sessions[session_id] = replica
        try:
            await _unwrapped(replica.engine.import_session.remote(session_id, data))
        except BaseException:
            self.sessions.pop(session_id, None)
            raise
        self.saved.save(session_id, [data])
        return await self.get_session(session_id)

    async def migrate_session(self, session_id: str, target_id: str | None) -> Migration:
        """Move an idle session's state to another replica, worker to worker through Ray's object
        store (never through here); on any failure it stays where it was."""
        source = self.session_replica(session_id)
        target = self._target(source, target_id)
        state = source.engine.export_session.remote(session_id)  # an object ref: the bytes stay in Ray
        await _unwrapped(target.engine.import_session.remote(session_id, state))
        self.sessions[session_id] = target
        await _unwrapped(source.engine.drop_session.remote(session_id))
        self.counters.migrations += 1
        size = (await self.get_session(session_id)).state_bytes
        # pause 0: an idle session produces no token, so no stream waited for it (the proto's pause_ms)
        migration = Migration(source.replica_id, target.replica_id, size, 0.0)
        if self.metrics is not None:
            self.metrics.migrated(migration)
        return migration

    def _target(self, source: Replica, target_id: str | None) -> Replica:
        if target_id:
            target = self.replica(target_id)
            if target is source:
                raise Busy(f"the session is on {source.replica_id} already; name another replica")
            if target.state != "ready":
                raise Unavailable(f"replica {target_id} is {target.state}; migrate to a ready one")
            return target
        others = [r for r in self.replicas if r is not source and r.state == "ready"]
        if not others:
            raise Unavailable(f"no other ready replica to migrate to from {source.replica_id}")
        return min(others, key=lambda r: r.load)

    async def drain(self, replica_id: str) -> tuple[int, int]:
        """Stop routing to a replica and move everything it holds elsewhere, running requests with
        their streams and idle sessions: (requests moved, sessions moved). What cannot move (no
        other replica ready) stays, and the error says so; the replica stays draining."""
        replica = self.replica(replica_id)
        if replica.state not in ("ready", "draining"):
            raise Busy(f"replica {replica_id} is {replica.state}; only a ready replica can be drained")
        replica.state = "draining"
        moved_requests = moved_sessions = 0
        for _ in range(DRAIN_ROUNDS):  # requests that arrive meanwhile (a session's turn) go in the next round
            requests = [rid for rid, r in self.requests.items() if r is replica and rid not in self._moves]
            busy = set(self.request_sessions.values())  # a session in a turn moves with its request
            sessions = [sid for sid, r in self.sessions.items() if r is replica and sid not in busy]
            if not requests and not sessions:
                break
            for request_id in requests:
                try:
                    await self.migrate_request(request_id, None)
                    moved_requests += 1
                except (NotFound, UnknownRequest):
                    continue  # it finished meanwhile
            for session_id in sessions:
                await self.migrate_session(session_id, None)
                moved_sessions += 1
        return moved_requests, moved_sessions

    def undrain(self, replica_id: str) -> Replica:
        replica = self.replica(replica_id)
        if replica.state != "draining":
            raise Busy(f"replica {replica_id} is {replica.state}, not draining")
        replica.state = "ready"
        return replica

    # ---- the cluster ------------------------------------------------------------------------------------

    async def list_replicas(self) -> list[ReplicaView]:
        views = []
        for r in self.replicas:
            running = waiting = migrating = 0
            if r.state in ("ready", "draining"):
                try:
                    r.workers = [await actor.info.remote() for actor in r.actors]
                    running, waiting, migrating = await r.engine.load.remote()
                except ray.exceptions.RayActorError:
                    self._died(r)
            views.append(ReplicaView(r, running, waiting, migrating))
        return views

    async def engine_stats(self) -> dict[str, dict[str, Any]]:
        """Each live replica's engine `stats()` (its totals since it started), by replica id."""
        by_replica = {}
        for r in self.replicas:
            if r.state not in ("ready", "draining"):
                continue
            try:
                by_replica[r.replica_id] = await r.engine.stats.remote()
            except ray.exceptions.RayActorError:
                continue
        return by_replica

    async def stats(self) -> dict[str, int]:
        totals = {"running": 0, "waiting": 0, "tokens_out": 0, "prefix_queries": 0, "prefix_hits": 0, "preemptions": 0}
        for stats in (await self.engine_stats()).values():
            for key in totals:
                totals[key] += int(stats[key])
        c = self.counters
        return {
            "requests_running": totals["running"],
            "requests_waiting": totals["waiting"],
            "requests_finished": c.requests_finished,
            "prompt_tokens": c.prompt_tokens,
            "generation_tokens": totals["tokens_out"],
            "cached_tokens": c.cached_tokens,
            "prefix_cache_queries": totals["prefix_queries"],
            "prefix_cache_hits": totals["prefix_hits"],
            "preemptions": totals["preemptions"],
            "migrations": c.migrations,
            "recoveries": c.recoveries,
        }

    def start(self) -> None:
        """Watch the replicas: one that dies with nothing running is noticed too (and rebuilt)."""
        self._spawn(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            for replica in self.replicas:
                if replica.state in ("ready", "draining"):
                    await self._lost(replica)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for replica in self.replicas:
            if replica.events is not None:
                await replica.events.stop()


def check_id(name: str, value: str) -> None:
    if len(value) > MAX_ID or not set(value) <= ID_CHARS:
        raise InvalidRequest(f"{name} {value[:40]!r} must be 1..{MAX_ID} characters of letters, digits and - _ . : /")


async def _unwrapped(ref: Any) -> Any:
    """Await a Ray call; an error the worker raised comes out as itself (its type and message),
    not wrapped in Ray's RayTaskError."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, BaseException) else None
        if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)):
            # the call's worker lives, but what it needed died (another worker, the object it read)
            raise Unavailable(f"a replica's worker is gone ({type(cause).__name__}); retry: another replica may "
                              "serve") from cause  # fmt: skip
        if cause is not None:
            raise cause from None
        raise
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
        raise Unavailable(f"a replica's worker is gone ({type(e).__name__}); retry: another replica may serve") from e
