"""Every memory kind through the service (issue 14): a server of two replicas per model — a
sliding-window (ISWA), a recurrent and a hybrid fixture, and the default model — gives what the
in-process engine gives, greedy and seeded; a session's second turn continues its first, also after
the session moved to the other replica; and a request migrated mid-stream (with its pre-copy) goes
on with exactly the tokens it would have had."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from statemesh.cluster import Client
from statemesh.worker import Model, default_model_path, load_model
from statemesh.worker.engine.engine import Engine, EngineConfig, Request
from statemesh.worker.engine.sampling import SamplingParams

from .conftest import FIXTURES, leftovers, start_service

GREEDY = {"max_tokens": 10, "temperature": 0.0}
SEEDED = {"max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "seed": 11}


@cache
def loaded(model_path: Path) -> Model:
    return load_model(model_path, backend="numpy", progress=False)


def engine_tokens(model_path: Path, prompt: list[int], **sampling: object) -> list[int]:
    model = loaded(model_path)  # a load of the default model costs ~10 s of CPU: once per module
    engine = Engine(model, EngineConfig(n_ctx=512, n_seq_max=4))
    out = engine.generate([Request("x", tuple(prompt), SamplingParams(**sampling))])  # type: ignore[arg-type]
    return [e.token for e in out["x"]]


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        (FIXTURES / "gemma2", "iswa"),
        (FIXTURES / "mamba2", "recurrent"),
        (FIXTURES / "bamba", "hybrid"),
        pytest.param(None, "kv", marks=pytest.mark.slow),
    ],  # the default model: ~70 s, under `make test-slow`
    ids=["gemma2", "mamba2", "bamba", "smollm2"],
)
def test_each_memory_kind_serves_what_the_engine_gives(model: Path | None, kind: str, tmp_path: Path) -> None:
    path = model or default_model_path()
    args = ["--model", str(path), "--n-ctx", "512", "--max-seqs", "4", "--replicas", "2"]
    service = start_service(args, tmp_path / "server.log")
    try:
        with Client(service.address) as client:
            prompt = client.tokenize("The capital of France is")
            for sampling in (GREEDY, SEEDED):
                assert client.complete(prompt, **sampling).token_ids == engine_tokens(path, prompt, **sampling)
            session = client.create_session("s")
            assert session.memory_kind == kind
            first = client.complete(prompt, session_id="s", **GREEDY)
            second = client.complete([20, 21, 22], session_id="s", **GREEDY)
            history = [*prompt, *first.token_ids, 20, 21, 22]
            assert second.token_ids == engine_tokens(path, history, **GREEDY)
            if model is None:
                assert first.text.startswith(" Paris")

            moved = client.migrate("s")  # an idle session, between its turns
            assert moved.target_replica_id != moved.source_replica_id
            third = client.complete([23, 24], session_id="s", **GREEDY)
            history += [*second.token_ids, 23, 24]
            assert third.token_ids == engine_tokens(path, history, **GREEDY)
            assert third.replica_ids == [moved.target_replica_id]

            for sampling in (GREEDY, SEEDED):  # a running request, mid-stream
                # still running when the move comes (a fixture runs hundreds of tokens a second)
                params = {**sampling, "max_tokens": 60 if model is None else 300, "ignore_eos": True}
                stream = client.generate(prompt, **params)
                chunks = [next(stream)]
                running = client.migrate(request_id=chunks[0].request_id)
                chunks += list(stream)
                assert [t for c in chunks for t in c.token_ids] == engine_tokens(path, prompt, **params)
                assert chunks[0].replica_id == running.source_replica_id != chunks[-1].replica_id
                assert chunks[-1].replica_id == running.target_replica_id
    finally:
        assert service.stop() == 0
    assert leftovers(service) == []
