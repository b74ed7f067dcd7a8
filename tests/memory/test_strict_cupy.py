"""Every memory kind on the GPU path, under the strict CuPy stand-in (issue 17: keep the GPU path
from rotting while no GPU is lent): the same batches, rollbacks, sequence operations and snapshots
as on NumPy give the same content, and a snapshot moves device -> host bytes -> device unchanged.
The stand-in refuses what CuPy refuses (implicit host conversion, host and device arrays mixed), so
a GPU-path bug fails here rather than on the first GPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from statemesh.memory import AttentionSpec, Batch, Memory, MemoryFull, create_memory
from tests import strict_cupy
from tests.memory.helpers import KINDS, attention_spec, fold, hybrid_spec, iswa_spec, recurrent_spec, token_rows

SPECS = {
    "kv": attention_spec(),
    "iswa": iswa_spec(),
    "recurrent": recurrent_spec(),
    "hybrid": hybrid_spec(),
    "hybrid_iswa": hybrid_spec(window=3),
}


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The stand-in installed as `cupy`, its copy counters at zero."""
    return strict_cupy.install(monkeypatch)


def k_shift(layer: int, k: Any, delta: Any) -> Any:
    """A positional key that works on either backend: every number moves with the position."""
    return k + delta[:, None, None].astype(k.dtype)


def memory(kind: str, backend: str) -> Memory:
    return create_memory(SPECS[kind], n_ctx=24, n_seq_max=4, backend=backend, k_shift=k_shift)


def step(mem: Memory, positions: list[int], seq_ids: list[int], salt: float = 0.0, fail: bool = False) -> list[Any]:
    """helpers.run_step with the rows made on the memory's backend (as a model's would be), in
    micro-batches of 3; returns what each attention layer read back for each sequence (k, v,
    positions, on the host). `fail` raises in the middle, so the batch must be undone."""
    xp = mem.backend.xp
    seen = []
    with mem.batch(Batch(positions, seq_ids), n_ubatch=3) as plan:
        for ub in plan:
            for layer in mem.layers:
                if isinstance(mem.spec.layers[layer], AttentionSpec):
                    k = xp.asarray(token_rows(layer, ub.seq_ids, ub.positions, salt, mem.spec.attention(layer).k_shape))
                    ub.store_kv(layer, k, -k)
                    seen += [[mem.backend.to_host(a) for a in ub.kv(layer, s)] for s in ub.seqs]
                else:
                    conv, ssm = fold(*ub.state(layer), ub.seq_ids, ub.positions, ub.seqs)
                    ub.store_state(layer, conv, ssm)
            if fail:
                raise RuntimeError("a failure in the middle of the batch")
    return seen


def scenario(kind: str, backend: str) -> list[Any]:
    """A few batches, a rolled-back one, forks, cuts and shifts, a snapshot read back into a fresh
    memory and one sequence restored under another id; everything observed along the way."""
    mem = memory(kind, backend)
    seen: list[Any] = [step(mem, [0, 1, 2, 3, 4, 0, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1])]
    seen.append(step(mem, [5, 3], [0, 1], salt=0.5))
    before = observe(mem)
    with pytest.raises(RuntimeError):
        step(mem, [6, 4], [0, 1], fail=True)
    assert observe(mem) == before, "the failed batch was not undone"
    mem.seq_cp(0, 2)
    assert mem.seq_rm(1, None, None)
    seen.append(step(mem, [6, 6], [0, 2], salt=1.0))
    if kind == "kv":
        assert mem.seq_rm(0, 2, 4)
        mem.seq_add(0, 4, None, -2)  # through k_shift, on the device
    seen.append(observe(mem))
    mem.check_integrity()

    whole = mem.state_write()
    restored = memory(kind, backend)
    restored.state_read(whole)  # device -> host bytes -> device
    assert restored.state_write() == whole
    one = mem.state_write(2)
    restored.state_read(one, 3)
    restored.check_integrity()
    seen += [observe(restored), step(restored, [7, 7], [2, 3], salt=2.0), observe(restored)]
    return seen


def observe(mem: Memory) -> tuple[bytes, Any, list[tuple[int, int, int]]]:
    """The content (a snapshot), the counters without the device's name, each sequence's span."""
    spans = [(s, mem.seq_pos_min(s), mem.seq_pos_max(s)) for s in mem.seq_ids()]
    return mem.state_write(), without_device(mem.stats()), spans


def without_device(stats: Any) -> Any:
    if isinstance(stats, dict):
        return {k: without_device(v) for k, v in stats.items() if k not in ("device", "dense_bytes")}
    if isinstance(stats, list):
        return [without_device(v) for v in stats]
    return stats


def assert_same(device_seen: Any, host_seen: Any) -> None:
    if isinstance(host_seen, (list, tuple)):
        assert len(device_seen) == len(host_seen)
        for d, h in zip(device_seen, host_seen, strict=True):
            assert_same(d, h)
    elif isinstance(host_seen, np.ndarray):
        assert type(device_seen) is np.ndarray
        np.testing.assert_array_equal(device_seen, host_seen)
    else:
        assert device_seen == host_seen


@pytest.mark.parametrize("kind", KINDS)
def test_each_memory_kind_on_the_device_matches_numpy(device: Any, kind: str) -> None:
    host_seen = scenario(kind, "numpy")
    strict_cupy.TRANSFERS.reset()
    device_seen = scenario(kind, "cupy")
    assert memory(kind, "cupy").backend.xp is device
    assert_same(device_seen, host_seen)
    assert strict_cupy.TRANSFERS.to_host > 0  # the snapshots and read-backs did cross over


@pytest.mark.parametrize("kind", KINDS)
def test_a_snapshot_taken_on_the_device_restores_on_the_host_and_back(device: Any, kind: str) -> None:
    on_device = memory(kind, "cupy")
    step(on_device, [0, 1, 2, 0, 1], [0, 0, 0, 1, 1])
    on_host = memory(kind, "numpy")
    on_host.state_read(on_device.state_write())
    assert on_host.state_write() == on_device.state_write()
    step(on_host, [3], [0], salt=0.25)
    step(on_device, [3], [0], salt=0.25)
    back = memory(kind, "cupy")
    back.state_read(on_host.state_write())
    assert back.state_write() == on_device.state_write()


def test_memory_full_on_the_device_changes_nothing(device: Any) -> None:
    mem = create_memory(attention_spec(), n_ctx=4, n_seq_max=2, backend="cupy")
    step(mem, [0, 1, 2], [0, 0, 0])
    before = observe(mem)
    with pytest.raises(MemoryFull):
        step(mem, [0, 1], [1, 1])
    assert observe(mem) == before
