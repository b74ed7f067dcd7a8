"""Live migration with a pre-copy, in process (`Engine.precopy` / `receive` / `detach(after=...)` /
`attach(migration_id=...)`): a request whose cells go to another engine in pieces while it keeps
running, then stops for just the last piece, continues there with the tokens, text and logprobs it
would have produced, on every memory kind, whatever the piece sizes and the steps between them;
and when the move fails at any point the request goes on where it was, as if nothing happened."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statemesh.memory import MemoryFull
from statemesh.memory import snapshot as fmt
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request, TokenEvent, UnknownMigration
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.engine.sequence_state import SequenceState

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KINDS = ["llama", "gemma2", "mistral", "mamba2", "jamba", "bamba", "falcon_h1", "nemotron_h"]
PARAMS = SamplingParams(max_tokens=24, temperature=0.8, top_k=50, seed=3, repetition_penalty=1.2, logprobs=1,
                        ignore_eos=True)  # fmt: skip


@cache
def model(name: str) -> Model:
    return load_model(FIXTURES / name, backend="numpy", progress=False)


def requests() -> list[Request]:
    return [
        Request("m", tuple(range(30, 75)), PARAMS),
        Request("s", tuple(range(60, 70)), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)),
    ]


def run(engine: Engine, events: dict[str, list[TokenEvent]], steps: int | None = None) -> None:
    n = 0
    while engine.has_work() and (steps is None or n < steps):
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
        n += 1


def same(got: list[TokenEvent], want: list[TokenEvent]) -> None:
    assert [(e.token, e.text) for e in got] == [(e.token, e.text) for e in want]
    for a, b in zip(got, want, strict=True):  # batched differently: float noise only
        assert (a.logprob is None) == (b.logprob is None)
        assert a.logprob is None or b.logprob is None or abs(a.logprob - b.logprob) < 1e-4


@pytest.mark.parametrize("name", KINDS)
@settings(max_examples=settings.default.max_examples // 25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.integers(0, 12),
    rounds=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3)), min_size=1, max_size=4),
    max_batch_tokens=st.sampled_from([8, 64]),
)
def test_a_precopied_request_continues_in_another_engine_with_the_same_tokens(
    name: str, start: int, rounds: list[tuple[int, int]], max_batch_tokens: int
) -> None:
    alone = Engine(model(name), EngineConfig(n_ctx=256, n_seq_max=2)).generate(requests())
    here = Engine(model(name), EngineConfig(n_ctx=256, n_seq_max=2, max_batch_tokens=max_batch_tokens))
    there = Engine(model(name), EngineConfig(n_ctx=160, n_seq_max=3, prefix_cache_seqs=0))
    events: dict[str, list[TokenEvent]] = {}
    for r in requests():
        here.add(r)
    run(here, events, start)
    if not any(s.request.id == "m" for s in (*here.running, *here.waiting)):
        return  # it finished already
    sent, epoch, moved = 0, None, False
    for size, steps in rounds:  # a piece, then the request goes on decoding here
        piece, info = here.precopy("m", sent, epoch, size)
        if info["p1"] > info["p0"]:
            assert fmt.decode(piece).span.p0 == info["p0"]
            there.receive("mig", piece)
            moved = True
        sent, epoch = info["p1"], info["epoch"]
        run(here, events, steps)
        if not any(s.request.id == "m" for s in (*here.running, *here.waiting)):
            there.abort_incoming("mig")
            break
    else:
        state = here.detach("m", after=sent, epoch=epoch, park=True)
        if moved:
            assert there.attach(state, "mig") == "m"
        else:
            assert there.attach(state) == "m"
        assert here.release("m")
    for engine in (here, there):
        run(engine, events)
        engine.memory.check_integrity()
        assert not engine.incoming and not engine.parked
    for rid, want in alone.items():
        same(events[rid], want)


def test_the_last_piece_does_not_grow_with_the_sequence() -> None:
    """What moves at the pause is the piece since the pre-copy, not the whole sequence."""
    m = model("llama")
    here = Engine(m, EngineConfig(n_ctx=512, n_seq_max=2))
    here.add(Request("m", tuple(range(30, 330)), PARAMS))
    run(here, {}, 3)
    piece, info = here.precopy("m", 0, None, 10_000)
    whole = SequenceState.decode(here.detach("m", park=True), max_bytes=1 << 30)
    here.reattach("m")
    run(here, {}, 1)
    tail = SequenceState.decode(here.detach("m", after=info["p1"], epoch=info["epoch"], park=True), max_bytes=1 << 30)
    assert fmt.decode(tail.snapshot).span == fmt.Span(info["p1"], None)
    assert len(tail.snapshot) * 20 < len(whole.snapshot)
    assert len(piece) > len(tail.snapshot) * 20


@pytest.mark.parametrize("name", ["llama", "jamba"])
def test_a_move_that_fails_leaves_the_request_where_it_was(name: str) -> None:
    alone = Engine(model(name), EngineConfig(n_ctx=256, n_seq_max=2)).generate(requests())
    here = Engine(model(name), EngineConfig(n_ctx=256, n_seq_max=2, max_batch_tokens=16))
    small = Engine(model(name), EngineConfig(n_ctx=24, n_seq_max=2, prefix_cache_seqs=0))
    events: dict[str, list[TokenEvent]] = {}
    for r in requests():
        here.add(r)
    run(here, events, 5)
    piece, info = here.precopy("m", 0, None, 16)
    small.receive("mig", piece)  # the first piece fits
    run(here, events, 2)
    piece, info = here.precopy("m", info["p1"], info["epoch"], 64)
    if name == "llama":  # the rest does not: the target drops what it had
        with pytest.raises(MemoryFull):
            small.receive("mig", piece)
        assert not small.incoming and small.memory.stats()["cells_used"] == 0
    state = here.detach("m", after=info["p0"], epoch=info["epoch"], park=True)
    with pytest.raises((UnknownMigration, MemoryFull)):
        small.attach(state, "mig")
    assert not small.incoming and not small.running and small.memory.stats()["cells_used"] == 0
    here.reattach("m")  # it goes on here
    run(here, events)
    here.memory.check_integrity()
    for rid, want in alone.items():
        same(events[rid], want)


def test_a_request_preempted_during_the_precopy_starts_its_pieces_over() -> None:
    """Pieces written before a preemption may be stale (recomputed cells): the next answer starts
    from 0, and the last piece then replaces everything the target held."""
    m = model("llama")
    alone = Engine(m, EngineConfig(n_ctx=256, n_seq_max=2)).generate(requests())
    here = Engine(m, EngineConfig(n_ctx=256, n_seq_max=2, preempt="recompute"))
    there = Engine(m, EngineConfig(n_ctx=256, n_seq_max=2, prefix_cache_seqs=0))
    events: dict[str, list[TokenEvent]] = {}
    for r in reversed(requests()):  # "m" the youngest: the one preemption takes
        here.add(r)
    run(here, events, 4)
    piece, info = here.precopy("m", 0, None, 100)
    there.receive("mig", piece)
    assert here._preempt()  # as memory pressure would: its cells are dropped, to be recomputed
    assert all(s.request.id != "m" for s in here.running)
    run(here, events, 3)
    again, info2 = here.precopy("m", info["p1"], info["epoch"], 100)
    assert info2["p0"] == 0 and info2["epoch"] == info["epoch"] + 1
    there.receive("mig", again)
    state = here.detach("m", after=info2["p1"], epoch=info2["epoch"], park=True)
    there.attach(state, "mig")
    here.release("m")
    for engine in (here, there):
        run(engine, events)
        engine.memory.check_integrity()
    for rid, want in alone.items():
        same(events[rid], want)
