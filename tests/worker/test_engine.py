"""The engine: continuous batching gives each request what it would get alone; preemption resumes
with identical output on every memory kind; stop strings, cancellation and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from statemesh.worker import Model, default_model_path, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request, RequestRefused
from statemesh.worker.engine.sampling import InvalidSampling, SamplingParams
from statemesh.worker.errors import InvalidTokens

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def smollm() -> Model:
    return load_model(default_model_path(), backend="numpy", progress=False)


def tokens(events: list) -> list[int]:  # type: ignore[type-arg]
    return [e.token for e in events]


def prompts(model: Model, n: int) -> list[tuple[int, ...]]:
    subjects = ["France", "Italy", "Spain", "Japan", "Canada", "Peru", "Kenya", "Norway"]
    return [tuple(model.tokenizer.encode(f"Question {i}: the capital of {subjects[i % 8]} is")) for i in range(n)]


def test_a_request_gets_the_same_greedy_tokens_alone_and_among_31_others(smollm: Model) -> None:
    ps = prompts(smollm, 32)
    alone = Engine(smollm, EngineConfig(n_ctx=1024, n_seq_max=32)).generate([Request("r0", ps[0], GREEDY)])
    crowd_engine = Engine(smollm, EngineConfig(n_ctx=1024, n_seq_max=32, max_batch_tokens=256))
    crowd = crowd_engine.generate([Request(f"r{i}", p, GREEDY) for i, p in enumerate(ps)])
    assert tokens(crowd["r0"]) == tokens(alone["r0"])
    assert len(tokens(alone["r0"])) == 12
    assert crowd_engine.stats()["memory"]["cells_used"] == 0  # every finished request freed its cells


def test_the_same_seed_gives_the_same_sampled_tokens_alone_and_in_a_crowd(smollm: Model) -> None:
    ps = prompts(smollm, 8)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, seed=1234,
                            repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1)  # fmt: skip
    alone = Engine(smollm, EngineConfig(n_ctx=512, n_seq_max=8)).generate([Request("s", ps[3], params)])
    others = [Request(f"o{i}", p, SamplingParams(max_tokens=10, temperature=1.0, seed=i)) for i, p in enumerate(ps)]
    crowd = Engine(smollm, EngineConfig(n_ctx=512, n_seq_max=8)).generate(
        [*others[:4], Request("s", ps[3], params), *others[4:]]
    )
    assert tokens(crowd["s"]) == tokens(alone["s"])
    again = Engine(smollm, EngineConfig(n_ctx=512, n_seq_max=8)).generate([Request("s", ps[3], params)])
    assert tokens(again["s"]) == tokens(alone["s"])


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("fixture", ["llama", "gemma2", "bamba", "jamba"])
def test_preempted_sequences_resume_with_identical_output(fixture: str, mode: str) -> None:
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    rng = np.random.default_rng(0)
    reqs = [
        Request(f"q{i}", tuple(int(t) for t in rng.integers(1, 300, size=10)),
                SamplingParams(max_tokens=14, temperature=0.7, seed=i))
        for i in range(6)
    ]  # fmt: skip
    roomy = Engine(model, EngineConfig(n_ctx=512, n_seq_max=6)).generate(reqs)
    tight_engine = Engine(model, EngineConfig(n_ctx=60, n_seq_max=6, max_batch_tokens=64, preempt=mode))
    tight = tight_engine.generate(reqs)
    assert tight_engine.counters["preemptions"] > 0
    assert (tight_engine.counters["swap_outs"] > 0) == (mode == "swap")
    assert tight_engine.counters["swap_ins"] == tight_engine.counters["swap_outs"]
    for r in reqs:
        assert tokens(tight[r.id]) == tokens(roomy[r.id]), r.id
    assert tight_engine.memory.stats()["cells_used"] == 0


def test_stop_strings_split_across_tokens_are_never_streamed(smollm: Model) -> None:
    ids = tuple(smollm.tokenizer.encode("The capital of France is"))
    full = Engine(smollm, EngineConfig(n_ctx=256, n_seq_max=2)).generate(
        [Request("a", ids, SamplingParams(max_tokens=20, temperature=0))]
    )
    text = "".join(e.text for e in full["a"])
    assert text == " Paris.\n\nThe answer is: 2018-01-22 "
    stop = "answer is"  # spans the tokens " answer" and " is"
    cut = Engine(smollm, EngineConfig(n_ctx=256, n_seq_max=2)).generate(
        [Request("a", ids, SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))]
    )
    streamed = [e.text for e in cut["a"]]
    assert "".join(streamed) == " Paris.\n\nThe "
    assert cut["a"][-1].finish_reason == "stop" and not any("answer" in t for t in streamed)


def test_cancellation_frees_the_cells_at_once(smollm: Model) -> None:
    engine = Engine(smollm, EngineConfig(n_ctx=256, n_seq_max=2))
    engine.add(Request("a", tuple(smollm.tokenizer.encode("Once upon a time")), SamplingParams(max_tokens=50)))
    engine.step()
    engine.step()
    assert engine.memory.stats()["cells_used"] > 0
    events = engine.cancel("a")
    assert events[0].finish_reason == "cancelled"
    assert engine.memory.stats()["cells_used"] == 0 and not engine.has_work()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logprobs=99), "logprobs"),
        (dict(stop=("",)), "stop strings"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_sampling_values_are_refused_with_a_message(params: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidSampling, match=message):
        SamplingParams(**params)


def test_requests_that_can_never_run_are_refused_up_front(smollm: Model) -> None:
    engine = Engine(smollm, EngineConfig(n_ctx=64, n_seq_max=2))
    with pytest.raises(RequestRefused, match="exceeds the context of 64 tokens"):
        engine.add(Request("long", tuple(range(10, 60)), SamplingParams(max_tokens=20)))
    with pytest.raises(RequestRefused, match="outside the vocabulary"):
        engine.add(Request("bad", (5, 999999), SamplingParams()))
    with pytest.raises(RequestRefused, match="empty"):
        engine.add(Request("empty", (), SamplingParams()))
    assert not engine.has_work()


def test_logprobs_are_the_raw_distribution(smollm: Model) -> None:
    ids = tuple(smollm.tokenizer.encode("The capital of France is"))
    out = Engine(smollm, EngineConfig(n_ctx=128, n_seq_max=1)).generate(
        [Request("a", ids, SamplingParams(max_tokens=1, temperature=0, logprobs=3))]
    )
    first = out["a"][0]
    assert [t for t, _ in first.top_logprobs] == [7042, 260, 4528]
    assert first.logprob == first.top_logprobs[0][1] and first.logprob < 0
    assert sum(np.exp(lp) for _, lp in first.top_logprobs) < 1.0


@pytest.mark.parametrize("fixture", ["llama", "gemma3", "mamba", "bamba"])
def test_a_sessions_second_turn_prefills_only_its_new_tokens(fixture: str) -> None:
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    params = SamplingParams(max_tokens=5, temperature=0)
    first = tuple(range(20, 30))
    engine = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2))
    out1 = tokens(engine.generate([Request("t1", first, params, session="chat")])["t1"])
    fed_before = engine.counters["prefill_tokens"]
    second = (*first, *out1, 40, 41, 42, 43)
    out2 = tokens(engine.generate([Request("t2", second, params, session="chat")])["t2"])
    assert engine.counters["prefill_tokens"] - fed_before == 4 + 1  # the new tokens and the last answer token
    assert engine.counters["session_hits"] == 1
    fresh = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2)).generate([Request("x", second, params)])
    assert out2 == tokens(fresh["x"])


@pytest.mark.parametrize("fixture", ["llama", "mamba"])
def test_a_turn_that_rewrites_history_recomputes_what_it_must(fixture: str) -> None:
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    params = SamplingParams(max_tokens=4, temperature=0)
    engine = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2))
    engine.generate([Request("t1", tuple(range(20, 32)), params, session="s")])
    edited = (*range(20, 26), 99, 98, 97)  # shares 6 tokens, then differs
    before = engine.counters["prefill_tokens"]
    out = tokens(engine.generate([Request("t2", edited, params, session="s")])["t2"])
    fed = engine.counters["prefill_tokens"] - before
    assert fed == (3 if model.memory_spec().attention_layers else len(edited))  # a state cannot be cut
    assert out == tokens(
        Engine(model, EngineConfig(n_ctx=256, n_seq_max=2)).generate([Request("x", edited, params)])["x"]
    )


def test_idle_sessions_are_evicted_to_host_snapshots_and_restored() -> None:
    model = load_model(FIXTURES / "bamba", backend="numpy", progress=False)
    params = SamplingParams(max_tokens=4, temperature=0)
    engine = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2))
    turns = {name: tuple(range(30 + i, 40 + i)) for i, name in enumerate(["a", "b", "c"])}
    answers = {}
    for name, prompt in turns.items():  # three sessions through two sequence slots
        answers[name] = tokens(engine.generate([Request(name + "1", prompt, params, session=name)])[name + "1"])
    assert engine.counters["session_evictions"] >= 1 and engine.stats()["session_store_bytes"] > 0
    follow = (*turns["a"], *answers["a"], 50, 51)
    out = tokens(engine.generate([Request("a2", follow, params, session="a")])["a2"])
    assert engine.counters["session_restores"] >= 1 and engine.counters["session_hits"] >= 1
    assert out == tokens(
        Engine(model, EngineConfig(n_ctx=256, n_seq_max=2)).generate([Request("x", follow, params)])["x"]
    )


def test_chat_messages_stream_with_timings(smollm: Model) -> None:
    engine = Engine(smollm, EngineConfig(n_ctx=512, n_seq_max=2))
    request = engine.chat_request("c", [{"role": "user", "content": "What is the capital of France?"}],
                                  SamplingParams(max_tokens=8, temperature=0))  # fmt: skip
    assert smollm.tokenizer.decode(list(request.prompt)).startswith("<|im_start|>system")
    events = list(engine.stream([request]))
    assert len(events) >= 1 and events[-1].finish_reason in ("stop", "length")
    assert "Paris" in "".join(e.text for e in events)
    stats = engine.stats()
    assert stats["ttft_p50_s"] > 0 and (len(events) == 1 or stats["itl_p99_s"] > 0)


def first_logprobs(events: list) -> list[tuple[int, float]]:  # type: ignore[type-arg]
    return list(events[0].top_logprobs)


@pytest.mark.parametrize("fixture", ["llama", "mamba", "bamba", "jamba"])
def test_a_prefix_cache_hit_gives_what_a_cold_run_gives(fixture: str) -> None:
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=5)
    cached = tuple(range(40, 80))  # 40 tokens: full blocks end at 16 and 32
    extends = (*cached[:32], 7, 8, 9, 10, 11)  # repeats two blocks, then differs
    config = EngineConfig(n_ctx=512, n_seq_max=2, prefix_block=16, prefix_stride_blocks=1)
    engine = Engine(model, config)
    engine.generate([Request("a", cached, params)])
    before = engine.counters["prefill_tokens"]
    warm = engine.generate([Request("b", extends, params)])["b"]
    assert engine.stats()["prefix_hits"] == 1 and engine.stats()["prefix_hit_tokens"] == 32
    assert engine.counters["prefill_tokens"] - before == len(extends) - 32
    cold = Engine(model, EngineConfig(n_ctx=512, n_seq_max=2, prefix_cache_seqs=0)).generate(
        [Request("b", extends, params)]
    )["b"]
    assert tokens(warm) == tokens(cold)
    for (t1, lp1), (t2, lp2) in zip(first_logprobs(warm), first_logprobs(cold), strict=True):
        assert t1 == t2 and abs(lp1 - lp2) < 1e-4


def test_a_windowed_cache_gets_no_hit_where_the_window_is_gone_and_is_still_right() -> None:
    model = load_model(FIXTURES / "gemma2", backend="numpy", progress=False)
    params = SamplingParams(max_tokens=4, temperature=0)
    cached = tuple(range(40, 80))
    extends = (*cached[:32], 7, 8, 9)
    engine = Engine(model, EngineConfig(n_ctx=512, n_seq_max=2, prefix_block=16))
    engine.generate([Request("a", cached, params)])
    warm = engine.generate([Request("b", extends, params)])["b"]
    assert engine.stats()["prefix_hits"] == 0  # the checkpoint's window cells were let go
    cold = Engine(model, EngineConfig(n_ctx=512, n_seq_max=2, prefix_cache_seqs=0)).generate(
        [Request("b", extends, params)]
    )["b"]
    assert tokens(warm) == tokens(cold)


def test_checkpoints_give_way_to_running_sequences() -> None:
    model = load_model(FIXTURES / "llama", backend="numpy", progress=False)
    params = SamplingParams(max_tokens=4, temperature=0)
    engine = Engine(model, EngineConfig(n_ctx=80, n_seq_max=2, prefix_block=16))
    engine.generate([Request("a", tuple(range(40, 80)), params)])  # leaves a 32-token checkpoint
    assert engine.stats()["prefix_checkpoints"] == 1
    out = engine.generate([Request("b", tuple(range(100, 170)), params)])["b"]  # needs 74 of 80 cells
    assert len(out) == 4 and engine.counters["preemptions"] == 0
    assert [c.depth for c in engine.prefix.checkpoints] == [64]  # a's went, b's own was kept


def test_sampler_state_travels_as_json_and_continues_identically() -> None:
    import json

    from statemesh.worker.engine.sampling import SamplerState, sample

    rng = np.random.default_rng(5)
    rows = rng.standard_normal((10, 384)).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=77, repetition_penalty=1.2, frequency_penalty=0.3)
    straight = SamplerState.start(params, [1, 2, 3])
    expected = [sample(r, params, straight).token for r in rows]
    moved = SamplerState.start(params, [1, 2, 3])
    first = [sample(r, params, moved).token for r in rows[:5]]
    moved = SamplerState.from_json(json.loads(json.dumps(moved.to_json())))
    assert first + [sample(r, params, moved).token for r in rows[5:]] == expected


def test_idle_sessions_give_way_when_a_running_sequence_needs_their_cells() -> None:
    model = load_model(FIXTURES / "llama", backend="numpy", progress=False)
    params = SamplingParams(max_tokens=4, temperature=0)
    engine = Engine(model, EngineConfig(n_ctx=64, n_seq_max=3, prefix_cache_seqs=0))
    engine.generate([Request("a", tuple(range(20, 50)), params, session="idle")])  # holds ~33 cells
    out = engine.generate([Request("b", tuple(range(60, 100)), SamplingParams(max_tokens=20, temperature=0))])["b"]
    assert len(out) == 20 and engine.counters["session_evictions"] == 1 and engine.counters["preemptions"] == 0


def padded_vocabulary_model(tmp_path: Path, known: int) -> Model:
    """The llama fixture with a tokenizer cut to its first `known` tokens: the embedding keeps its
    384 rows, as exports of Qwen2, Llama 3 and Gemma pad theirs past the tokenizer."""
    import json
    import shutil

    folder = tmp_path / "llama_padded"
    shutil.copytree(FIXTURES / "llama", folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = {t: i for t, i in tokenizer["model"]["vocab"].items() if i < known}
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][: known - 257]  # 256 bytes and <|endoftext|> first
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return load_model(folder, backend="numpy", progress=False)


def test_a_padded_vocabulary_samples_ids_past_the_tokenizer_and_decodes_them_to_nothing(tmp_path: Path) -> None:
    """Issue 13: an id the model may sample but the tokenizer lacks raised InvalidTokens inside
    step(), ending every request of the batch. The model's id space is the rule everywhere; such
    ids decode to nothing (as in vLLM and transformers)."""
    model = padded_vocabulary_model(tmp_path, known=320)
    assert (model.tokenizer.vocab_size, model.config.vocab_size) == (320, 384)
    assert model.tokenizer.decode([42, 350, 43]) == model.tokenizer.decode([42, 43])
    with pytest.raises(InvalidTokens, match=r"outside the vocabulary 0 \.\. 383"):
        model.tokenizer.decode([384])
    engine = Engine(model, EngineConfig(n_ctx=256, n_seq_max=4, prefix_cache_seqs=0))
    reqs = [
        Request(f"r{i}", tuple(range(10 + i, 30 + i)), SamplingParams(max_tokens=24, temperature=0)) for i in range(4)
    ]
    out = engine.generate(reqs)
    sampled = [t for r in reqs for t in tokens(out[r.id])]
    assert any(t >= 320 for t in sampled), "the fixture must sample a padded id for this test to mean anything"
    for r in reqs:
        assert len(out[r.id]) == 24 and out[r.id][-1].finish_reason == "length"
        assert "".join(e.text for e in out[r.id]) == model.tokenizer.decode(tokens(out[r.id]))
    assert engine.memory.stats()["cells_used"] == 0
