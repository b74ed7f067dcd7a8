"""A session's portable state (`SequenceState`, `Engine.export_session` / `import_session`): a session
exported from one engine continues in another (another memory size) with the very same tokens, on
every memory kind; damaged, forged or foreign states are refused and nothing changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from statemesh.memory.errors import (
    InvalidInput,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotIncompatible,
    SnapshotTruncated,
)
from statemesh.worker import load_model
from statemesh.worker.engine.engine import (
    CannotTruncate,
    Engine,
    EngineConfig,
    Request,
    SessionBusy,
    SessionExists,
    UnknownRequest,
)
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.engine.sequence_state import SequenceState

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GREEDY = SamplingParams(max_tokens=6, temperature=0)


def turn(engine: Engine, request_id: str, session: str, new: list[int]) -> list[int]:
    history = engine.session_history(session) or []
    out = engine.generate([Request(request_id, (*history, *new), GREEDY, session)])
    return [e.token for e in out[request_id]]


@pytest.mark.parametrize("fixture", ["llama", "gemma3", "mamba", "bamba"])
def test_an_exported_session_continues_in_another_engine_with_the_same_tokens(fixture: str) -> None:
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    here = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2))
    here.open_session("s")
    turn(here, "t1", "s", list(range(20, 34)))
    data = here.export_session("s")
    there = Engine(model, EngineConfig(n_ctx=128, n_seq_max=3, prefix_cache_seqs=0))
    there.import_session("s", data)
    assert there.session_history("s") == here.session_history("s")
    fed_before = there.counters["prefill_tokens"]
    assert turn(there, "t2", "s", [40, 41]) == turn(here, "t2", "s", [40, 41])
    assert there.counters["prefill_tokens"] - fed_before == 3  # the last answer token and the 2 new ones
    assert SequenceState.decode(data, max_bytes=1 << 30).fed == 14 + 6 - 1  # all but the last answer token


def test_damaged_forged_and_foreign_states_are_refused_and_nothing_changes() -> None:
    model = load_model(FIXTURES / "llama", backend="numpy", progress=False)
    engine = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2))
    engine.open_session("s")
    turn(engine, "t1", "s", list(range(20, 30)))
    data = engine.export_session("s")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    state = SequenceState.decode(data, max_bytes=1 << 30)
    forged = SequenceState((*state.history, 5), state.fed + 1, state.snapshot).encode()  # says it holds one more
    other = load_model(FIXTURES / "gemma2", backend="numpy", progress=False)
    foreign_engine = Engine(other, EngineConfig(n_ctx=256, n_seq_max=2))
    foreign_engine.open_session("f")
    turn(foreign_engine, "t1", "f", list(range(20, 30)))
    foreign = foreign_engine.export_session("f")
    cases: list[tuple[bytes, type[SnapshotError]]] = [
        (bytes(flipped), SnapshotCorrupt),
        (data[:-20], SnapshotTruncated),
        (data[:30], SnapshotTruncated),
        (b"", SnapshotCorrupt),
        (b"not a state at all, just text", SnapshotCorrupt),
        (forged, SnapshotCorrupt),
        (foreign, SnapshotIncompatible),
    ]
    before = engine.memory.state_write()
    for bad, error in cases:
        with pytest.raises(error):
            engine.import_session("new", bad)
        assert engine.sessions.get("new") is None and engine.memory.state_write() == before
        engine.memory.check_integrity()
    with pytest.raises(SessionExists):
        engine.import_session("s", data)


def test_a_session_busy_with_a_request_cannot_be_exported_or_dropped() -> None:
    model = load_model(FIXTURES / "llama", backend="numpy", progress=False)
    engine = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2))
    engine.open_session("s")
    engine.add(Request("t1", (20, 21, 22), SamplingParams(max_tokens=20, temperature=0), "s"))
    engine.step()
    with pytest.raises(SessionBusy):
        engine.export_session("s")
    with pytest.raises(SessionBusy):
        engine.drop_session("s")


@pytest.mark.parametrize("fixture", ["llama", "gemma2", "mamba2", "jamba"])
@pytest.mark.parametrize("after_steps", [0, 3, 9])
def test_a_detached_request_continues_in_another_engine_with_the_same_tokens(fixture: str, after_steps: int) -> None:
    """Live migration's core: a request taken out of one engine between two steps (before it was
    admitted, in its prefill, while it decodes) continues in another, of another size, with the
    tokens, text and logprobs it would have produced; the others in the first engine go on."""
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    params = SamplingParams(max_tokens=14, temperature=0.8, top_k=50, seed=3, repetition_penalty=1.2,
                            logprobs=2, stop=("zz",))  # fmt: skip
    moving = Request("m", tuple(range(30, 55)), params)
    staying = Request("s", tuple(range(60, 70)), SamplingParams(max_tokens=14, temperature=0))
    alone = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2)).generate([moving, staying])
    here = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2, max_batch_tokens=8))
    events: dict[str, list] = {"m": [], "s": []}  # type: ignore[type-arg]
    for r in (moving, staying):
        here.add(r)
    for _ in range(after_steps):
        for e in here.step():
            events[e.request_id].append(e)
    data = here.detach("m")
    assert all(s.request.id != "m" for s in (*here.running, *here.waiting))
    there = Engine(model, EngineConfig(n_ctx=128, n_seq_max=3, prefix_cache_seqs=0))
    assert there.attach(data) == "m"
    for engine in (here, there):
        while engine.has_work():
            for e in engine.step():
                events[e.request_id].append(e)
        engine.memory.check_integrity()
    for rid in ("m", "s"):
        assert [(e.token, e.text) for e in events[rid]] == [(e.token, e.text) for e in alone[rid]]
    for got, want in zip(events["m"], alone["m"], strict=True):  # chunked differently: float noise only
        assert got.logprob is not None and want.logprob is not None and abs(got.logprob - want.logprob) < 1e-4
    with pytest.raises(UnknownRequest):
        here.detach("m")


@pytest.mark.parametrize("fixture", ["llama", "gemma2", "mamba", "bamba"])
def test_a_forked_session_and_its_source_each_continue_as_a_fresh_run_would(fixture: str) -> None:
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    engine = Engine(model, EngineConfig(n_ctx=256, n_seq_max=3))
    engine.open_session("a")
    turn(engine, "t1", "a", list(range(20, 32)))
    engine.fork_session("a", "b")
    assert engine.session_history("b") == engine.session_history("a")
    history = engine.session_history("a") or []
    fresh = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2))
    for name, new in (("b", [50, 51]), ("a", [60])):
        expected = fresh.generate([Request(f"x{name}", (*history, *new), GREEDY)])[f"x{name}"]
        assert turn(engine, f"t2{name}", name, new) == [e.token for e in expected]
    engine.memory.check_integrity()


@pytest.mark.parametrize(("fixture", "cuts"), [("llama", True), ("gemma3", True), ("mamba", False), ("jamba", False)])
def test_truncate_keeps_the_first_tokens_or_says_why_it_cannot(fixture: str, cuts: bool) -> None:
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    engine = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2))
    engine.open_session("s")
    turn(engine, "t1", "s", list(range(20, 36)))
    history = engine.session_history("s") or []
    if not cuts:
        with pytest.raises(CannotTruncate, match="recurrent state"):
            engine.truncate_session("s", 10)
        assert engine.session_history("s") == history  # nothing changed
        engine.truncate_session("s", 0)  # dropping it whole is always possible
        assert engine.session_history("s") == []
        return
    engine.truncate_session("s", 10)
    assert engine.session_history("s") == history[:10]
    expected = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2)).generate([Request("x", (*history[:10], 77), GREEDY)])
    assert turn(engine, "t2", "s", [77]) == [e.token for e in expected["x"]]
    with pytest.raises(InvalidInput, match="n_tokens must be in"):
        engine.truncate_session("s", 10_000)
