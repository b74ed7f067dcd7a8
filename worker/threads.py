"""`Threads`: the cores for NumPy work that would otherwise run on one.

BLAS spreads a large matmul over every core, but decode attention is many small matmuls and a
softmax, and the vocabulary head's small products (`RowBlocks`) many small matmuls, each run on
the calling thread. NumPy lets go of the GIL inside them, so cutting the
sequences of a step into one part per core and running the parts side by side uses the other
cores: 32 sequences of ~300 tokens on 2 cores, ~38 -> ~27 ms of attention a step.

That only works if BLAS's own threads are not holding those cores: OpenBLAS polls for work after
each call (for about 0.1 s by default). A worker process starts with a short poll, ~0.4 ms
(`statemesh.worker.runtime.worker_environment()`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any


class Threads:
    def __init__(self, n: int | None = None):
        self.n = max(1, n if n is not None else len(os.sched_getaffinity(0)))
        self._pool = ThreadPoolExecutor(self.n - 1, thread_name_prefix="statemesh-numpy") if self.n > 1 else None

    def map(self, fn: Callable[..., Any], parts: Sequence[tuple[Any, ...]]) -> list[Any]:
        """[fn(*part) for part in parts], the first on this thread and the others beside it."""
        if self._pool is None or len(parts) < 2:
            return [fn(*part) for part in parts]
        others = [self._pool.submit(fn, *part) for part in parts[1:]]
        first = fn(*parts[0])
        return [first, *(f.result() for f in others)]

    def spans(self, n: int, parts: int | None = None) -> list[slice]:
        """range(n) cut into `parts` (default: one per thread) near-equal, non-empty slices, for
        `map` (n=7, 2 parts: [0:3], [3:7]; n=1, 2 parts: [0:1])."""
        parts = self.n if parts is None else parts
        cuts = [n * i // parts for i in range(parts + 1)]
        return [slice(lo, hi) for lo, hi in pairwise(cuts) if hi > lo]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
