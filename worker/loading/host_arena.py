"""`HostArena`: host memory for a model's weights, backed by 2 MB pages where the kernel allows.

Decoding streams every weight once per token. With 4 KB pages that is a TLB miss every 4 KB, and
the smaller matrices, which stream slowest anyway, suffer most: one row through 30 layers of
SmolLM2's q/k/v, output and down projections takes ~13-19% less time from 2 MB pages. NumPy asks
the kernel for huge pages by itself only for arrays of 4 MB or more, and only memory never touched
before gets them, so those 1.3-3.5 MB matrices end up in 4 KB pages (and larger ones too, when
they reuse memory freed while loading). Here every weight is copied into fresh anonymous mappings,
which are made huge pages afterwards. End to end, A/B alternating: single-stream decode +2% to +11%
(8 pairs in one process: median 45.1 -> 45.9 tokens/s; 3 pairs of fresh processes: 38.6 -> 42.9),
32 streams +3% (241 -> 250). Where the kernel has no huge pages this is ordinary memory.

Afterwards, not at once: on these machines (virtual machines that hand free memory back to their
host) a huge page costs ~10-20 ms the first time it is touched, so SmolLM2's 651 MB took 3.3-7.4 s
to fill when the mappings asked for huge pages before the first touch (MADV_HUGEPAGE), and 0.8-3.0
s in 4 KB pages (fresh processes, 3 each, on a busy host). So the load writes 4 KB pages, and once
the writes have paused for `SETTLE_S`, a daemon thread has the kernel collapse what was written into
huge pages (MADV_COLLAPSE, Linux 6.1+; 2-6 s for those 651 MB, in the kernel, without the GIL)
while the model already serves. Where the kernel cannot collapse, the range is only marked MADV_HUGEPAGE,
for the kernel's own collapsing thread (khugepaged) to get to.

Filling the arena is a large part of a model's load (651 MB for SmolLM2 in float32), and most of
it is transposed, since the checkpoints' [out, in] matrices are kept [in, out]. NumPy copies a
transposed matrix element by element down the source's columns, a cache miss per element for a
wide one; `fill` copies it a block of `TRANSPOSE_BLOCK` source rows at a time, which stay in cache
while their columns are written (SmolLM2's [3072, 576] gate/up: 6.0 -> 1.6 ms; its [49152, 576]
head: 211 -> 97 ms; best of 5 on a busy host). `concatenate` writes parts side by side straight
into the arena, with no concatenated temporary to copy from.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
import time
from typing import Any

import numpy as np

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # <linux/mman.h>, Linux 6.1+: make huge pages of a populated range now
SETTLE_S = 0.5  # collapse once the arena has not been written for this long (a load writes without pause)
THREAD_NAME = "host-arena-huge-pages"
CHUNK = 256 << 20  # bytes mapped at a time; pages never written cost no memory
ALIGN = 64  # each array starts on a cache line
TRANSPOSE_BLOCK = 64  # source rows per block of a transposed copy: 64 rows of 576 floats (147 KB) stay in L2


class HostArena:
    def __init__(self) -> None:
        self._chunk: np.ndarray | None = None  # uint8 view of the current mapping
        self._at = 0  # next free byte in it
        self._huge_pages = HugePager()

    def copy(self, a: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
        """A C-contiguous copy of `a` (as `dtype`, by default its own) in the arena; the arena's
        mappings live as long as the copies do."""
        out = self._empty(a.shape, a.dtype if dtype is None else dtype)
        fill(out, a)
        self._written()
        return out

    def concatenate(self, parts: list[np.ndarray], axis: int, dtype: np.dtype | type) -> np.ndarray:
        """`np.concatenate(parts, axis)` as `dtype`, written straight into the arena."""
        shape = list(parts[0].shape)
        shape[axis] = sum(part.shape[axis] for part in parts)
        out = self._empty(tuple(shape), dtype)
        at = 0
        for part in parts:
            width = part.shape[axis]
            fill(out[(slice(None),) * axis + (slice(at, at + width),)], part)
            at += width
        self._written()
        return out

    def settle(self, timeout: float | None = None) -> bool:
        """Waits until what was written so far is in huge pages (as far as the kernel gives them);
        False if `timeout` seconds passed first. Nothing needs to wait: this is for tests and
        benchmarks."""
        return self._huge_pages.settle(timeout)

    def _empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A C-contiguous array in the arena, not yet written (its pages cost nothing until then)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        start = self._at + (-self._at) % ALIGN
        if self._chunk is None or start + nbytes > len(self._chunk):
            self._chunk, start = self._map(nbytes)
            self._huge_pages.add_chunk(self._chunk, start)
        self._at = start + nbytes
        return self._chunk[start : start + nbytes].view(dtype).reshape(shape)

    def _written(self) -> None:
        assert self._chunk is not None
        self._huge_pages.written(self._chunk, self._at)

    @staticmethod
    def _map(nbytes: int) -> tuple[np.ndarray, int]:
        """A fresh mapping of at least `nbytes` past its first 2 MB boundary (huge pages must be
        aligned to their size), and where that boundary is."""
        mapping = mmap.mmap(-1, max(CHUNK, nbytes + HUGE_PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        chunk = np.frombuffer(mapping, dtype=np.uint8)  # keeps the mapping alive
        return chunk, (-chunk.ctypes.data) % HUGE_PAGE


def fill(out: np.ndarray, a: np.ndarray) -> None:
    """out[...] = a, converting. A matrix laid out column-major (a transposed one: the longer stride
    is its columns') is copied a block of its columns at a time, so that the rows they come from
    stay in cache (see the module's docstring)."""
    if a.ndim == 2 and abs(a.strides[1]) > abs(a.strides[0]):
        for j in range(0, a.shape[1], TRANSPOSE_BLOCK):
            out[:, j : j + TRANSPOSE_BLOCK] = a[:, j : j + TRANSPOSE_BLOCK]
    else:
        out[...] = a


class HugePager:
    """Collapses an arena's written 2 MB pages into huge pages on a daemon thread, once writing has
    paused for `SETTLE_S` (see the module's docstring). Only whole 2 MB pages that are written are
    asked for: the kernel would fill the rest of a partly written one with zeros."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: list[list[Any]] = []  # [chunk, first byte not yet asked for, end of what is written]
        self._last_write = 0.0
        self._thread: threading.Thread | None = None
        self._done = threading.Condition(self._lock)

    def add_chunk(self, chunk: np.ndarray, first_boundary: int) -> None:
        with self._lock:
            self._chunks.append([chunk, first_boundary, first_boundary])

    def written(self, chunk: np.ndarray, end: int) -> None:
        """The arena wrote `chunk` up to byte `end`."""
        with self._lock:
            record = next(r for r in reversed(self._chunks) if r[0] is chunk)
            record[2] = max(record[2], end)
            self._last_write = time.monotonic()
            if self._thread is None and _LIBC is not None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()

    def settle(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._thread is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._done.wait(left)
        return True

    def _run(self) -> None:
        while True:  # wait for the writes to pause
            with self._lock:
                pause = self._last_write + SETTLE_S - time.monotonic()
                if pause <= 0:
                    ranges = self._take_ranges()
                    break
            time.sleep(pause)
        for chunk, start, stop in ranges:
            collapse(chunk, start, stop)
        with self._lock:
            self._thread = None
            self._done.notify_all()
            if any(r[2] - r[1] >= HUGE_PAGE for r in self._chunks):  # written while collapsing: go again
                self._last_write = time.monotonic()
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()

    def _take_ranges(self) -> list[tuple[np.ndarray, int, int]]:
        """The whole 2 MB pages written and not yet asked for, now marked asked for."""
        ranges = []
        for record in self._chunks:
            chunk, asked, end = record
            stop = asked + (end - asked) // HUGE_PAGE * HUGE_PAGE
            if stop > asked:
                ranges.append((chunk, asked, stop))
                record[1] = stop
        return ranges


def wait_for_huge_pages(timeout: float | None = None) -> bool:
    """Waits until no arena of this process is collapsing pages (benchmarks measure after that);
    False if `timeout` seconds passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while busy := [t for t in threading.enumerate() if t.name == THREAD_NAME]:  # a thread may hand over to another
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        busy[0].join(left)
    return True


def _libc() -> Any:
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()  # madvise through ctypes, which lets go of the GIL (mmap.madvise holds it)


def collapse(chunk: np.ndarray, start: int, stop: int) -> None:
    """Huge pages for bytes [start, stop) of `chunk` (2 MB aligned), now where the kernel can
    (MADV_COLLAPSE), else marked for khugepaged (MADV_HUGEPAGE); ordinary pages where neither works."""
    assert _LIBC is not None
    address = chunk.ctypes.data + start
    if _LIBC.madvise(address, stop - start, MADV_COLLAPSE) != 0:
        _LIBC.madvise(address, stop - start, mmap.MADV_HUGEPAGE)
