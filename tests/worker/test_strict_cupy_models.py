"""Every fixture model on the GPU path, under the strict CuPy stand-in (issue 17: keep the GPU path
from rotting while no GPU is lent): prefill and decode give NumPy's logits, a snapshot leaves the
device and comes back, the engine samples from device logits, and the host-device copies of a
decode step stay within what they are today.

The copies of one decode step (two sequences, one token each), as counted today, by Model.decode:
- per step: the tokens (embedding rows), the micro-batch's rows and the logits' rows (index
  uploads), RoPE's cos and sin (computed on the host), the dense attention's padding mask;
- per attention layer: the cells the new keys go to, the dense attention's query rows (two), and
  the dense rows' new cells, slots and rows (three): six uploads;
- per recurrent layer: the state slots, read and written (two uploads);
and the engine adds one copy out: the logits of the rows it samples from.
The ideal on a GPU is the tokens in and the logits (or sampled ids) out, and nothing that grows with
the layers: the per-layer index uploads could go up once per micro-batch. The bounds below hold
today's counts, so that a change adding copies fails here and has to say why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from statemesh.memory import Batch
from statemesh.worker import Model, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams
from statemesh.worker.pipeline import PipelineModel, StageWorker, split_layers
from tests import strict_cupy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())

# Model.decode's copies of a two-sequence decode step today: (host -> device, device -> host).
# llama: 3 attention layers, 5 + 6 * 3 + 1 = 24; bamba: 2 attention and 2 recurrent layers,
# 5 + 6 * 2 + 2 * 2 + 1 = 22.
DECODE_STEP_COPIES = {"llama": (24, 0), "bamba": (22, 0)}


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> Any:
    return strict_cupy.install(monkeypatch)


def prompt(name: str) -> list[int]:
    ids: list[int] = load_file(str(FIXTURES / name / "expected.safetensors"))["prompt_ids"].tolist()
    return ids


def decode(model: Model, mem: Any, batch: Batch, **kw: Any) -> np.ndarray:
    """The logits, which must come out on the model's device, brought to the host."""
    logits = model.decode(mem, batch, **kw)
    assert isinstance(logits, model.backend.xp.ndarray), type(logits)
    host: np.ndarray = model.backend.to_host(logits)
    return host


def prefill_and_decode(model: Model, ids: list[int]) -> list[np.ndarray]:
    """Two prompts of different lengths prefilled together in micro-batches of 4, then three decode
    steps of both; half-way, the memory leaves the device as a snapshot (host bytes) and decoding goes
    on in a fresh memory that read it back. Returns every step's logits. The decoded tokens are taken
    from the prompt, not sampled, so that either backend feeds the same ones."""
    first, second = ids, ids[: len(ids) // 2][::-1]
    mem = model.create_memory(n_ctx=64, n_seq_max=2)
    both = Batch([*range(len(first)), *range(len(second))], [0] * len(first) + [1] * len(second), tokens=first + second)
    seen = [decode(model, mem, both, n_ubatch=4)]
    at = [len(first), len(second)]
    for step in range(3):
        if step == 1:
            restored = model.create_memory(n_ctx=64, n_seq_max=2)
            restored.state_read(mem.state_write())  # device -> host bytes -> device
            mem = restored
        seen.append(decode(model, mem, Batch(at, [0, 1], tokens=[ids[step], ids[-1 - step]])))
        at = [p + 1 for p in at]
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_each_fixture_model_on_the_device_gives_numpy_logits(device: Any, name: str) -> None:
    ids = prompt(name)
    want = prefill_and_decode(load_model(FIXTURES / name, backend="numpy", progress=False), ids)
    model = load_model(FIXTURES / name, backend="cupy", progress=False)
    assert model.backend.xp is device
    got = prefill_and_decode(model, ids)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))
    assert not strict_cupy.TRANSFERS.numpy_calls, strict_cupy.TRANSFERS.report()


def test_keys_re_rotated_on_the_device_give_numpy_logits(device: Any) -> None:
    """Positions moved (`seq_add`) re-rotate stored keys through RoPE's k_shift, on the device."""
    ids = prompt("llama")
    logits = []
    for backend in ("numpy", "cupy"):
        model = load_model(FIXTURES / "llama", backend=backend, progress=False)
        mem = model.create_memory(n_ctx=64, n_seq_max=1)
        decode(model, mem, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids))
        assert mem.seq_rm(0, 2, 4)
        mem.seq_add(0, 4, None, -2)  # the cut closes: positions 4.. become 2..
        logits.append(decode(model, mem, Batch([len(ids) - 2], [0], tokens=ids[:1])))
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-5 * float(np.abs(logits[0]).max()))


@pytest.mark.parametrize("name", sorted(DECODE_STEP_COPIES))
def test_host_device_copies_of_a_decode_step_stay_within_todays(device: Any, name: str) -> None:
    model = load_model(FIXTURES / name, backend="cupy", progress=False)
    counts = strict_cupy.TRANSFERS
    ids = prompt(name)
    mem = model.create_memory(n_ctx=64, n_seq_max=2)
    decode(model, mem, Batch([*range(len(ids)), 0, 1, 2], [0] * len(ids) + [1, 1, 1], tokens=ids + ids[:3]))
    counts.reset()
    model.decode(mem, Batch([len(ids), 3], [0, 1], tokens=ids[:2]))
    in_decode = (counts.to_device, counts.to_host)
    print(f"\n{name}: Model.decode, one step of 2 sequences: {counts.report()}")

    engine = Engine(model, EngineConfig(n_ctx=64, n_seq_max=2))
    for i in range(2):
        engine.add(Request(f"r{i}", tuple(ids[i:]), SamplingParams(max_tokens=4, temperature=0.0)))
    engine.step()  # both prompts; then every step decodes both
    counts.reset()
    assert len(engine.step()) == 2
    in_engine = (counts.to_device, counts.to_host)
    print(f"{name}: Engine.step, decoding 2 sequences: {counts.report()}")

    most_in, most_out = DECODE_STEP_COPIES[name]
    assert in_decode[0] <= most_in and in_decode[1] <= most_out, counts.report()
    assert in_engine[0] <= most_in and in_engine[1] <= most_out + 1, counts.report()  # + the logits out
    assert in_engine[1] >= 1  # the sampled rows did come out (else the engine sampled device arrays)
    assert not counts.numpy_calls, counts.report()


@pytest.mark.parametrize("name", ["llama", "bamba"])
def test_the_engine_samples_from_device_logits_as_from_host_ones(device: Any, name: str) -> None:
    """Sampling runs on the host (penalties, top-k/p, logprobs): the engine brings the logits over
    once a step. Issue 17: it handed device rows to NumPy's sampling, which CuPy refuses. Memory
    pressure here also swaps sequences out to host snapshots and back; and the same runs over a
    2-stage pipeline on the device, hidden states passing stage to stage."""
    rng = np.random.default_rng(0)
    requests = [
        Request(f"q{i}", tuple(int(t) for t in rng.integers(1, 300, size=10)),
                SamplingParams(max_tokens=12, temperature=0.7, top_k=20, repetition_penalty=1.1, logprobs=2, seed=i))
        for i in range(5)
    ]  # fmt: skip
    config = EngineConfig(n_ctx=48, n_seq_max=5, max_batch_tokens=64, preempt="swap")
    want = Engine(load_model(FIXTURES / name, backend="numpy", progress=False), config).generate(requests)
    model = load_model(FIXTURES / name, backend="cupy", progress=False)
    engine = Engine(model, config)
    got = engine.generate(requests)
    assert engine.counters["swap_outs"] > 0
    ranges = split_layers(model.n_layers, 2)
    stage = StageWorker(model, *ranges[1], config.n_ctx, config.n_seq_max + config.prefix_cache_seqs, config.n_ubatch)
    pipelined = Engine(PipelineModel(model, ranges, [stage]), config).generate(requests)  # type: ignore[list-item]
    for r in requests:
        assert [e.token for e in got[r.id]] == [e.token for e in want[r.id]], r.id
        assert [e.logprob for e in got[r.id]] == pytest.approx([e.logprob for e in want[r.id]], abs=1e-4)
        assert [e.token for e in pipelined[r.id]] == [e.token for e in want[r.id]], r.id
    assert not strict_cupy.TRANSFERS.numpy_calls, strict_cupy.TRANSFERS.report()
