"""A replica split into pipeline stages (`worker/pipeline.py`), in one process: the engine over a
2- or 3-stage pipeline gives what it gives over the whole model, under memory pressure too, on every
memory kind; a sequence's state moves between splits (2 stages -> 1 -> 3); a batch that does not fit
changes no stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from statemesh.memory import Batch, MemoryFull
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.pipeline import PipelineModel, StageWorker, split_layers

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def pipeline(model: Model, n_stages: int, config: EngineConfig) -> PipelineModel:
    ranges = split_layers(model.n_layers, n_stages)
    n_seq = config.n_seq_max + config.prefix_cache_seqs
    stages = [StageWorker(model, a, b, config.n_ctx, n_seq, config.n_ubatch) for a, b in ranges[1:]]
    return PipelineModel(model, ranges, stages)  # type: ignore[arg-type]


def requests() -> list[Request]:
    rng = np.random.default_rng(4)
    return [
        Request(f"q{i}", tuple(int(t) for t in rng.integers(1, 380, size=18)),
                SamplingParams(max_tokens=10, temperature=0.8 if i % 2 else 0.0, seed=i))
        for i in range(5)
    ]  # fmt: skip


def test_split_layers_is_even_and_whole() -> None:
    assert split_layers(30, 4) == [(0, 8), (8, 15), (15, 23), (23, 30)]
    assert split_layers(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match=r"splits into 1 \.\. 3 stages"):
        split_layers(3, 4)


@pytest.mark.parametrize("n_stages", [2, 3])
@pytest.mark.parametrize("fixture", ["llama", "gemma3", "mamba", "bamba", "falcon_h1"])
def test_an_engine_over_a_pipeline_gives_what_it_gives_over_the_whole_model(fixture: str, n_stages: int) -> None:
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    roomy = Engine(model, EngineConfig(n_ctx=512, n_seq_max=5)).generate(requests())
    tight = EngineConfig(n_ctx=48, n_seq_max=3, max_batch_tokens=16, preempt="swap")  # swaps, preempts
    engine = Engine(pipeline(model, n_stages, tight), tight)
    out = engine.generate(requests())
    for r in requests():
        assert [e.token for e in out[r.id]] == [e.token for e in roomy[r.id]], r.id
    engine.memory.check_integrity()
    assert engine.memory.stats()["cells_used"] in (0, engine.memory.stats()["cells_used"])
    if model.memory_spec().attention_layers:
        assert engine.counters["preemptions"] > 0  # the pressure was real


@pytest.mark.parametrize("fixture", ["llama", "jamba"])
def test_a_session_moves_between_pipeline_splits(fixture: str) -> None:
    model = load_model(FIXTURES / fixture, backend="numpy", progress=False)
    config = EngineConfig(n_ctx=256, n_seq_max=2)
    engines = [
        Engine(pipeline(model, 2, config), config),
        Engine(model, config),
        Engine(pipeline(model, 3, config), config),
    ]
    history: list[int] = []
    engines[0].open_session("s")
    for i, engine in enumerate(engines):
        if i:
            engine.import_session("s", engines[i - 1].export_session("s"))
        history = [*history, 20 + i, 21 + i, 22 + i]
        out = engine.generate([Request(f"t{i}", tuple(history), SamplingParams(max_tokens=4, temperature=0), "s")])
        fresh = Engine(model, config).generate(
            [Request("x", tuple(history), SamplingParams(max_tokens=4, temperature=0))]
        )
        assert [e.token for e in out[f"t{i}"]] == [e.token for e in fresh["x"]]
        history = engine.session_history("s") or []


def test_a_batch_that_does_not_fit_a_later_stage_changes_no_stage() -> None:
    model = load_model(FIXTURES / "llama", backend="numpy", progress=False)
    config = EngineConfig(n_ctx=32, n_seq_max=2)
    piped = pipeline(model, 2, config)
    mem = piped.create_memory(32, 2)
    piped.stages[0].mem.seq_rm(0)  # type: ignore[attr-defined]
    piped.decode(mem, Batch(list(range(10)), [0] * 10, tokens=list(range(10, 20))))
    before = mem.state_write()
    stage = piped.stages[0]
    stage.mem = model.create_memory(12, 2, layers=range(*split_layers(model.n_layers, 2)[1]))  # type: ignore[attr-defined]
    stage.mem.state_read(before)  # type: ignore[attr-defined]
    with pytest.raises(MemoryFull):
        piped.decode(mem, Batch(list(range(10, 15)), [0] * 5, tokens=list(range(30, 35))))
    assert mem.state_write() == before
