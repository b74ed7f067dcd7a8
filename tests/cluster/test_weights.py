"""`statemesh serve --weights q4`: the workers keep the default model's GGUF blocks packed
(`load_model(weights=...)`, worker/kernels/quantized.py); the service's tokens equal the in-process
engine's on the same packed model, and its workers hold a fraction of the float32 weights."""

from __future__ import annotations

from pathlib import Path

from statemesh.cluster import Client
from statemesh.worker import default_model_path, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams

from .conftest import leftovers, start_service

PROMPT = [1, 504, 3458, 282, 4649, 314]  # a few of SmolLM2's token ids
F32_WEIGHT_BYTES = 600_000_000  # the default model widened to float32 holds ~651 MB


def test_the_service_serves_packed_weights_with_the_engine_s_tokens(tmp_path: Path) -> None:
    model = load_model(default_model_path(), backend="numpy", progress=False, weights="q4")
    engine = Engine(model, EngineConfig(n_ctx=256, n_seq_max=2))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [e.token for e in engine.generate([Request("x", tuple(PROMPT), params)])["x"]]
    service = start_service(["--weights", "q4", "--n-ctx", "256", "--max-seqs", "2"], tmp_path / "server.log")
    try:
        with Client(service.address) as client:
            service.worker_pids = [w.pid for r in client.replicas() for w in r.workers]
            got = client.complete(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True).token_ids
            worker = client.replicas()[0].workers[0]
        assert got == expected
        assert 0 < worker.memory_bytes["weights"] < F32_WEIGHT_BYTES // 3
    finally:
        assert service.stop() == 0, service.log.read_text()[-2000:]
    assert leftovers(service, service.worker_pids) == []
