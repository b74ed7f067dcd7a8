"""`statemesh serve --backend` (issue 14): one backend for every replica, or one per replica; "auto"
made concrete from the Ray cluster's GPUs; a GPU replica's GPU split across its stages; and a cupy
replica on a cluster without GPUs refused at once with a message that says so, not a wait for a
placement group that can never be placed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from statemesh.cluster.cli import main
from statemesh.cluster.ray_cluster import PlacementError, gpus_per_worker
from statemesh.cluster.service import ServiceConfig, parse_backends, resolve_backends

from .conftest import FIXTURES, Service, leftovers

FAIL_FAST_TIMEOUT_S = 90.0  # Ray's start (6-11 s here) and the refusal, far below the placement wait (120 s)


@pytest.mark.parametrize(
    ("text", "replicas", "per_replica"),
    [
        ("numpy", 1, ("numpy",)),
        ("cupy", 3, ("cupy", "cupy", "cupy")),  # one value: every replica
        ("cupy,numpy", 2, ("cupy", "numpy")),
        ("auto, numpy ,cupy", 3, ("auto", "numpy", "cupy")),
    ],
)
def test_backend_takes_one_value_or_one_per_replica(text: str, replicas: int, per_replica: tuple[str, ...]) -> None:
    config = ServiceConfig("model", replicas=replicas, backends=parse_backends(text))
    assert config.requested_backends() == per_replica


@pytest.mark.parametrize(
    ("text", "replicas", "says"),
    [
        ("cupy,numpy,numpy", 2, "--backend lists 3 backends (cupy,numpy,numpy) for 2 replicas"),
        ("cupy,numpy", 3, "--backend lists 2 backends (cupy,numpy) for 3 replicas"),
        ("gpu", 1, "unknown backend 'gpu'; expected one of auto, numpy, cupy"),
        ("numpy,", 2, "unknown backend ''"),
    ],
)
def test_a_bad_backend_list_is_refused_before_anything_starts(
    text: str, replicas: int, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="backend") as e:
        ServiceConfig("model", replicas=replicas, backends=parse_backends(text))
    assert says in str(e.value)
    assert main(["serve", "--model", str(FIXTURES / "llama"), "--replicas", str(replicas), "--backend", text]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("requested", "gpus_total", "gpus_free", "resolved"),
    [
        (("auto", "auto"), 0, 0, ("numpy", "numpy")),
        (("auto", "auto"), 1, 1, ("cupy", "numpy")),  # one GPU: the first auto replica takes it
        (("auto", "cupy", "auto"), 1, 1, ("numpy", "cupy", "numpy")),  # the cupy one's GPU is not free for auto
        (("auto", "cupy", "auto"), 2, 2, ("cupy", "cupy", "numpy")),
        (("auto", "cupy", "auto"), 4, 3, ("cupy", "cupy", "cupy")),
        (("auto",), 2, 0.5, ("numpy",)),  # half a GPU free: not a whole one
        (("cupy", "numpy"), 1, 0, ("cupy", "numpy")),  # taken now, but the cluster has one: wait for it
    ],
)
def test_auto_takes_a_gpu_while_one_is_free(
    requested: tuple[str, ...], gpus_total: float, gpus_free: float, resolved: tuple[str, ...]
) -> None:
    assert resolve_backends(requested, gpus_total, gpus_free) == resolved


def test_cupy_replicas_need_as_many_gpus_as_the_cluster_has() -> None:
    with pytest.raises(PlacementError, match=r"2 replica\(s\) \(r0, r2\) on cupy.* the Ray cluster has 1 GPUs"):
        resolve_backends(("cupy", "numpy", "cupy"), 1, 1)


@pytest.mark.parametrize(("stages", "share"), [(1, 1.0), (2, 0.5), (3, 0.3333), (4, 0.25)])
def test_a_gpu_replica_splits_its_gpu_evenly_across_its_stages(stages: int, share: float) -> None:
    assert gpus_per_worker(stages) == share and gpus_per_worker(stages) * stages <= 1.0


@pytest.mark.timeout(180)
def test_a_cupy_replica_on_a_cluster_without_gpus_fails_fast_with_a_clear_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "statemesh.cluster.cli", "serve", "--port", "0", "--model",
               str(FIXTURES / "llama"), "--backend", "cupy", "--num-cpus", "2"]  # fmt: skip
    with open(log, "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    try:
        code = process.wait(FAIL_FAST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"serve --backend cupy did not give up within {FAIL_FAST_TIMEOUT_S} s") from None
    said = log.read_text()
    assert code == 1, said[-3000:]
    assert (
        "statemesh serve: --backend puts 1 replica(s) (r0) on cupy, each needing 1 GPU, but the Ray cluster has 0 GPUs"
        in said
    )
    assert "Traceback" not in said
    assert leftovers(Service(process, "", log)) == [], "the refused server left processes running"
