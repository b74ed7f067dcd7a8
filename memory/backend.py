"""The array backend: NumPy on the host, CuPy on a GPU, behind one small object.

Everything device-specific in `statemesh.memory` lives here: allocation, moving rows between the
device and host buffers (snapshots are host bytes), and index arrays. Cell metadata (positions,
owners) always stays in NumPy on the host; only K/V rows and recurrent states live on the device.
CuPy is optional: the package imports and works without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from statemesh.memory.errors import BackendUnavailable, InvalidInput

Array = Any  # a numpy.ndarray or a cupy.ndarray


def _cupy_if_usable() -> Any | None:
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.is_available() else None
    except Exception:  # a broken driver install is "not usable", not a crash
        return None


@dataclass(frozen=True)
class Backend:
    """`name` is "numpy" or "cupy"; `xp` is the array module."""

    name: str
    xp: Any

    @property
    def is_host(self) -> bool:
        return self.name == "numpy"

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Array:
        return self.xp.zeros(shape, dtype=dtype)

    def asarray(self, a: Any, dtype: Any = None) -> Array:
        return self.xp.asarray(a, dtype=dtype)

    def index(self, cells: np.ndarray) -> Array:
        """A host index array as the backend wants it for fancy indexing."""
        return cells if self.is_host else self.xp.asarray(cells)

    def to_host(self, a: Array) -> np.ndarray:
        host: np.ndarray = a if self.is_host else self.xp.asnumpy(a)
        return host

    def take_rows(self, arrays: list[Array], cells: np.ndarray) -> list[Array]:
        """[a[cells] for a in arrays]. On the host the results share one fresh buffer: one
        allocation instead of several, and large enough for NumPy to back it with huge pages,
        which matters because page faults, not copying, dominate gathers of a few MB."""
        if not self.is_host:
            idx = self.xp.asarray(cells)
            return [a[idx] for a in arrays]
        sizes = [len(cells) * int(np.prod(a.shape[1:])) for a in arrays]
        buf = np.empty(sum(sizes), dtype=arrays[0].dtype)
        runs = _runs(cells)
        out, start = [], 0
        for a, size in zip(arrays, sizes, strict=True):
            rows = buf[start : start + size].reshape(len(cells), *a.shape[1:])
            _copy_rows(a, cells, rows, runs)
            out.append(rows)
            start += size
        return out

    def gather_to_host(self, src: Array, cells: np.ndarray, out: np.ndarray) -> None:
        """out[i] = src[cells[i]], with `out` a host array."""
        runs = _runs(cells)
        if self.is_host:
            _copy_rows(src, cells, out, runs)
        elif len(cells):
            one_run = runs is not None and len(runs) == 1
            rows = src[int(cells[0]) : int(cells[0]) + len(cells)] if one_run else src[self.index(cells)]
            rows.get(out=out)

    def scatter_from_host(self, dst: Array, cells: np.ndarray, rows: np.ndarray) -> None:
        """dst[cells[i]] = rows[i], with `rows` a host array."""
        data = rows if self.is_host else self.xp.asarray(rows)
        runs = _runs(cells)
        if runs is None:
            dst[self.index(cells)] = data
            return
        for begin, end in runs:
            first = int(cells[begin])
            dst[first : first + end - begin] = data[begin:end]


def _copy_rows(src: Array, cells: np.ndarray, out: np.ndarray, runs: list[tuple[int, int]] | None) -> None:
    """out[i] = src[cells[i]] on the host: runs of consecutive cells as block copies, else per row."""
    if runs is None:
        np.take(src, cells, axis=0, out=out)
        return
    for begin, end in runs:  # a sequence's cells mostly lie in runs: copy them as blocks
        first = int(cells[begin])
        out[begin:end] = src[first : first + end - begin]


def _runs(cells: np.ndarray, min_run: int = 8) -> list[tuple[int, int]] | None:
    """[begin, end) spans of `cells` that are consecutive cell ids (cells 5,6,7,20,21: (0,3), (3,5)),
    or None when runs are too short on average for block copies to beat a per-row gather."""
    if len(cells) < 2 * min_run:
        return None
    breaks = np.flatnonzero(np.diff(cells) != 1) + 1
    if (len(breaks) + 1) * min_run > len(cells):
        return None
    bounds = [0, *breaks.tolist(), len(cells)]
    return list(pairwise(bounds))


def get_backend(name: str = "auto") -> Backend:
    """ "auto" takes CuPy where a GPU is usable and NumPy otherwise; "cupy" insists on the GPU."""
    if name == "numpy":
        return Backend("numpy", np)
    if name in ("cupy", "auto"):
        cupy = _cupy_if_usable()
        if cupy is not None:
            return Backend("cupy", cupy)
        if name == "cupy":
            raise BackendUnavailable(
                "backend='cupy' needs CuPy and a usable CUDA GPU; install statemesh[gpu] on a GPU "
                "machine, or use backend='numpy' or 'auto'"
            )
        return Backend("numpy", np)
    raise InvalidInput(f"backend must be 'auto', 'numpy' or 'cupy', got {name!r}")
