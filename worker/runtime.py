"""What a worker process needs from its environment, set before it starts.

Two things change how fast a worker runs, and both are read once, when the process starts, so
they cannot be changed from inside it:

- `OPENBLAS_THREAD_TIMEOUT`: after each call, OpenBLAS's threads poll for the next one for 2**n
  time-stamp ticks before they sleep (n = 28 by default: ~0.1 s of holding every core). A decode
  step alternates BLAS calls with attention that `Threads` spreads over the same cores, and that
  default starves it (32 streams: 182 tokens/s against 232). 2**20 ticks (~0.4 ms) bridges the
  gaps between one token's BLAS calls, so no call waits for a sleeping thread to wake: one stream
  decodes ~16% faster than at the minimum, 2**4 (A/B alternating, 8 pairs: median 34.2 -> 40.3
  tokens/s), and 32 streams are no slower beyond the noise (12 pairs over a day: -6% to +2% by
  hour). Shorter polls give less (2**18: ~+5% for one stream).
- glibc's malloc thresholds: with its defaults, a freed multi-MB buffer goes back to the kernel
  and the next one page-faults again (~2 us per 4 KB page; these machines give huge pages only to
  memory that asks for them, see `worker/host_arena.py`), which dominates gathers and snapshot
  writes of a few MB. Keeping freed memory mapped makes them 3-4x faster (`make bench`).

Launchers (the service's worker processes, the benchmarks) start workers with `worker_environment()`
added to their environment; `missing_settings()` names what this process lacks, for a warning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def worker_environment() -> dict[str, str]:
    return {
        "OPENBLAS_THREAD_TIMEOUT": "20",
        "MALLOC_TOP_PAD_": str(256 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
        "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    }


def missing_settings(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The worker settings this environment lacks (any value set by the user counts as set)."""
    return [name for name in worker_environment() if name not in environ]
