"""The strict CuPy stand-in itself (tests/strict_cupy.py): it refuses what CuPy refuses and allows,
counting each copy, what CuPy allows. Were it lenient, the GPU-path tests that run under it
(tests/memory/test_strict_cupy.py, tests/worker/test_strict_cupy_models.py) would prove nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from statemesh.memory import get_backend
from tests import strict_cupy


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> Any:
    return strict_cupy.install(monkeypatch)


def test_the_stand_in_refuses_what_cupy_refuses(device: Any) -> None:
    backend = get_backend("cupy")
    assert backend.xp is device and not backend.is_host
    a = device.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    host = np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    mixed_ops = (lambda: a + host, lambda: host * a, lambda: device.exp(host), lambda: np.concatenate([a, host[None]]))
    for mixed in mixed_ops:
        with pytest.raises(TypeError, match="mix host and device"):
            mixed()
    with pytest.raises(TypeError, match="mix host and device"):
        a += host
    with pytest.raises(TypeError, match="mix host and device"):
        np.float32(2) * a @ host
    with pytest.raises(ValueError, match=r"non-scalar numpy\.ndarray"):
        a[0:1] = host[None]
    with pytest.raises(TypeError):
        np.linalg.svd(a)  # no such function in the stand-in: NumPy finds no implementation
    with pytest.raises(TypeError, match="mix host and device"):
        a.sum(out=np.zeros((), dtype=np.float32))


def test_the_stand_in_allows_and_counts_what_cupy_allows(device: Any) -> None:
    counts = strict_cupy.TRANSFERS
    a = device.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert (counts.to_device, counts.to_device_bytes, counts.to_host) == (1, 24, 0)
    b = (a * np.float32(2) + 1.0) @ a.T  # scalars mix freely; nothing crosses
    assert isinstance(b, device.ndarray) and counts.copies == 1
    b[0:1] = 3.0  # a scalar through basic indexing: a kernel argument, no copy
    top = np.argmax(b)  # NumPy's function runs on the device, as CuPy's __array_function__ makes it; noted
    assert isinstance(top, device.ndarray) and [site.split()[0] for site in counts.numpy_calls] == ["np.argmax"]
    with pytest.raises(ValueError, match="ambiguous"):
        bool(b > 0)
    assert counts.copies == 1
    rows = a[np.array([1, 0])]  # a host index array: converted, one copy
    rows[np.array([0])] = np.zeros((1, 3), dtype=np.float32)  # host rows through host indices: two more
    assert counts.to_device == 4
    np.testing.assert_array_equal(device.asnumpy(rows), [[0, 0, 0], [0, 1, 2]])
    assert float(a.sum()) == 15.0 and int(a.argmax()) == 5 and a[0, 1].item() == 1.0
    assert counts.to_host == 4
    out = np.empty((2, 3), dtype=np.float32)
    a.get(out=out)
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3))
    with pytest.raises(TypeError):
        a.get(out=np.empty((2, 3), dtype=np.float64))
    assert counts.to_host == 5
    empty = device.empty((2,), dtype=np.float32)
    assert np.isnan(device.asnumpy(empty)).all()  # never-written memory shows
