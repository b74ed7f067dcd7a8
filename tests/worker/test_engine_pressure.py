"""The engine under memory pressure (issue 13), tested over the space rather than at a few points.

Hypothesis draws a model of every memory kind (full attention, all-layer windows, interleaved
windows, recurrent, each hybrid), a workload (requests that share prompt prefixes, arrive over time,
get cancelled, come back as a session's second turn; greedy or seeded sampling) and an engine config
from just enough memory to roomy: `n_ctx`, `n_seq_max`, `max_batch_tokens`, `n_ubatch`, the
preemption mode and bound, the prefix cache, the session store. It runs the workload in that engine
and in a roomy one, and asserts:
- every request's tokens equal the roomy run's (a cancelled request's are a prefix of them);
- no exception escapes (every request fits alone, so none is refused);
- `check_integrity()` holds after every step, and the engine never loops without progress;
- no request is preempted more than `max_preemptions` times;
- when everything has ended and the sessions are dropped, the memory is empty.

Greedy tokens are compared exactly up to the first difference; there, the roomy run's two best
logprobs must be within `NEAR_TIE` (a near-tie that float differences between batch layouts may
legitimately flip) and every logprob before it must agree to `LOGPROB_TOL`. Seeded sampling is
compared exactly (a draw flips only when it lands within float noise of a boundary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request, TokenEvent
from statemesh.worker.engine.sampling import SamplingParams

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODELS = {  # one or more of every memory kind
    "llama": "kv",
    "mistral": "all layers windowed",
    "gemma2": "iswa",
    "gemma3": "iswa",
    "mamba": "recurrent",
    "mamba2": "recurrent",
    "bamba": "hybrid",
    "jamba": "hybrid",
    "falcon_h1": "hybrid",
    "granitemoehybrid": "hybrid",
    "nemotron_h": "hybrid",
}
NEAR_TIE = 1e-3
LOGPROB_TOL = 1e-3
STEP_LIMIT = 5000  # far more than any drawn workload needs: more means the engine loops
EXAMPLES = max(settings().max_examples // 5, 10)  # 30 under `make test`, 300 under `make test-thorough`


@cache
def model(name: str) -> Model:
    return load_model(FIXTURES / name, backend="numpy", progress=False)


@dataclass(frozen=True)
class FirstTurn:
    request: Request
    arrives: int  # the step before which it is added


@dataclass(frozen=True)
class NextTurn:
    session: str
    new_tokens: tuple[int, ...]  # after the first turn's prompt and output
    params: SamplingParams


@dataclass(frozen=True)
class Workload:
    first: tuple[FirstTurn, ...]
    next_turns: tuple[NextTurn, ...]
    cancel: tuple[str, int] | None  # a request cancelled before this step

    @property
    def longest(self) -> int:
        """The most cells any one request needs: prompt + max_tokens (a next turn repeats its
        first turn's prompt and output)."""
        first = {t.request.session: t.request for t in self.first}
        need = [len(t.request.prompt) + t.request.params.max_tokens for t in self.first]
        for turn in self.next_turns:
            before = first[turn.session]
            prompt = len(before.prompt) + before.params.max_tokens + len(turn.new_tokens)
            need.append(prompt + turn.params.max_tokens)
        return max(need)


@dataclass
class Outcome:
    events: dict[str, list[TokenEvent]] = field(default_factory=dict)
    most_preemptions: int = 0

    def tokens(self, request_id: str) -> list[int]:
        return [e.token for e in self.events[request_id] if e.token >= 0]


@st.composite
def params(draw: st.DrawFn, max_tokens: int) -> SamplingParams:
    greedy = draw(st.booleans())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if greedy else 0.9,
        top_k=0 if greedy else draw(st.sampled_from([0, 20])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.0, 1.3])),
        seed=None if greedy else draw(st.integers(0, 1000)),
        logprobs=2,  # to tell a legitimate flip (see the module's docstring) from a wrong distribution
        ignore_eos=True,
    )


tokens = st.integers(1, 383)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    shared = draw(st.lists(tokens, min_size=8, max_size=40), label="shared prefix")
    first, next_turns = [], []
    for i in range(draw(st.integers(2, 6), label="requests")):
        reuse = draw(st.sampled_from([0, len(shared) // 2, len(shared)]))
        prompt = (*shared[:reuse], *draw(st.lists(tokens, min_size=1, max_size=24)))
        session = f"s{i}" if draw(st.booleans()) else None
        request = Request(f"r{i}", prompt, draw(params(draw(st.integers(4, 32)))), session)
        first.append(FirstTurn(request, draw(st.integers(0, 4))))
        if session is not None and draw(st.booleans()):
            new = tuple(draw(st.lists(tokens, min_size=1, max_size=8)))
            next_turns.append(NextTurn(session, new, draw(params(draw(st.integers(1, 8))))))
    cancellable = [t.request.id for t in first if t.request.session is None]
    cancel = None
    if cancellable and draw(st.booleans()):
        cancel = (draw(st.sampled_from(cancellable)), draw(st.integers(0, 12)))
    return Workload(tuple(first), tuple(next_turns), cancel)


@st.composite
def tight_configs(draw: st.DrawFn, workload: Workload) -> EngineConfig:
    return EngineConfig(
        n_ctx=workload.longest + draw(st.sampled_from([0, 0, 1, 4, 16, 64]), label="n_ctx above just enough"),
        n_seq_max=draw(st.integers(1, 6), label="n_seq_max"),
        max_batch_tokens=draw(st.sampled_from([1, 2, 7, 16, 32, 64, 512]), label="max_batch_tokens"),
        n_ubatch=draw(st.sampled_from([1, 3, 8, 32, 512]), label="n_ubatch"),
        preempt=draw(st.sampled_from(["swap", "recompute", "auto"]), label="preempt"),
        swap_min_tokens=draw(st.sampled_from([1, 32]), label="swap_min_tokens"),
        max_preemptions=draw(st.integers(0, 3), label="max_preemptions"),
        prefix_cache_seqs=draw(st.sampled_from([0, 2, 8]), label="prefix_cache_seqs"),
        prefix_block=draw(st.sampled_from([4, 16]), label="prefix_block"),
        prefix_stride_blocks=draw(st.sampled_from([1, 2]), label="prefix_stride_blocks"),
        session_store_bytes=draw(st.sampled_from([1, 1 << 30]), label="session_store_bytes"),  # 1: forgotten
    )


ROOMY = EngineConfig(n_ctx=1024, n_seq_max=8)


def run(name: str, config: EngineConfig, workload: Workload, cancel: bool) -> Outcome:
    """The workload in an engine of `config`: first turns arrive over the first steps (one may be
    cancelled), then the sessions' next turns arrive together; integrity is checked after every step."""
    engine = Engine(model(name), config)
    outcome = Outcome()
    arrivals = sorted(workload.first, key=lambda t: t.arrives)
    for t in workload.first:
        outcome.events[t.request.id] = []
    step = 0

    def drain(pending: list[FirstTurn]) -> None:
        nonlocal step
        while pending or engine.has_work():
            while pending and pending[0].arrives <= step:
                engine.add(pending.pop(0).request)
            if cancel and workload.cancel and workload.cancel[1] == step:
                for e in engine.cancel(workload.cancel[0]):
                    outcome.events[e.request_id].append(e)
            for e in engine.step():
                outcome.events[e.request_id].append(e)
            engine.memory.check_integrity()
            step += 1
            assert step < STEP_LIMIT, f"no end after {step} steps: {engine.stats()}"

    drain(arrivals)
    first = {t.request.session: t.request for t in workload.first}
    for i, turn in enumerate(workload.next_turns):
        before = first[turn.session]
        prompt = (*before.prompt, *outcome.tokens(before.id), *turn.new_tokens)
        request = Request(f"n{i}", prompt, turn.params, turn.session)
        outcome.events[request.id] = []
        engine.add(request)
    drain([])
    outcome.most_preemptions = engine.counters["most_preemptions"]
    for session in list(engine.sessions.sessions):
        assert engine.drop_session(session)
    while engine.prefix.evict():
        pass
    stats = engine.memory.stats()
    assert engine.memory.seq_ids() == [] and stats["cells_used"] == 0, stats
    engine.memory.check_integrity()
    return outcome


def assert_same_tokens(request_id: str, roomy: list[TokenEvent], tight: list[TokenEvent], prefix: bool) -> None:
    got = [e.token for e in tight if e.token >= 0]
    want = [e.token for e in roomy]
    assert len(got) == len(want) or (prefix and len(got) <= len(want)), (request_id, got, want)
    for i, (a, b) in enumerate(zip(want, got, strict=False)):
        if a == b:
            continue
        # A legitimate flip: the distributions agree up to and at token i, and there a greedy
        # choice was a near-tie, or a seeded draw landed within that agreement of a boundary.
        for j in range(i + 1):
            assert [t for t, _ in roomy[j].top_logprobs] == [t for t, _ in tight[j].top_logprobs] or j == i, (
                f"{request_id}: token {j}'s distribution differs: {roomy[j].top_logprobs} vs {tight[j].top_logprobs}"
            )
            for (_, la), (_, lb) in zip(roomy[j].top_logprobs, tight[j].top_logprobs, strict=True):
                assert abs(la - lb) < LOGPROB_TOL, (
                    f"{request_id}: token {j}'s logprobs differ: {roomy[j].top_logprobs} vs {tight[j].top_logprobs}"
                )
        top = roomy[i].top_logprobs
        if roomy[i].logprob is not None and top and roomy[i].logprob == top[0][1]:  # a greedy choice
            gap = top[0][1] - top[1][1]
            assert gap < NEAR_TIE, f"{request_id}: token {i} is {b}, not {a} (top-2 gap {gap:.4f}): {want} vs {got}"
        return


@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=max(EXAMPLES // len(MODELS), 3), suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_pressed_engine_gives_every_request_the_tokens_a_roomy_one_gives(name: str, data: st.DataObject) -> None:
    workload = data.draw(workloads(), label="workload")
    config = data.draw(tight_configs(workload), label="config")
    roomy = run(name, ROOMY, workload, cancel=False)
    tight = run(name, config, workload, cancel=True)
    assert tight.most_preemptions <= config.max_preemptions
    cancelled = workload.cancel[0] if workload.cancel else None
    firsts_equal = {t.request.session: roomy.tokens(t.request.id) == tight.tokens(t.request.id) for t in workload.first}
    for request_id, events in roomy.events.items():
        if request_id.startswith("n"):  # a next turn: comparable when both first turns gave the same
            turn = workload.next_turns[int(request_id[1:])]
            if not firsts_equal[turn.session]:
                continue
        assert_same_tokens(request_id, events, tight.events[request_id], prefix=request_id == cancelled)
