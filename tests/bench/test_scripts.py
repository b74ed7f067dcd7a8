"""The benchmark and GPU-check scripts run and print what they promise (smoke runs on NumPy), so they
cannot rot between the sessions that run them for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_json_lines(*args: str) -> list[dict[str, object]]:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_memory_benchmark_prints_every_measurement() -> None:
    lines = run_json_lines(str(BENCH / "memory.py"), "--quick")
    names = {str(line["bench"]) for line in lines}
    assert names == {"kv_gather", "store_kv_batch", "seq_cp", "snapshot"}
    snapshot = next(line for line in lines if line["bench"] == "snapshot")
    for key in ("numpy_copy_into_gb_per_s", "write_buffer_gb_per_s", "read_gb_per_s"):
        assert float(snapshot[key]) > 0  # type: ignore[arg-type]


def test_gpu_check_mirror_runs_on_numpy() -> None:
    lines = run_json_lines(str(BENCH / "gpu_check.py"), "--device", "numpy", "--parts", "1,2", "--steps", "60")
    mirror = [line for line in lines if line["check"] == "memory_mirror"]
    assert [line["kind"] for line in mirror] == ["kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"]
    assert all(line["ok"] and int(line["batches_committed"]) > 5 for line in mirror)  # type: ignore[call-overload]
    models = [line for line in lines if line["check"] == "model"]
    assert len(models) >= 10 and all(line["ok"] for line in models)


def test_checkpoint_benchmark_compares_with_and_without_in_one_run() -> None:
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "llama"
    lines = run_json_lines(str(BENCH / "checkpoints.py"), "--model", str(fixture), "--streams", "1", "4",
                           "--every", "4", "--rounds", "1", "--new-tokens", "24", "--plain-env")  # fmt: skip
    assert [line["streams"] for line in lines] == [1, 4]
    for line in lines:
        assert float(line["decode_tokens_per_s_with"]) > 0 and float(line["ratio"]) > 0  # type: ignore[arg-type]
        assert int(line["checkpoints"]) >= 6 * int(line["streams"])  # type: ignore[call-overload]
        # the first holds the whole sequence, the later ones only 4 tokens' cells
        assert int(line["bytes_per_checkpoint_later"]) < int(line["bytes_per_checkpoint_first"])  # type: ignore[call-overload]


@pytest.mark.slow  # two servers: ~1 minute
def test_checkpoint_benchmark_through_the_service_compares_servers_with_and_without() -> None:
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "llama"
    lines = run_json_lines(str(BENCH / "checkpoints.py"), "--service", "--model", str(fixture), "--streams", "2",
                           "--every", "4", "--rounds", "1", "--new-tokens", "16", "--plain-env")  # fmt: skip
    ratios = [line for line in lines if line["bench"] == "service_checkpoints"]
    assert [line["streams"] for line in ratios] == [2]
    assert ratios[0]["clean_stops"] is True and float(ratios[0]["ratio"]) > 0  # type: ignore[arg-type]
    assert len(ratios[0]["runs_with"]) == len(ratios[0]["runs_without"]) == 1  # type: ignore[arg-type]
