"""`Engine`: one model, one `Memory`, many sequences — continuous batching.

Every `step()` builds one batch: a token for each running sequence that decodes, then chunks of the
prompts being prefilled, up to `max_batch_tokens`; the model runs it through memory; each sequence
whose logits came back samples its next token. Requests join and leave at every step.

Memory pressure. A step is planned, memory is asked whether it fits (its batch plan raises
MemoryFull, changing nothing), and the step gives way until it does, in this order: cached prefixes
and idle sessions leave memory; the step's prefill tokens (new requests' and running prompts'
chunks) are halved; the youngest running request is preempted. No MemoryFull reaches the caller, and a request
that could never fit alone is refused when it is added.

The policy, after vLLM's V1 scheduler (first come, first served; the newest running request is
preempted and goes back to the head of the queue), with the bound that vLLM lacks:
- Every request keeps its place in line (`arrival`) for life. Waiting requests are admitted in
  that order, and admission stops at the first one that memory cannot take, so a younger request
  never overtakes an older one (requests whose session is busy with another request are passed
  over). A request is admitted when its whole input fits in the room left beside the step's
  tokens (`Memory.room_to_grow`).
- The victim of a preemption is the youngest running request. Its state is swapped out as a
  snapshot (or dropped, to be recomputed from prompt + output); its sampler, detokenizer and stop
  state stay, so it resumes with identical output. It goes back to its place in line: ahead of
  every request that arrived after it.
- Thrashing is bounded: a request preempted `max_preemptions` times is re-admitted only when the
  room left holds all it can still need (its input and its remaining `max_tokens`) beside all that
  the running requests, every one older than it, can still need. From then on no step can need its
  room: whatever else needs room is younger and goes first. So no request is preempted more than
  `max_preemptions` times. (llama.cpp's server has no preemption: a slot that runs out of context
  shifts it or fails.)

Events stream out of `step()`: token id, the text delta (never a partial UTF-8 character, never any
part of a stop string), logprobs, and on the last one the finish reason.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from statemesh.memory import Batch, MemoryFull
from statemesh.memory import snapshot as snapshot_format
from statemesh.memory.errors import InvalidInput, SnapshotCorrupt, SnapshotError, SnapshotIncompatible
from statemesh.worker.architectures.model import Model
from statemesh.worker.engine.prefix_cache import PrefixCache
from statemesh.worker.engine.sampling import Sample, SamplerState, SamplingParams, sample, skip_draw
from statemesh.worker.engine.sequence_state import MAX_HEADER_BYTES, SequenceState
from statemesh.worker.engine.sessions import Session, SessionStore
from statemesh.worker.engine.stops import StopMatcher
from statemesh.worker.loading.tokenizer import StreamingDetokenizer


class RequestRefused(InvalidInput):
    """A request that can never run: empty, bad token ids, or too long for the memory."""


class PromptTooLong(RequestRefused):
    """Prompt + max_tokens exceed the context: the request can never fit."""


class UnknownSession(InvalidInput):
    """A session name that no session has."""


class UnknownRequest(InvalidInput):
    """A request id that no running or waiting request has."""


class RequestExists(InvalidInput):
    """A request id that a running or waiting request has already."""


class UnknownMigration(InvalidInput):
    """A migration id with no sequence kept for it here (never started, aborted, or given up for room)."""


class SessionExists(InvalidInput):
    """A new session under a name that is taken."""


class CannotTruncate(InvalidInput):
    """A cut the session's memory cannot make (a recurrent state can only be dropped whole)."""


class SessionBusy(InvalidInput):
    """An operation on a session that a running request is using: wait for it to end, or cancel it."""


class EngineStalled(RuntimeError):
    """Work is queued that no step can ever run: an internal invariant is broken (a bug), raised
    instead of looping forever."""


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 4096  # token cells of the KV cache, shared by all sequences
    n_seq_max: int = 32  # sequences resident at once
    max_batch_tokens: int = 512  # tokens per step: running decodes first, then prefill chunks
    n_ubatch: int = 512
    session_store_bytes: int = 1 << 30  # host memory for the snapshots of evicted idle sessions
    preempt: str = "auto"  # "swap" the state out as a snapshot, "recompute" it, or "auto"
    swap_min_tokens: int = 32  # auto: swap sequences holding at least this many tokens, recompute shorter ones
    max_preemptions: int = 2  # then re-admitted only with room to finish: never preempted again
    prefix_cache_seqs: int = 8  # sequence ids kept for prefix-cache checkpoints (0: no prefix cache)
    prefix_block: int = 16  # tokens per hashed block
    prefix_stride_blocks: int = 4  # with recurrent layers: a checkpoint every this many blocks of a prompt
    checkpoint_every: int = 0  # a recovery checkpoint of each running request every this many tokens (0: none)

    def __post_init__(self) -> None:
        if self.preempt not in ("auto", "swap", "recompute"):
            raise InvalidInput(f"preempt must be 'auto', 'swap' or 'recompute', got {self.preempt!r}")
        for name in ("n_ctx", "n_seq_max", "max_batch_tokens", "n_ubatch", "prefix_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise InvalidInput(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if not isinstance(self.max_preemptions, int) or self.max_preemptions < 0:
            raise InvalidInput(f"max_preemptions must be an integer >= 0, got {self.max_preemptions!r}")


@dataclass(frozen=True)
class Request:
    id: str
    prompt: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    session: str | None = None  # keep the state after the request, for the session's next turn


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop", "length", "cancelled" on a request's last event
    prompt_tokens: int | None = None  # on the last event: the prompt's length
    cached_tokens: int | None = None  # on the last event: prompt tokens memory already held (prefix, session)


@dataclass(frozen=True)
class Checkpoint:
    """A running request's recovery point (`EngineConfig.checkpoint_every`): its `SequenceState`
    whose memory snapshot is the piece of its sequence since its previous checkpoint (positions
    `p0` on; `p0` 0: the whole sequence, and the chain starts anew), taken right after a step that
    sampled its `n_outputs`-th token. Read in order, a chain restores the request as it was then
    (`Engine.recover`), on any engine of the model; the tokens it produced since are replayed."""

    request_id: str
    data: bytes
    p0: int
    fed: int
    n_outputs: int


@dataclass
class _Sequence:
    """A request's run state. Memory must hold prompt + output before the next token can be
    sampled; `fed` counts how many of those it holds (0 again after a preemption that drops them)."""

    request: Request
    sampler: SamplerState
    detok: StreamingDetokenizer
    stops: StopMatcher
    arrival: int  # its place in line, for life (see the module's policy)
    output: list[int] = field(default_factory=list)
    seq: int | None = None  # its sequence id in memory while it holds one
    fed: int = 0
    swapped: bytes | None = None  # its state while preempted by swapping, and how much it held
    swapped_fed: int = 0
    preemptions: int = 0
    cached: int | None = None  # prompt tokens found in memory when first admitted (prefix cache, session)
    arrived: float = 0.0
    last_token_at: float | None = None
    checkpointed_fed: int = 0  # what its last recovery checkpoint held: memory up to here,
    checkpointed_epoch: int = -1  # as of this many preemptions (-1: none taken here yet),
    checkpointed_outputs: int = 0  # and this many sampled tokens

    def tokens(self) -> list[int]:
        return [*self.request.prompt, *self.output]

    @property
    def n_tokens(self) -> int:
        return len(self.request.prompt) + len(self.output)

    @property
    def decoding(self) -> bool:
        """Whether its next input is just its last sampled token."""
        return bool(self.output) and self.fed == self.n_tokens - 1

    @property
    def need(self) -> int:
        """Cells it may still add: the input it has yet to feed and every token it may still
        sample but the last (which is never fed)."""
        return max(0, len(self.request.prompt) + self.request.params.max_tokens - 1 - self.fed)

    def next_input(self) -> list[int]:
        """The tokens still to feed: the (rest of the) prompt and output, usually just the last
        sampled token (without copying the whole history to find it)."""
        prompt = self.request.prompt
        if self.fed >= len(prompt):
            return self.output[self.fed - len(prompt) :]
        return [*prompt[self.fed :], *self.output]


class Engine:
    def __init__(self, model: Model, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        c = self.config
        self.memory = model.create_memory(c.n_ctx, c.n_seq_max + c.prefix_cache_seqs, c.n_ubatch)
        spec = model.memory_spec()
        windows = [w for w in (spec.attention(i).window for i in spec.attention_layers) if w is not None]
        self.prefix = PrefixCache(
            self.memory, list(range(c.n_seq_max, c.n_seq_max + c.prefix_cache_seqs)), c.prefix_block,
            exact=bool(spec.recurrent_layers), window=max(windows) if windows else None,
        )  # fmt: skip
        self.checkpoint_stride = c.prefix_block * c.prefix_stride_blocks if spec.recurrent_layers else None
        self.has_attention = bool(spec.attention_layers)  # cells grow with tokens; a state does not
        self.waiting: list[_Sequence] = []  # by arrival
        self.running: list[_Sequence] = []  # by arrival
        self.free_seqs = list(range(self.config.n_seq_max - 1, -1, -1))
        self.incoming: dict[str, int] = {}  # migration id -> the sequence id its pre-copy pieces go into
        self.parked: dict[str, _Sequence] = {}  # detached with park=True: held here until released or reattached
        self.checkpoints: list[Checkpoint] = []  # taken by the last steps, for the caller to collect
        self._restored_in_step: set[str] = set()  # sessions the step in progress brought back into memory
        self._arrivals = itertools.count()
        self.sessions = SessionStore(self.config.session_store_bytes)
        self.latency: dict[str, deque[float]] = {"ttft": deque(maxlen=10_000), "itl": deque(maxlen=10_000)}
        self.counters = {
            "preemptions": 0, "prefill_tokens": 0, "decode_tokens": 0, "tokens_out": 0, "steps": 0,
            "session_hits": 0, "session_tokens_reused": 0, "session_evictions": 0, "session_restores": 0,
            "swap_outs": 0, "swap_ins": 0, "step_retries": 0, "most_preemptions": 0,
            "migrations_given_up": 0, "checkpoints": 0,
        }  # fmt: skip

    # ---- requests ------------------------------------------------------------------------------

    def add(self, request: Request, replay: tuple[int, ...] = ()) -> None:
        """Queue a request; RequestRefused, nothing queued, if it can never run. `replay`: tokens it
        produced before (on a worker that died): taken as its first outputs without being sampled
        or emitted again (`_replay`), so it goes on from there."""
        prompt = list(request.prompt)
        if not prompt:
            raise RequestRefused(f"request {request.id}: the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestRefused(
                f"request {request.id}: token ids {bad[:5]} are outside the vocabulary 0 .. {vocab - 1}"
            )
        stops = [t for t in request.params.stop_token_ids if not 0 <= t < vocab]
        if stops:
            raise RequestRefused(
                f"request {request.id}: stop_token_ids {stops[:5]} are outside the vocabulary 0 .. {vocab - 1}"
            )
        need = len(prompt) + request.params.max_tokens
        if self.has_attention and need > self.config.n_ctx:
            raise PromptTooLong(
                f"request {request.id}: prompt ({len(prompt)} tokens) + max_tokens ({request.params.max_tokens}) "
                f"= {need} exceeds the context of {self.config.n_ctx} tokens; shorten one of them"
            )
        tokenizer = self.model.tokenizer
        s = _Sequence(
            request,
            SamplerState.start(request.params, prompt),
            tokenizer.stream(),
            StopMatcher(request.params.stop),
            next(self._arrivals),
            arrived=time.monotonic(),
        )
        self._replay(s, replay)
        self.waiting.append(s)

    def cancel(self, request_id: str) -> list[TokenEvent]:
        """Stop a request now; its cells are freed at once, or kept as its session's state (the
        turn so far). [] when no such request runs or waits."""
        for s in [*self.running, *self.waiting]:
            if s.request.id == request_id:
                self._finish(s)
                return [TokenEvent(request_id, -1, "", None, (), "cancelled", len(s.request.prompt), s.cached or 0)]
        return []

    def open_session(self, name: str) -> None:
        """A new, empty session; SessionExists, nothing changed, when the name is taken."""
        if self.sessions.get(name) is not None:
            raise SessionExists(f"session {name!r} exists already; choose another id")
        self.sessions.sessions[name] = Session(name, [])

    def session_in_use(self, name: str) -> bool:
        """Whether a request of session `name` runs or waits."""
        return any(s.request.session == name for s in (*self.running, *self.waiting))

    def session_history(self, name: str) -> list[int] | None:
        """Every token of session `name` so far (its prompts and outputs); None when unknown."""
        session = self.sessions.get(name)
        return None if session is None else list(session.history)

    # ---- moving a running request ----------------------------------------------------------------------

    def detach(self, request_id: str, after: int | None = None, epoch: int | None = None, park: bool = False) -> bytes:
        """Take a running (or waiting) request out of this engine, between two steps, as its portable
        state (`SequenceState`): its memory snapshot, tokens, sampling parameters, sampler (RNG,
        penalty counts), detokenizer and stop-string state. `attach` on any engine of the same model
        continues it with exactly the tokens it would have produced here. Its session, if it has
        one, leaves with it. UnknownRequest, nothing changed, when no such request runs or waits.

        After a pre-copy (`precopy`) had sent its cells up to `after` (in `epoch`), the state holds
        only the piece from there on, unless it was preempted since. With `park`, it stops running
        but keeps its memory here until `release` (it runs on elsewhere) or `reattach` (it goes on
        here: the move failed)."""
        s = self._find(request_id)
        if s.seq is not None:
            pieced = after is not None and after > 0 and epoch == s.preemptions and s.fed >= after
            data, fed = self.memory.state_write(s.seq, after if pieced else None, None), s.fed
        elif s.swapped is not None:
            data, fed = s.swapped, s.swapped_fed
        else:
            data, fed = b"", 0
        state = SequenceState(tuple(s.tokens()), fed, data, _request_json(s)).encode()
        (self.running if s in self.running else self.waiting).remove(s)
        if park:
            self.parked[request_id] = s
        else:
            self._let_go(s)
        return state

    def _find(self, request_id: str) -> _Sequence:
        s = next((s for s in (*self.running, *self.waiting) if s.request.id == request_id), None)
        if s is None:
            raise UnknownRequest(f"no running or waiting request {request_id!r} here")
        return s

    def _let_go(self, s: _Sequence) -> None:
        """Free what a request that left this engine held: its sequence and its session."""
        if s.seq is not None:
            self._release_seq(s.seq)
            s.seq = None
        if s.request.session:
            self.sessions.drop(s.request.session)

    def release(self, request_id: str) -> bool:
        """A parked request runs elsewhere now: free what it held here. False if none is parked."""
        s = self.parked.pop(request_id, None)
        if s is not None:
            self._let_go(s)
        return s is not None

    def reattach(self, request_id: str) -> None:
        """A parked request goes on here (its move failed), from where it stopped."""
        s = self.parked.pop(request_id, None)
        if s is None:
            raise UnknownRequest(f"no parked request {request_id!r} here")
        bisect.insort(self.running if s.seq is not None else self.waiting, s, key=lambda r: r.arrival)

    # ---- live migration: the pre-copy ------------------------------------------------------------

    def precopy(self, request_id: str, p0: int, epoch: int | None, max_tokens: int) -> tuple[bytes, dict[str, int]]:
        """A piece of a running request's memory for a live migration, while it keeps running here:
        its attention cells at positions [p0, p0 + max_tokens) that memory holds (`Memory.state_write`
        with a range; a piece's size does not depend on how long the sequence is). `epoch` is what
        the previous piece's answer said: if the request was preempted since (its cells may have been
        recomputed), the pieces start over from 0. Returns the piece (empty when it holds no memory
        now: waiting or swapped out) and {"p0", "p1", "epoch", "fed"}."""
        s = self._find(request_id)
        if epoch is not None and epoch != s.preemptions:
            p0 = 0
        info = {"p0": p0, "p1": p0, "epoch": s.preemptions, "fed": s.fed}
        if s.seq is None or s.fed <= p0 or max_tokens < 1:
            return b"", info
        info["p1"] = min(s.fed, p0 + max_tokens)
        return self.memory.state_write(s.seq, p0, info["p1"]), info

    def receive(self, migration_id: str, piece: Any) -> None:
        """Read a pre-copy piece of a request migrating here into the sequence id kept for it (taken
        at its first piece, evicting idle sessions for one). MemoryFull when there is no room, or a
        SnapshotError when the piece is bad: the migration's sequence is dropped then, and `attach`
        with its id refuses (the request goes on where it was)."""
        seq = self.incoming.get(migration_id)
        if seq is None:
            seq = self._reserve(migration_id)
        try:
            if not self._read_state(bytes(piece), seq):
                raise MemoryFull(f"no room for a piece of incoming migration {migration_id!r} ({self.memory.stats()})")
        except BaseException:
            self.abort_incoming(migration_id)
            raise

    def abort_incoming(self, migration_id: str) -> bool:
        """Drop what a migration's pieces brought here; False when nothing was kept for it."""
        seq = self.incoming.pop(migration_id, None)
        if seq is not None:
            self._release_seq(seq)
        return seq is not None

    def _drop_incoming(self) -> bool:
        """Under memory pressure the oldest incoming pre-copy gives its room first: nothing is lost
        (its request runs on where it was; that migration fails and says why)."""
        if not self.incoming:
            return False
        self.abort_incoming(next(iter(self.incoming)))
        self.counters["migrations_given_up"] += 1
        return True

    def attach(self, data: Any, migration_id: str | None = None, replay: tuple[int, ...] = ()) -> str:
        """Continue a request that `detach` took out of an engine of this model; returns its id. It
        joins the queue (as the youngest request) and its state is read back when it is admitted,
        as a swapped-out request's is. RequestExists or a SnapshotError subclass, nothing changed,
        when its id runs here already or the state is damaged or of another model.

        With the `migration_id` whose pre-copy pieces were `receive`d, the state's snapshot is the
        last piece: it is read into that sequence now and the request runs at the next step.
        UnknownMigration when no sequence is kept for it; on any refusal that sequence is dropped."""
        if migration_id is not None:
            if migration_id not in self.incoming:
                raise UnknownMigration(
                    f"no pre-copied sequence for migration {migration_id!r} here (given up for room?)"
                )
            try:
                return self._attach_resident(data, self.incoming[migration_id], replay)
            finally:
                self.incoming.pop(migration_id, None)
        state = SequenceState.decode(data, max_bytes=self.memory.max_snapshot_bytes + MAX_HEADER_BYTES)
        if state.request is None:
            raise SnapshotIncompatible("this state is an idle session's, not a running request's (import it instead)")
        s = self._sequence_from(state)
        if any(r.request.id == s.request.id for r in (*self.running, *self.waiting)):
            raise RequestExists(f"request {s.request.id!r} runs here already")
        if s.request.session and self.sessions.get(s.request.session) is not None:
            raise SessionExists(f"session {s.request.session!r} exists here already; the request cannot bring it")
        if state.snapshot:
            self._check_snapshot(state.snapshot)
            s.swapped, s.swapped_fed = state.snapshot, state.fed
        self._replay(s, replay)
        self.waiting.append(s)
        return s.request.id

    def _attach_resident(self, data: Any, seq: int, replay: tuple[int, ...] = ()) -> str:
        """`attach` into `seq`, which holds the pre-copied pieces; `seq` is released on refusal."""
        try:
            state = SequenceState.decode(data, max_bytes=self.memory.max_snapshot_bytes + MAX_HEADER_BYTES)
            if state.request is None:
                raise SnapshotIncompatible("this state is an idle session's, not a running request's")
            s = self._sequence_from(state)
            if any(r.request.id == s.request.id for r in (*self.running, *self.waiting)):
                raise RequestExists(f"request {s.request.id!r} runs here already")
            if s.request.session and self.sessions.get(s.request.session) is not None:
                raise SessionExists(f"session {s.request.session!r} exists here already; the request cannot bring it")
            if not state.snapshot or not self._read_state(state.snapshot, seq):
                raise MemoryFull(f"no room here for the rest of request {s.request.id!r} ({self.memory.stats()})")
            if self.memory.seq_pos_max(seq) != state.fed - 1:
                raise SnapshotCorrupt(f"the migrated memory holds positions up to {self.memory.seq_pos_max(seq)}; "
                                      f"the request's state says {state.fed} tokens")  # fmt: skip
        except BaseException:
            self._release_seq(seq)
            raise
        s.seq, s.fed = seq, state.fed
        self._replay(s, replay)
        bisect.insort(self.running, s, key=lambda r: r.arrival)
        return s.request.id

    # ---- recovery -------------------------------------------------------------------------------------

    def recover(self, chain: list[bytes], replay: tuple[int, ...], recovery_id: str) -> str:
        """Continue a request whose worker died, from its checkpoints (`Checkpoint.data`, in order:
        the first holds its whole sequence, each later one the piece since) and the tokens it
        produced after the last (`replay`: not sampled or emitted again, but fed with its next
        step, its sampler, detokenizer and stop state advanced over them). Its next tokens are the
        ones it would have produced. A SnapshotError or MemoryFull when the chain cannot be read
        here; nothing is kept then."""
        if not chain:
            raise InvalidInput("recovery needs at least one checkpoint")
        try:
            for data in chain[:-1]:
                state = SequenceState.decode(data, max_bytes=self.memory.max_snapshot_bytes + MAX_HEADER_BYTES)
                self.receive(recovery_id, state.snapshot)
            if len(chain) == 1:  # one whole checkpoint: an id for it, holding nothing yet
                self._reserve(recovery_id)
            return self.attach(chain[-1], recovery_id, replay)
        finally:
            self.abort_incoming(recovery_id)  # a no-op when it went well (attach took the id)

    def _reserve(self, migration_id: str) -> int:
        """A sequence id kept for what a migration or a recovery brings here."""
        seq = self._free_seq()
        if seq is None:
            raise MemoryFull(f"no free sequence id for {migration_id!r}")
        self.incoming[migration_id] = seq
        return seq

    def _replay(self, s: _Sequence, tokens: tuple[int, ...]) -> None:
        """Take `tokens` as s's next outputs, as if it had sampled them: its sampler records each
        (penalty counts) and advances its generator by the draw each took; the detokenizer and
        stop matcher take them too. Nothing is emitted: the client has them already."""
        for token in tokens:
            s.output.append(int(token))
            s.sampler.record(int(token))
            if not s.request.params.greedy:
                skip_draw(s.sampler)
            s.stops.push(s.detok.push(int(token)))
        if tokens:
            s.last_token_at = time.monotonic()

    def _take_checkpoints(self, plan: _Plan) -> None:
        """After a step: a recovery checkpoint of each running request that sampled its
        `checkpoint_every`-th token since its last one, or has none here yet (the first holds the
        whole sequence; so does one after a preemption, which may have recomputed its cells)."""
        every = self.config.checkpoint_every
        for s, _ in plan.sampling:
            if s.seq is None or s not in self.running:
                continue
            fresh = s.checkpointed_epoch != s.preemptions
            if not fresh and len(s.output) - s.checkpointed_outputs < every:
                continue
            p0 = 0 if fresh else s.checkpointed_fed
            piece = self.memory.state_write(s.seq, p0 or None, None)
            s.checkpointed_fed, s.checkpointed_epoch, s.checkpointed_outputs = s.fed, s.preemptions, len(s.output)
            data = SequenceState(tuple(s.tokens()), s.fed, piece, _request_json(s)).encode()
            self.checkpoints.append(Checkpoint(s.request.id, data, p0, s.fed, len(s.output)))
            self.counters["checkpoints"] += 1

    def _sequence_from(self, state: SequenceState) -> _Sequence:
        r = state.request
        assert r is not None
        try:
            prompt_len = int(r["prompt_len"])
            params = SamplingParams(**{**r["params"], "stop": tuple(r["params"]["stop"]),
                                       "stop_token_ids": tuple(r["params"]["stop_token_ids"])})  # fmt: skip
            request = Request(str(r["id"]), state.history[:prompt_len], params, r["session"])
            detok = self.model.tokenizer.stream()
            detok.ids = [int(t) for t in r["detok"]["ids"]]
            detok.prefix, detok.read = int(r["detok"]["prefix"]), int(r["detok"]["read"])
            stops = StopMatcher(params.stop, str(r["held"]))
            s = _Sequence(request, SamplerState.from_json(r["sampler"]), detok, stops, next(self._arrivals),
                          output=list(state.history[prompt_len:]), cached=r["cached"],
                          preemptions=int(r["preemptions"]), arrived=time.monotonic())  # fmt: skip
            checkpointed = r.get("checkpointed") or {}
            if checkpointed.get("current") is True:  # its memory is what its last checkpoint says
                s.checkpointed_fed, s.checkpointed_outputs = int(checkpointed["fed"]), int(checkpointed["outputs"])
                s.checkpointed_epoch = s.preemptions
                if not (0 <= s.checkpointed_fed <= state.fed and 0 <= s.checkpointed_outputs <= len(s.output)):
                    raise ValueError(f"its checkpoints cover {checkpointed}, beyond its {len(state.history)} tokens")
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotCorrupt(f"the request's state is malformed: {type(e).__name__}: {e}") from None
        if not 0 < prompt_len <= len(state.history) or state.fed > len(state.history):
            raise SnapshotCorrupt(f"the request's prompt of {prompt_len} tokens does not fit its {len(state.history)}")
        self._check_vocab(state.history, "the request's")
        return s

    def _check_vocab(self, tokens: tuple[int, ...], whose: str) -> None:
        """A state's tokens must be this model's: SnapshotIncompatible (a state of another model) if not."""
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in tokens):
            raise SnapshotIncompatible(f"{whose} tokens run past this model's vocabulary of {vocab}")

    def export_session(self, name: str) -> bytes:
        """Session `name`'s portable state (`SequenceState`): its memory snapshot and its tokens.
        UnknownSession, or SessionBusy while a request of it runs or waits; nothing changes."""
        session = self._idle_session(name)
        if session.snapshot is not None:
            data = session.snapshot
        elif session.seq is not None and session.tokens:
            data = self.memory.state_write(session.seq)
        else:
            data = b""
        return SequenceState(tuple(session.history), len(session.tokens), data).encode()

    def import_session(self, name: str, data: Any) -> None:
        """A session `name` from exported state, resident when memory has room (else kept as a host
        snapshot, restored when used). SessionExists, or a SnapshotError subclass (MemoryFull never)
        when the state is damaged, forged or of another model; nothing changes then."""
        if self.sessions.get(name) is not None:
            raise SessionExists(f"session {name!r} exists already; import it under another id")
        state = SequenceState.decode(data, max_bytes=self.memory.max_snapshot_bytes + MAX_HEADER_BYTES)
        self._check_vocab(state.history, "the session's")
        session = Session(name, list(state.history[: state.fed]), list(state.history), last_used=next(self._arrivals))
        if state.snapshot:
            seq = self._place_snapshot(state.snapshot, state.fed)
            if seq is None:
                session.snapshot = state.snapshot
            session.seq = seq
        self.sessions.sessions[name] = session

    def session_piece(self, name: str, p0: int) -> tuple[bytes, int]:
        """Session `name`'s state as a piece (`SequenceState`) whose memory snapshot holds only its
        positions from `p0` on, for a chain of its recovery checkpoints that already holds those
        before (`restore_session`); returns it and the `p0` it starts at: 0, the whole state, when
        its memory is on the host now or holds no more than `p0` tokens. UnknownSession, SessionBusy."""
        session = self._idle_session(name)
        fed = len(session.tokens)
        if session.seq is None or not session.tokens or not 0 < p0 < fed:
            return self.export_session(name), 0
        piece = self.memory.state_write(session.seq, p0, None)
        return SequenceState(tuple(session.history), fed, piece).encode(), p0

    def restore_session(self, name: str, chain: list[bytes]) -> None:
        """A session `name` from a chain of states (`SequenceState`s, in order: the first holds the
        whole sequence, each later one the piece since; a request's recovery checkpoints then its
        `session_piece`, or one `export_session`), for a session whose replica died. SessionExists,
        MemoryFull, or a SnapshotError when the chain is damaged; nothing is kept then."""
        if not chain:
            raise InvalidInput("a session's chain holds at least one state")
        if len(chain) == 1:
            return self.import_session(name, chain[0])
        if self.sessions.get(name) is not None:
            raise SessionExists(f"session {name!r} exists already")
        max_bytes = self.memory.max_snapshot_bytes + MAX_HEADER_BYTES
        states = [SequenceState.decode(data, max_bytes=max_bytes) for data in chain]
        last = states[-1]
        self._check_vocab(last.history, "the session's")
        restoring = f"session-restore:{name}"  # read as a migration's pieces are, into one kept sequence id
        for state in states:
            if state.snapshot:
                self.receive(restoring, state.snapshot)  # MemoryFull or a SnapshotError: nothing kept
        seq = self.incoming.pop(restoring, None)
        held = self.memory.seq_pos_max(seq) if seq is not None else -1
        if held != last.fed - 1:
            if seq is not None:
                self._release_seq(seq)
            raise SnapshotCorrupt(f"the session's chain holds positions up to {held}; its last state says "
                                  f"{last.fed} tokens")  # fmt: skip
        history = list(last.history)
        self.sessions.sessions[name] = Session(name, history[: last.fed], history, seq, last_used=next(self._arrivals))

    def _place_snapshot(self, data: bytes, fed: int) -> int | None:
        """Read a one-sequence snapshot that holds `fed` tokens into a free sequence id, evicting
        idle sessions for room; None when there is none, after checking it as far as memory can
        without reading it (its format, its model). SnapshotError when it is bad."""
        seq = self._free_seq()
        if seq is not None:
            try:
                if not self._read_state(data, seq):
                    self.free_seqs.append(seq)
                    self._check_snapshot(data)
                    return None
            except BaseException:
                self.free_seqs.append(seq)
                raise
            if self.memory.seq_pos_max(seq) != fed - 1:
                self._release_seq(seq)
                raise SnapshotCorrupt(f"the session's memory holds positions up to {self.memory.seq_pos_max(seq)}; "
                                      f"its header says {fed} tokens")  # fmt: skip
            return seq
        self._check_snapshot(data)
        return None

    def _check_snapshot(self, data: bytes) -> None:
        doc = snapshot_format.decode(data, max_bytes=self.memory.max_snapshot_bytes)
        snapshot_format.check_compatible(doc, self.memory.spec)
        if doc.seq is None:
            raise SnapshotIncompatible("a session's snapshot holds one sequence; this one holds every sequence")

    def fork_session(self, name: str, new_name: str) -> None:
        """A new session `new_name` holding what session `name` holds, sharing its attention cells
        (copy-on-write; a recurrent state is copied). SessionExists, UnknownSession or SessionBusy,
        nothing changed."""
        if self.sessions.get(new_name) is not None:
            raise SessionExists(f"session {new_name!r} exists already; fork under another id")
        source = self._idle_session(name)
        fork = Session(new_name, list(source.tokens), list(source.history), last_used=next(self._arrivals))
        if source.seq is not None and source.tokens:
            fork.seq = self._free_seq(keep=source.seq)
            if fork.seq is not None:
                self.memory.seq_cp(source.seq, fork.seq)
            else:  # no sequence id to share with: the fork keeps a copy on the host
                fork.snapshot = self.memory.state_write(source.seq)
        elif source.snapshot is not None:
            fork.snapshot = source.snapshot
        self.sessions.sessions[new_name] = fork

    def truncate_session(self, name: str, n_tokens: int) -> None:
        """Keep the first `n_tokens` of session `name`. CannotTruncate, nothing changed, where its
        memory cannot cut back there (a recurrent state has folded every token in: it can only be
        dropped whole, to 0 tokens); UnknownSession, SessionBusy, or InvalidInput for a bad count."""
        session = self._idle_session(name)
        if not isinstance(n_tokens, int) or not 0 <= n_tokens <= len(session.history):
            held = len(session.history)
            raise InvalidInput(f"n_tokens must be in 0 .. {held} (the session's tokens), got {n_tokens!r}")
        if n_tokens < len(session.tokens) and session.snapshot is not None and not self._restore_for_cut(session):
            raise CannotTruncate(f"session {name!r} is held on the host and memory has no room to cut it now; retry")
        if n_tokens < len(session.tokens) and session.seq is not None:
            if not self.memory.seq_rm(session.seq, n_tokens, None):
                fed = len(session.tokens)
                raise CannotTruncate(
                    f"session {name!r}'s memory cannot be cut back to {n_tokens} tokens: a recurrent state has "
                    f"folded in all {fed} (truncate to 0 to drop it, or to {fed} or more)"
                )
            session.tokens = session.tokens[:n_tokens]
        session.history = session.history[:n_tokens]

    def _restore_for_cut(self, session: Session) -> bool:
        """Bring an evicted session's state back into memory (so it can be cut); False if no room."""
        assert session.snapshot is not None
        seq = self._free_seq()
        if seq is None:
            return False
        if not self._read_state(session.snapshot, seq):
            self.free_seqs.append(seq)
            return False
        session.seq, session.snapshot = seq, None
        return True

    def _idle_session(self, name: str) -> Session:
        session = self.sessions.get(name)
        if session is None:
            raise UnknownSession(f"no session {name!r}")
        if session.busy or self.session_in_use(name):
            raise SessionBusy(f"session {name!r} is busy with a request; cancel it or wait for it to end")
        return session

    def drop_session(self, name: str) -> bool:
        """Forget session `name` and free what it holds (memory, or its host snapshot); False when
        there is no such session. SessionBusy, nothing changed, while a request runs on it."""
        session = self.sessions.get(name)
        if session is None:
            return False
        if session.busy or self.session_in_use(name):
            raise SessionBusy(f"session {name!r} is busy with a request; cancel it or wait for it to end")
        if session.seq is not None:
            self._release_seq(session.seq)
        self.sessions.drop(name)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Run one batch; returns the tokens it produced."""
        admit, prefill_limit = True, None
        # A session restored for a request that then could not be admitted stays in memory, idle:
        # evicting it to make this step fit would let the next plan restore it again, forever.
        self._restored_in_step = set()
        while True:
            plan = self._plan(admit, prefill_limit)
            if plan is None:
                self._check_progress()
                return []
            try:
                logits = self.model.decode(self.memory, plan.batch, n_ubatch=self.config.n_ubatch)
                break
            except MemoryFull:
                self.counters["step_retries"] += 1
                self._unadmit(plan)
                floor = 0 if plan.decode_tokens else 1  # a step must feed something
                if self._drop_incoming() or self.prefix.evict() or self._evict_one(spare=self._restored_in_step):
                    continue
                if self._evict_one():  # one this step restored for a request it could not admit after all:
                    admit = False  # it goes, and no admission brings it back before the step has run
                    continue
                if plan.prefill_tokens > floor:  # then new requests and prefill chunks, halved
                    prefill_limit = max(floor, plan.prefill_tokens // 2)
                elif not self._preempt():
                    raise EngineStalled(
                        f"one running request's step of {len(plan.positions)} tokens does not fit an otherwise "
                        f"empty memory ({self.memory.stats()})"
                    ) from None
                else:
                    admit = False
        self.counters["steps"] += 1
        for s, n in plan.fed:
            decoding = s.decoding and n == 1
            s.fed += n
            self.counters["decode_tokens" if decoding else "prefill_tokens"] += n
        if self.config.prefix_cache_seqs:
            for s, _ in plan.fed:
                self._checkpoint(s)
        events = []
        logits = self.model.backend.to_host(logits)  # sampling runs on the host: one copy of the rows, not one a row
        for s, row in plan.sampling:
            events += self._advance(s, logits[row])
        if self.config.checkpoint_every:
            self._take_checkpoints(plan)
        return events

    def _check_progress(self) -> None:
        """Nothing could be planned: fine while requests run or nothing waits; a waiting request with
        nothing running would wait forever (its admission made all the room there is)."""
        if self.waiting and not self.running:
            head = self.waiting[0]
            raise EngineStalled(
                f"request {head.request.id} waits with nothing running ({len(head.next_input())} tokens to feed, "
                f"room {self.memory.room_to_grow()}, free ids {len(self.free_seqs)})"
            )

    def _checkpoint(self, s: _Sequence) -> None:
        """Offer the prefix cache what s's prefill has just reached: with recurrent layers every
        stride boundary (the state is exactly there now), else the prompt's last full block once
        its prefill is done."""
        if s.seq is None or s.output:
            return
        prompt = list(s.request.prompt)
        if self.checkpoint_stride:
            if 0 < s.fed < len(prompt) and s.fed % self.checkpoint_stride == 0:
                self.prefix.add(s.seq, prompt, s.fed)
        elif s.fed == len(prompt):
            depth = len(prompt) // self.config.prefix_block * self.config.prefix_block
            if depth:
                self.prefix.add(s.seq, prompt, depth)

    def _plan(self, admit: bool, prefill_limit: int | None) -> _Plan | None:
        """This step's batch: a token for each decoding sequence, then prefill chunks of the running
        sequences and of newly admitted ones, `prefill_limit` tokens of them at most."""
        budget = self.config.max_batch_tokens
        plan = _Plan(self.checkpoint_stride if self.config.prefix_cache_seqs else None)
        for s in self.running:
            if s.decoding and budget > 0:
                budget -= plan.add(s, 1)
        plan.decode_tokens = len(plan.positions)
        if prefill_limit is not None:
            budget = min(budget, prefill_limit)
        for s in self.running:
            if not s.decoding and budget > 0:
                budget -= plan.add(s, budget)
        for s in list(self.waiting) if admit else []:
            if budget <= 0:
                break
            session = self.sessions.get(s.request.session) if s.request.session else None
            if session is not None and session.busy:
                continue  # one request of a session at a time: this one waits for the other
            if not self._admit(s, session, plan):
                break  # first come, first served: no younger request overtakes it
            self.waiting.remove(s)
            bisect.insort(self.running, s, key=lambda r: r.arrival)
            plan.admitted.append(s)
            budget -= plan.add(s, budget)
        plan.prefill_tokens = len(plan.positions) - plan.decode_tokens
        return plan if plan.positions else None

    def _admit(self, s: _Sequence, session: Session | None, plan: _Plan) -> bool:
        """Give the waiting sequence `s` a sequence id (its session's, restored if need be), making
        room by evicting idle sessions and cached prefixes; False, nothing changed for s, when it
        must wait."""
        if session is not None and session.seq is not None:
            s.seq = session.seq
        else:
            s.seq = self._free_seq()
            if s.seq is None:
                return False
            restored = session is None or session.snapshot is None or self._restore(session, s.seq)
            if not restored or (s.swapped is not None and not self._swap_in(s)):
                self.free_seqs.append(s.seq)  # nothing was read into it
                s.seq = None
                return False
        if session is not None:
            session.busy = True
            session.seq = s.seq
            self._reuse(s, session.tokens)
        elif s.fed == 0 and s.swapped is None and self.config.prefix_cache_seqs:
            hit = self.prefix.lookup(list(s.request.prompt))
            if hit is not None:
                s.fed = self.prefix.apply(hit, s.seq)
        while not self._room_for(s, plan) and (self._evict_one(keep=s.seq) or self.prefix.evict()):
            pass
        if not self._room_for(s, plan):
            self._release_admission(s, session)
            return False
        if s.swapped is not None:  # admitted for good: its swapped state is back in memory
            self.counters["swap_ins"] += 1
            s.swapped = None
        if s.cached is None:
            s.cached = s.fed
        return True

    def _room_for(self, s: _Sequence, plan: _Plan) -> bool:
        """Whether memory has room to admit `s`: its whole input beside this step's other tokens,
        so admitting never forces a preemption; after `max_preemptions` preemptions, all it and
        the running requests can still need (see the module's policy). Memory that does not grow
        with tokens always has room; its batch plan still has the last word."""
        room = self.memory.room_to_grow()
        if room is None:
            return True
        if s.preemptions >= self.config.max_preemptions:
            return room >= s.need + sum(r.need for r in self.running)
        return room >= len(plan.positions) + len(s.next_input())

    def _swap_in(self, s: _Sequence) -> bool:
        """Restore a sequence preempted by swapping into its new sequence id."""
        assert s.seq is not None and s.swapped is not None
        try:
            if not self._read_state(s.swapped, s.seq):
                return False
        except SnapshotError:  # an attached state memory cannot read after all: recompute it instead
            s.swapped, s.fed = None, 0  # (from its tokens: the same output)
            return True
        s.fed = s.swapped_fed
        return True

    def _read_state(self, snapshot: bytes, seq: int) -> bool:
        """Restore `snapshot` into `seq`, evicting idle sessions and cached prefixes to make room;
        False, memory unchanged, when there is none."""
        while True:
            try:
                self.memory.state_read(snapshot, seq=seq)
                return True
            except MemoryFull:
                if not (self.prefix.evict() or self._evict_one(keep=seq)):
                    return False

    def _reuse(self, s: _Sequence, held: list[int]) -> None:
        """Keep what memory holds for the session that the new prompt repeats; cut the rest. A
        state that cannot be cut (recurrent) or a window cut too short is recomputed whole."""
        assert s.seq is not None
        prompt = list(s.request.prompt)
        common = 0
        for a, b in zip(held, prompt, strict=False):
            if a != b:
                break
            common += 1
        keep = min(common, len(prompt) - 1)  # at least one token must be fed to get logits
        if not self.memory.seq_rm(s.seq, keep, None) or (
            keep > 0 and self.memory.seq_pos_min(s.seq) > self.memory.seq_pos_max(s.seq)
        ):
            self.memory.seq_rm(s.seq)
            keep = 0
        s.fed = keep
        if keep:
            self.counters["session_hits"] += 1
            self.counters["session_tokens_reused"] += keep

    def _restore(self, session: Session, seq: int) -> bool:
        assert session.snapshot is not None
        if not self._read_state(session.snapshot, seq):
            return False
        session.snapshot = None
        self.counters["session_restores"] += 1
        self._restored_in_step.add(session.name)
        return True

    def _free_seq(self, keep: int | None = None) -> int | None:
        """A sequence id to use, evicting idle sessions (but `keep`'s) until one is free; None when
        none can be."""
        while not self.free_seqs and self._evict_one(keep=keep):
            pass
        return self.free_seqs.pop() if self.free_seqs else None

    def _evict_one(self, keep: int | None = None, spare: Collection[str] = ()) -> bool:
        """Move the least recently used idle session's state (but `keep`'s, and those in `spare`) out
        to the host store."""
        session = self.sessions.idle_resident(exclude=keep, spare=spare)
        if session is None or session.seq is None:
            return False
        seq = session.seq
        self.sessions.evicted(session, self.memory.state_write(seq))
        self._release_seq(seq)
        self.counters["session_evictions"] += 1
        return True

    def _release_seq(self, seq: int) -> None:
        """Drop what memory holds for `seq` and hand the id out again."""
        self.memory.seq_rm(seq)
        self.free_seqs.append(seq)

    def _release_admission(self, s: _Sequence, session: Session | None) -> None:
        """Undo `_admit` for a sequence that must wait after all (its session keeps its state)."""
        assert s.seq is not None
        if session is not None:
            session.busy = False
            session.tokens = s.tokens()[: s.fed]
        else:
            self._release_seq(s.seq)
        s.seq, s.fed = None, 0

    def _unadmit(self, plan: _Plan) -> None:
        """The requests this plan admitted wait again, unless admitting them read state into memory
        (a swap-in, a session's or a cached prefix), which they keep: they run, or are preempted."""
        for s in plan.admitted:
            if s.fed == 0 and s in self.running:
                self.running.remove(s)
                session = self.sessions.get(s.request.session) if s.request.session else None
                self._release_admission(s, session)
                bisect.insort(self.waiting, s, key=lambda w: w.arrival)

    def _advance(self, s: _Sequence, logits: np.ndarray) -> list[TokenEvent]:
        params = s.request.params
        chosen: Sample = sample(logits, params, s.sampler)
        s.output.append(chosen.token)
        self.counters["tokens_out"] += 1
        now = time.monotonic()
        if s.last_token_at is None:
            self.latency["ttft"].append(now - s.arrived)
        else:
            self.latency["itl"].append(now - s.last_token_at)
        s.last_token_at = now
        reason = None
        if (
            chosen.token in self.model.tokenizer.eos_ids and not params.ignore_eos
        ) or chosen.token in params.stop_token_ids:
            reason, text = "stop", self._drain(s)  # the end token itself is not text
        else:
            text, hit = s.stops.push(s.detok.push(chosen.token))
            if hit:
                reason = "stop"
            elif len(s.output) >= params.max_tokens:
                reason, text = "length", text + self._drain(s)
        if reason is None:
            return [TokenEvent(s.request.id, chosen.token, text, chosen.logprob, chosen.top_logprobs)]
        self._finish(s)
        return [TokenEvent(s.request.id, chosen.token, text, chosen.logprob, chosen.top_logprobs, reason,
                           len(s.request.prompt), s.cached or 0)]  # fmt: skip

    def _drain(self, s: _Sequence) -> str:
        """At the end: what the detokenizer and the stop matcher still held (unless a stop begins in it)."""
        tail, hit = s.stops.push(s.detok.flush())
        return tail if hit else tail + s.stops.flush()

    def _finish(self, s: _Sequence, keep_session: bool = True) -> None:
        """The request is done: free its sequence, or keep it as its session's state."""
        if s.seq is not None:
            if s.request.session and keep_session:
                history = s.tokens()
                self.sessions.keep(s.request.session, history[: s.fed], s.seq, next(self._arrivals), history)
            else:
                self._release_seq(s.seq)
                if s.request.session:
                    self.sessions.drop(s.request.session)
            s.seq = None
        if s in self.running:
            self.running.remove(s)
        if s in self.waiting:
            self.waiting.remove(s)

    def _preempt(self) -> bool:
        """Free the youngest running sequence's cells: its state is swapped out as a snapshot (or,
        for a short one under "auto", dropped to be recomputed); it goes back to its place in line.
        False when there is nothing left to preempt."""
        if len(self.running) <= 1:
            return False
        victim = self.running[-1]  # the running are kept in arrival order
        assert victim.seq is not None
        mode = self.config.preempt
        if mode == "swap" or (mode == "auto" and victim.fed >= self.config.swap_min_tokens):
            victim.swapped, victim.swapped_fed = self.memory.state_write(victim.seq), victim.fed
            self.counters["swap_outs"] += 1
        self._release_seq(victim.seq)
        self.running.remove(victim)
        if victim.request.session:  # its state leaves with it (swapped, or recomputed on resume)
            self.sessions.drop(victim.request.session)
        victim.seq, victim.fed = None, 0
        victim.preemptions += 1
        self.counters["most_preemptions"] = max(self.counters["most_preemptions"], victim.preemptions)
        bisect.insort(self.waiting, victim, key=lambda w: w.arrival)
        self.counters["preemptions"] += 1
        return True

    # ---- convenience ----------------------------------------------------------------------------

    def chat_request(
        self,
        request_id: str,
        messages: list[dict[str, str]],
        params: SamplingParams | None = None,
        session: str | None = None,
    ) -> Request:
        """A request whose prompt is the conversation rendered by the model's chat template."""
        text = self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = tuple(self.model.tokenizer.encode(text))
        return Request(request_id, prompt, params or SamplingParams(), session)

    def stream(self, requests: list[Request]) -> Iterator[TokenEvent]:
        """Run requests, yielding their events as they are produced."""
        for r in requests:
            self.add(r)
        while self.has_work():
            yield from self.step()

    def generate(self, requests: list[Request]) -> dict[str, list[TokenEvent]]:
        """Run requests to completion; their events by request id."""
        out: dict[str, list[TokenEvent]] = {r.id: [] for r in requests}
        for r in requests:
            self.add(r)
        while self.has_work():
            for e in self.step():
                out[e.request_id].append(e)
        return out

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "waiting": len(self.waiting), "running": len(self.running),
                "sessions": len(self.sessions.sessions), "session_store_bytes": self.sessions.stored_bytes(),
                "prefix_queries": self.prefix.queries, "prefix_hits": self.prefix.hits,
                "prefix_hit_tokens": self.prefix.hit_tokens, "prefix_checkpoints": len(self.prefix.checkpoints),
                **{f"{name}_p{q}_s": (float(np.percentile(list(v), q)) if v else None)
                   for name, v in self.latency.items() for q in (50, 99)},
                "memory": self.memory.stats()}  # fmt: skip


def _request_json(s: _Sequence) -> dict[str, Any]:
    """A request's own state as JSON data (what `SequenceState.request` holds): besides its tokens,
    everything that decides its next tokens and text."""
    params = dataclasses.asdict(s.request.params)
    params["stop"], params["stop_token_ids"] = list(params["stop"]), list(params["stop_token_ids"])
    return {
        "id": s.request.id, "prompt_len": len(s.request.prompt), "session": s.request.session, "params": params,
        "sampler": s.sampler.to_json(), "detok": {"ids": s.detok.ids, "prefix": s.detok.prefix, "read": s.detok.read},
        "held": s.stops.held, "cached": s.cached, "preemptions": s.preemptions,
        # where its recovery checkpoints stand, so that wherever it goes on, the chain goes on too
        "checkpointed": {"fed": s.checkpointed_fed, "outputs": s.checkpointed_outputs,
                         "current": s.checkpointed_epoch == s.preemptions},
    }  # fmt: skip


class _Plan:
    """One step's batch under construction. With `stride`, prompt chunks end at multiples of it,
    where the prefix cache takes checkpoints of states that cannot be cut later."""

    def __init__(self, stride: int | None = None) -> None:
        self.stride = stride
        self.positions: list[int] = []
        self.seq_ids: list[int] = []
        self.tokens: list[int] = []
        self.logits: list[bool] = []
        self.fed: list[tuple[_Sequence, int]] = []
        self.sampling: list[tuple[_Sequence, int]] = []  # sequence, its row among the logits
        self.admitted: list[_Sequence] = []  # requests this step admitted
        self.decode_tokens = 0
        self.prefill_tokens = 0

    def add(self, s: _Sequence, budget: int) -> int:
        """Up to `budget` of s's next input tokens; returns how many were taken. The sequence
        samples this step when the chunk ends with the last token it must feed."""
        assert s.seq is not None
        todo = s.next_input()
        take = todo[: max(budget, 0)]
        prompt = len(s.request.prompt)
        if self.stride and s.fed < prompt:
            boundary = (s.fed // self.stride + 1) * self.stride
            if boundary < prompt:
                take = take[: boundary - s.fed]
        if not take:
            return 0
        self.positions += range(s.fed, s.fed + len(take))
        self.seq_ids += [s.seq] * len(take)
        self.tokens += take
        completes = len(take) == len(todo)
        self.logits += [False] * (len(take) - 1) + [completes]
        if completes:  # its logits row: one row per sampling sequence, in order
            self.sampling.append((s, len(self.sampling)))
        self.fed.append((s, len(take)))
        return len(take)

    @property
    def batch(self) -> Batch:
        return Batch(self.positions, self.seq_ids, tokens=self.tokens, logits=np.array(self.logits, dtype=bool))
