"""Recovery in process (`EngineConfig.checkpoint_every`, `Engine.recover`, `Engine.add(replay=)`): an
engine that stops at any step ("dies") leaves checkpoint chains from which another engine continues
each request, replaying the tokens produced since the last checkpoint without sampling them again,
with the tokens, text and logprobs an undisturbed run gives, on every memory kind, under memory
pressure (preemptions restart a chain) too."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statemesh.memory import snapshot as fmt
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Checkpoint, Engine, EngineConfig, Request, TokenEvent
from statemesh.worker.engine.sampling import SamplerState, SamplingParams, _draw, skip_draw
from statemesh.worker.engine.sequence_state import SequenceState

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KINDS = ["llama", "gemma2", "mistral", "mamba2", "jamba", "bamba", "falcon_h1"]
SEEDED = SamplingParams(max_tokens=30, temperature=0.9, top_k=40, top_p=0.95, seed=11, repetition_penalty=1.1,
                        frequency_penalty=0.3, logprobs=1, ignore_eos=True)  # fmt: skip
GREEDY = SamplingParams(max_tokens=30, temperature=0.0, logprobs=1, ignore_eos=True)


@cache
def model(name: str) -> Model:
    return load_model(FIXTURES / name, backend="numpy", progress=False)


def requests() -> list[Request]:
    return [Request("a", tuple(range(30, 70)), SEEDED), Request("b", tuple(range(80, 95)), GREEDY),
            Request("c", (7, 8, 9), SamplingParams(**{**SEEDED.__dict__, "seed": 5}))]  # fmt: skip


class Coordinator:
    """What the service's coordinator keeps per request: the tokens it passed on, and the chain."""

    def __init__(self) -> None:
        self.events: dict[str, list[TokenEvent]] = {}
        self.chains: dict[str, list[Checkpoint]] = {}

    def take(self, engine: Engine, events: list[TokenEvent]) -> None:
        for e in events:
            self.events.setdefault(e.request_id, []).append(e)
        for c in engine.checkpoints:
            chain = self.chains.setdefault(c.request_id, [])
            if c.p0 == 0:
                chain.clear()  # a whole one starts the chain anew
            chain.append(c)
        engine.checkpoints.clear()

    def finished(self, request_id: str) -> bool:
        got = self.events.get(request_id, [])
        return bool(got) and got[-1].finish_reason is not None


def same(got: list[TokenEvent], want: list[TokenEvent]) -> None:
    assert [(e.token, e.text) for e in got] == [(e.token, e.text) for e in want]
    for a, b in zip(got, want, strict=True):  # batched differently: float noise only
        assert a.logprob is not None and b.logprob is not None and abs(a.logprob - b.logprob) < 1e-4


def take_over(engine: Engine, seen: Coordinator) -> None:
    """Continue every unfinished request of `seen` on `engine`, as the coordinator would."""
    for r in requests():
        if seen.finished(r.id):
            continue
        delivered = tuple(e.token for e in seen.events.get(r.id, []))
        chain = seen.chains.get(r.id)
        if chain:  # from its checkpoints, replaying what came after the last
            replay = delivered[chain[-1].n_outputs :]
            assert engine.recover([c.data for c in chain], replay, f"rec-{r.id}") == r.id
        else:  # none yet: from its prompt, with the same seed, replaying what it produced
            engine.add(r, replay=delivered)


def run_for(engine: Engine, seen: Coordinator, steps: int | None) -> None:
    n = 0
    while engine.has_work() and (steps is None or n < steps):
        seen.take(engine, engine.step())
        n += 1


@pytest.mark.parametrize("name", KINDS)
@settings(max_examples=settings.default.max_examples // 25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(every=st.integers(1, 12), dies_after=st.integers(0, 40),
       dies_again_after=st.one_of(st.none(), st.integers(0, 20)),
       n_ctx=st.sampled_from([96, 512]), max_batch_tokens=st.sampled_from([7, 64]))  # fmt: skip
def test_requests_of_an_engine_that_dies_continue_elsewhere_with_the_same_tokens(
    name: str, every: int, dies_after: int, dies_again_after: int | None, n_ctx: int, max_batch_tokens: int
) -> None:
    """The second engine may die too: the third goes on from the chain the second continued."""
    alone = Engine(model(name), EngineConfig(n_ctx=512, n_seq_max=3)).generate(requests())
    config = EngineConfig(n_ctx=n_ctx, n_seq_max=3, max_batch_tokens=max_batch_tokens, checkpoint_every=every)
    dying = Engine(model(name), config)  # n_ctx 96: the three do not fit at once, preemptions come
    seen = Coordinator()
    for r in requests():
        dying.add(r)
    run_for(dying, seen, dies_after)
    roomy = EngineConfig(n_ctx=512, n_seq_max=4, prefix_cache_seqs=0, checkpoint_every=every)
    second = Engine(model(name), roomy)
    take_over(second, seen)
    run_for(second, seen, dies_again_after)
    if second.has_work():
        third = Engine(model(name), roomy)
        take_over(third, seen)
        run_for(third, seen, None)
        third.memory.check_integrity()
        assert not third.incoming
    else:
        second.memory.check_integrity()
    for rid, want in alone.items():
        same(seen.events[rid], want)


def test_checkpoints_are_pieces_whose_size_does_not_grow_with_the_sequence() -> None:
    m = model("llama")
    engine = Engine(m, EngineConfig(n_ctx=512, n_seq_max=2, checkpoint_every=8))
    engine.add(Request("long", tuple(range(20, 320)), GREEDY))
    sizes, spans = [], []
    while engine.has_work():
        engine.step()
        for c in engine.checkpoints:
            doc = fmt.decode(SequenceState.decode(c.data, max_bytes=1 << 30).snapshot)
            spans.append((c.p0, doc.span.p0, c.fed, c.n_outputs))
            sizes.append(len(SequenceState.decode(c.data, max_bytes=1 << 30).snapshot))
        engine.checkpoints.clear()
    assert spans[0][0] == 0 and spans[0][3] == 1  # the first: the whole sequence, after its first token
    assert all(p0 == prev_fed for (p0, _, _, _), (_, _, prev_fed, _) in zip(spans[1:], spans, strict=False))
    assert all(n - prev_n == 8 for (_, _, _, n), (_, _, _, prev_n) in zip(spans[1:], spans, strict=False))
    assert max(sizes[1:]) * 20 < sizes[0]  # 8 tokens' cells against 300
    assert len(set(sizes[1:])) == 1  # the same size, however long the sequence is


@settings(max_examples=settings.default.max_examples, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), n=st.integers(1, 200), top_k=st.integers(0, 50),
       top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.5))  # fmt: skip
def test_a_skipped_draw_leaves_the_generator_where_a_draw_leaves_it(
    seed: int, n: int, top_k: int, top_p: float, min_p: float
) -> None:
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    logits = np.random.default_rng(seed % 1000).normal(size=n)
    drawn, skipped = SamplerState.start(params, []), SamplerState.start(params, [])
    _draw(logits, params, drawn)
    skip_draw(skipped)
    assert drawn.rng == skipped.rng


@pytest.mark.parametrize("name", KINDS)
@settings(max_examples=settings.default.max_examples // 25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(every=st.integers(1, 12), first=st.integers(1, 40), budget=st.sampled_from([2048, 256]))
def test_a_session_restored_from_its_saved_chain_goes_on_with_the_same_tokens(
    name: str, every: int, first: int, budget: int
) -> None:
    """A session's state as the coordinator saves it at a turn's end (the turn's checkpoints, then
    `session_piece` since the last of them), restored on another engine (`restore_session`): its
    next turn equals that of an undisturbed engine, with a roomy or a small cache (`budget` cells)."""
    turns = [tuple(range(20, 20 + first)), (5, 6, 7, 8)]
    params = SamplingParams(**{**SEEDED.__dict__, "max_tokens": 12})

    def session_turn(engine: Engine, i: int, seen: Coordinator) -> list[TokenEvent]:
        request = Request(f"t{i}", tuple((engine.session_history("s") or []) + list(turns[i])), params, "s")
        engine.add(request)
        run_for(engine, seen, None)
        return seen.events[request.id]

    undisturbed = Engine(model(name), EngineConfig(n_ctx=2048, n_seq_max=2))
    undisturbed.open_session("s")
    session_turn(undisturbed, 0, Coordinator())
    want = session_turn(undisturbed, 1, Coordinator())

    config = EngineConfig(n_ctx=budget, n_seq_max=2, checkpoint_every=every)
    first_engine = Engine(model(name), config)
    first_engine.open_session("s")
    seen = Coordinator()
    session_turn(first_engine, 0, seen)
    chain = seen.chains["t0"]
    piece, p0 = first_engine.session_piece("s", chain[-1].fed)
    saved = [c.data for c in chain] + [piece] if p0 else [piece]

    second = Engine(model(name), config)
    second.restore_session("s", saved)
    assert second.session_history("s") == first_engine.session_history("s")
    same(session_turn(second, 1, Coordinator()), want)
