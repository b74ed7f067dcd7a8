"""`Engine`: one model, one `Memory`, many sequences — continuous batching.

Every `step()` builds one batch: a token for each running sequence (decode), then chunks of waiting
prompts (chunked prefill) up to `max_batch_tokens`; the model runs it through memory; each sequence
whose logits came back samples its next token. Requests join and leave at every step.

When memory runs out, the most recently started sequence is preempted: its cells are dropped and it
goes back to the queue with its output so far, to be recomputed (prompt + output) when room frees up;
its sampler state is kept, so it resumes with identical output. A request that could never fit alone
is refused when it is added.

Events stream out of `step()`: token id, the text delta (never a partial UTF-8 character, never any
part of a stop string), logprobs, and on the last one the finish reason.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from statemesh.memory import Batch, MemoryFull
from statemesh.memory.errors import InvalidInput
from statemesh.worker.model import Model
from statemesh.worker.prefix_cache import PrefixCache
from statemesh.worker.sampling import Sample, SamplerState, SamplingParams, sample
from statemesh.worker.sessions import Session, SessionStore
from statemesh.worker.stops import StopMatcher
from statemesh.worker.tokenizer import StreamingDetokenizer


class RequestRefused(InvalidInput):
    """A request that can never run: empty, bad token ids, or too long for the memory."""


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 4096  # token cells of the KV cache, shared by all sequences
    n_seq_max: int = 32  # sequences resident at once
    max_batch_tokens: int = 512  # tokens per step: running decodes first, then prefill chunks
    n_ubatch: int = 512
    session_store_bytes: int = 1 << 30  # host memory for the snapshots of evicted idle sessions
    preempt: str = "auto"  # "swap" the state out as a snapshot, "recompute" it, or "auto"
    swap_min_tokens: int = 32  # auto: swap sequences holding at least this many tokens, recompute shorter ones
    prefix_cache_seqs: int = 8  # sequence ids kept for prefix-cache checkpoints (0: no prefix cache)
    prefix_block: int = 16  # tokens per hashed block
    prefix_stride_blocks: int = 4  # with recurrent layers: a checkpoint every this many blocks of a prompt

    def __post_init__(self) -> None:
        if self.preempt not in ("auto", "swap", "recompute"):
            raise InvalidInput(f"preempt must be 'auto', 'swap' or 'recompute', got {self.preempt!r}")


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


@dataclass
class _Sequence:
    """A request's run state. Memory must hold prompt + output before the next token can be
    sampled; `fed` counts how many of those it holds (0 again after a preemption)."""

    request: Request
    sampler: SamplerState
    detok: StreamingDetokenizer
    stops: StopMatcher
    order: int  # when it (re)started, to preempt the newest first
    output: list[int] = field(default_factory=list)
    seq: int | None = None  # its sequence id in memory while it holds one
    fed: int = 0
    swapped: bytes | None = None  # its state while preempted by swapping, and how much it held
    swapped_fed: int = 0
    arrived: float = 0.0
    last_token_at: float | None = None

    def tokens(self) -> list[int]:
        return [*self.request.prompt, *self.output]

    @property
    def n_tokens(self) -> int:
        return len(self.request.prompt) + len(self.output)

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
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.free_seqs = list(range(self.config.n_seq_max - 1, -1, -1))
        self._order = itertools.count()
        self.sessions = SessionStore(self.config.session_store_bytes)
        self.latency: dict[str, deque[float]] = {"ttft": deque(maxlen=10_000), "itl": deque(maxlen=10_000)}
        self.counters = {
            "preemptions": 0, "prefill_tokens": 0, "decode_tokens": 0, "tokens_out": 0, "steps": 0,
            "session_hits": 0, "session_tokens_reused": 0, "session_evictions": 0, "session_restores": 0,
            "swap_outs": 0, "swap_ins": 0,
        }  # fmt: skip

    # ---- requests ------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; RequestRefused, nothing queued, if it can never run."""
        prompt = list(request.prompt)
        if not prompt:
            raise RequestRefused(f"request {request.id}: the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestRefused(
                f"request {request.id}: token ids {bad[:5]} are outside the vocabulary 0 .. {vocab - 1}"
            )
        need = len(prompt) + request.params.max_tokens
        if self.has_attention and need > self.config.n_ctx:
            raise RequestRefused(
                f"request {request.id}: prompt ({len(prompt)} tokens) + max_tokens ({request.params.max_tokens}) "
                f"= {need} exceeds the context of {self.config.n_ctx} tokens; shorten one of them"
            )
        tokenizer = self.model.tokenizer
        self.waiting.append(
            _Sequence(
                request,
                SamplerState.start(request.params, prompt),
                tokenizer.stream(),
                StopMatcher(request.params.stop),
                next(self._order),
                arrived=time.monotonic(),
            )
        )

    def cancel(self, request_id: str) -> list[TokenEvent]:
        """Stop a request now; its cells are freed at once."""
        for s in [*self.running, *self.waiting]:
            if s.request.id == request_id:
                self._finish(s, keep_session=False)
                return [TokenEvent(request_id, -1, "", finish_reason="cancelled")]
        return []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Run one batch; returns the tokens it produced."""
        admit = True
        while True:
            plan = self._plan(admit)
            if not plan:
                return []
            try:
                logits = self.model.decode(self.memory, plan.batch, n_ubatch=self.config.n_ubatch)
                break
            except MemoryFull:
                for s, _ in plan.fed:  # sequences admitted by this plan go back to the queue
                    if s.fed == 0 and s.seq is not None and s in self.running and not s.output:
                        self._unadmit(s)
                if self.prefix.evict() or self._evict_one():  # cached prefixes and idle sessions
                    continue  # give way before any running sequence does
                if not self._preempt():
                    raise
                admit = False  # no new work in the step that had to preempt
        self.counters["steps"] += 1
        for s, n in plan.fed:
            decoding = n == 1 and len(s.output) > 0 and s.fed == s.n_tokens - 1
            s.fed += n
            self.counters["decode_tokens" if decoding else "prefill_tokens"] += n
        if self.config.prefix_cache_seqs:
            for s, _ in plan.fed:
                self._checkpoint(s)
        events = []
        for s, row in plan.sampling:
            events += self._advance(s, logits[row])
        return events

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

    def _plan(self, admit: bool) -> _Plan | None:
        budget = self.config.max_batch_tokens
        plan = _Plan(self.checkpoint_stride if self.config.prefix_cache_seqs else None)
        for s in list(self.running):  # running sequences first: one decode token each, or prefill
            budget -= plan.add(s, budget)
        while admit and self.waiting and budget > 0 and self._admit(self.waiting[0], plan):
            s = self.waiting.popleft()
            self.running.append(s)
            budget -= plan.add(s, budget)
        return plan if plan.positions else None

    def _admit(self, s: _Sequence, plan: _Plan) -> bool:
        """Give the waiting sequence `s` a sequence id (its session's, restored if need be), making
        room by evicting idle sessions; False, nothing changed for s, when it must wait."""
        session = self.sessions.get(s.request.session) if s.request.session else None
        if session is not None and session.busy:
            return False  # one request of a session at a time
        if session is not None and session.seq is not None:
            s.seq = session.seq
        else:
            while not self.free_seqs and self._evict_one():
                pass
            if not self.free_seqs:
                return False
            s.seq = self.free_seqs.pop()
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
        return True

    def _swap_in(self, s: _Sequence) -> bool:
        """Restore a sequence preempted by swapping into its new sequence id."""
        assert s.seq is not None and s.swapped is not None
        if not self._read_state(s.swapped, s.seq):
            return False
        s.fed = s.swapped_fed
        return True

    def _read_state(self, snapshot: bytes, seq: int) -> bool:
        """Restore `snapshot` into `seq`; False, memory unchanged, when there is no room for it."""
        try:
            self.memory.state_read(snapshot, seq=seq)
        except MemoryFull:
            return False
        return True

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
        return True

    def _evict_one(self, keep: int | None = None) -> bool:
        """Move the least recently used idle session's state out to the host store."""
        session = self.sessions.idle_resident()
        if session is None or session.seq is None or session.seq == keep:
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

    def _room_for(self, s: _Sequence, plan: _Plan) -> bool:
        """Admit a waiting sequence only when its whole input fits beside this step's other tokens
        (attention cells; a recurrent state always has its slot), so admitting never forces the
        preemption of a running sequence."""
        if not self.has_attention:
            return True
        stats = self.memory.stats()
        free = int(stats["cells_total"]) - int(stats["cells_used"])
        return free >= len(plan.positions) + len(s.next_input())

    def _unadmit(self, s: _Sequence) -> None:
        self.running.remove(s)
        session = self.sessions.get(s.request.session) if s.request.session else None
        self._release_admission(s, session)
        self.waiting.appendleft(s)

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
        if reason is not None:
            self._finish(s)
        return [TokenEvent(s.request.id, chosen.token, text, chosen.logprob, chosen.top_logprobs, reason)]

    def _drain(self, s: _Sequence) -> str:
        """At the end: what the detokenizer and the stop matcher still held (unless a stop begins in it)."""
        tail, hit = s.stops.push(s.detok.flush())
        return tail if hit else tail + s.stops.flush()

    def _finish(self, s: _Sequence, keep_session: bool = True) -> None:
        """The request is done: free its sequence, or keep it as its session's state."""
        if s.seq is not None:
            if s.request.session and keep_session:
                self.sessions.keep(s.request.session, s.tokens()[: s.fed], s.seq, next(self._order))
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
        """Free the newest running sequence's cells: its state is swapped out as a snapshot (or, for
        a short one under "auto", dropped to be recomputed); it waits at the queue's head.
        False when there is nothing left to preempt."""
        if len(self.running) <= 1:
            return False
        victim = max(self.running, key=lambda s: s.order)
        assert victim.seq is not None
        mode = self.config.preempt
        if mode == "swap" or (mode == "auto" and victim.fed >= self.config.swap_min_tokens):
            victim.swapped, victim.swapped_fed = self.memory.state_write(victim.seq), victim.fed
            self.counters["swap_outs"] += 1
        self._release_seq(victim.seq)
        self.running.remove(victim)
        if victim.request.session:  # its state leaves with it (swapped, or recomputed on resume)
            self.sessions.drop(victim.request.session)
        victim.seq, victim.fed, victim.order = None, 0, next(self._order)
        self.waiting.appendleft(victim)
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
