"""`Threads`: the cores for NumPy work that would otherwise run on one.

BLAS spreads a large matmul over every core, but decode attention is many small matmuls and a
softmax, and the vocabulary head's small products (`RowBlocks`) many small matmuls, each run on
the calling thread. NumPy lets go of the GIL inside them, so cutting the
sequences of a step into one part per core and running the parts side by side uses the other
cores: 32 sequences of ~300 tokens on 2 cores, ~38 -> ~27 ms of attention a step. A whole decode
step goes this way too (`Shard`: a micro-batch's parts, each through every layer), and what runs
inside a part (`inside`) must keep to its own core: a map there runs on the part's thread.

That only works if BLAS's own threads are not holding those cores: OpenBLAS polls for work after
each call (for about 0.1 s by default). A worker process starts with a short poll, ~0.4 ms
(`statemesh.worker.runtime.worker_environment()`).

A hand-off costs: waking a pool thread and waiting for it takes ~60 us here (a map of two empty
parts), so a map is worth it for parts of a millisecond or more.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from itertools import pairwise
from typing import Any


class Threads:
    def __init__(self, n: int | None = None):
        self.n = max(1, n if n is not None else len(os.sched_getaffinity(0)))
        self._pool = ThreadPoolExecutor(self.n - 1, thread_name_prefix="statemesh-numpy") if self.n > 1 else None
        self._mapping = threading.local()  # .active: this thread runs a part of a `map`

    @property
    def inside(self) -> bool:
        """Whether this thread is running a part of a `map` (whose cores are all taken)."""
        return getattr(self._mapping, "active", False)

    @property
    def free(self) -> int:
        """The cores this thread may spread work over: 1 inside a part of a `map`, else all."""
        return 1 if self.inside else self.n

    def map(self, fn: Callable[..., Any], parts: Sequence[tuple[Any, ...]]) -> list[Any]:
        """[fn(*part) for part in parts], the first on this thread and the others beside it. A map
        called from inside a part runs its parts one after another on that thread: the cores are
        taken, and the pool's threads may all be waiting on it. Every part has ended when it
        returns or raises (the first error), so none still writes to what the caller goes on to use."""
        if self._pool is None or len(parts) < 2 or self.inside:
            return [fn(*part) for part in parts]
        others = [self._pool.submit(self._part, fn, part) for part in parts[1:]]
        try:
            first = self._part(fn, parts[0])
        finally:
            wait(others)
        return [first, *(f.result() for f in others)]

    def _part(self, fn: Callable[..., Any], part: tuple[Any, ...]) -> Any:
        self._mapping.active = True
        try:
            return fn(*part)
        finally:
            self._mapping.active = False

    def spans(self, n: int, parts: int | None = None) -> list[slice]:
        """range(n) cut into `parts` (default: one per free core) near-equal, non-empty slices, for
        `map` (n=7, 2 parts: [0:3], [3:7]; n=1, 2 parts: [0:1])."""
        parts = self.free if parts is None else parts
        cuts = [n * i // parts for i in range(parts + 1)]
        return [slice(lo, hi) for lo, hi in pairwise(cuts) if hi > lo]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
