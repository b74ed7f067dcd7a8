"""`bench/gpu_check.py` part 4 (issue 14), the service across devices, run here with NumPy on both
replicas (`--device numpy`: `--backend numpy,numpy`), so the script cannot rot between the sessions
lent a GPU; and its rule for telling float noise from a wrong token."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

GPU_CHECK = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def gpu_check_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~20 s: a second server of the fixture; `make test-slow` runs it
@pytest.mark.timeout(420)
def test_part_4_serves_migrates_a_stream_and_a_session_and_matches_the_engine_on_numpy() -> None:
    done = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "numpy", "--parts", "4"],
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = {line["check"]: line for line in map(json.loads, done.stdout.splitlines())}
    assert set(lines) == {"service_devices", "service_migrate_request", "service_migrate_session"}
    assert all(line["ok"] for line in lines.values())
    assert lines["service_devices"]["devices"] == {"r0": ["cpu"], "r1": ["cpu"]}
    stream = lines["service_migrate_request"]
    assert stream["moves"] == ["r0->r1", "r1->r0"] and stream["finish_reason"] == "length"
    assert stream["matched"] == stream["tokens"] == 400  # on one device nothing differs, not even by noise
    assert lines["service_migrate_session"]["matched"] == [16, 16]


def event(token: int, top: list[tuple[int, float]]) -> SimpleNamespace:
    """A reference TokenEvent as near_tie reads it: its token and its candidates, most likely first."""
    return SimpleNamespace(token=token, top_logprobs=tuple(top))


def two_candidates(p_first: float, temperature: float) -> list[tuple[int, float]]:
    """Candidates 10 and 11 whose sampling probabilities at `temperature` are p_first, 1 - p_first."""
    return [(10, math.log(p_first) * temperature), (11, math.log(1 - p_first) * temperature)]


GREEDY = {"temperature": 0.0}
SEED = 7
DRAW_0 = float(np.random.Generator(np.random.PCG64(SEED)).random())  # the first token's uniform number
SEEDED = {"temperature": 0.8, "top_k": 2, "seed": SEED}


@pytest.mark.parametrize(
    ("reference", "served", "params", "noise"),
    [
        (event(10, [(10, -1.0), (11, -1.0004)]), 11, GREEDY, True),  # top two within 1e-3: an argmax can flip
        (event(10, [(10, -1.0), (11, -1.1)]), 11, GREEDY, False),  # a clear winner
        (event(10, [(10, -1.0), (11, -1.0004)]), 12, GREEDY, False),  # not even a candidate
        (event(10, two_candidates(DRAW_0 + 4e-4, 0.8)), 11, SEEDED, True),  # the draw sat on the boundary
        (event(10, two_candidates(DRAW_0 + 0.05, 0.8)), 11, SEEDED, False),  # the draw was clear of it
    ],
    ids=["greedy-tie", "greedy-clear", "not-a-candidate", "draw-on-boundary", "draw-clear"],
)
def test_near_tie_lets_only_float_noise_pass(
    reference: SimpleNamespace, served: int, params: dict[str, float], noise: bool
) -> None:
    assert gpu_check_module().near_tie(reference, served, 0, params) is noise


def test_matched_tokens_counts_the_prefix_and_refuses_a_difference_noise_cannot_explain() -> None:
    gpu_check = gpu_check_module()
    tie, clear = [(10, -1.0), (11, -1.0004)], [(10, -1.0), (11, -3.0)]
    reference = [event(5, [(5, -0.1)]), event(10, tie), event(7, [(7, -0.2)])]
    assert gpu_check.matched_tokens("same", [5, 10, 7], reference, GREEDY) == 3
    assert gpu_check.matched_tokens("tie", [5, 11, 9], reference, GREEDY) == 1
    with pytest.raises(gpu_check.Failed, match="float noise cannot explain"):
        gpu_check.matched_tokens("wrong", [5, 11, 9], [reference[0], event(10, clear), reference[2]], GREEDY)
    with pytest.raises(gpu_check.Failed, match="2 tokens served but the NumPy engine gave 3"):
        gpu_check.matched_tokens("short", [5, 10], reference, GREEDY)
