"""A progress bar for slow loads, on tqdm: the count, rate and ETA drawn on a terminal, silent
otherwise (logs, pipes, tests, Ray workers). The interface is the loaders' (`advance` per piece
read); the drawing, the rate and the terminal handling are tqdm's."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

# "loading model.gguf [######........] 112/272 00:03<00:04, 35.2 it/s": the bar in '#' and '.', so
# that it reads the same on any terminal and in a captured log
BAR_FORMAT = "{desc} [{bar:30}] {n_fmt}/{total_fmt} {elapsed}<{remaining}, {rate_fmt}"


class Progress:
    """`total` pieces to go; `advance(n)` after each n. Drawn on `stream` (stderr by default) when
    `enabled`, or, left None, when the stream is a terminal. The bar ends its line once all is done."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None):
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._bar = tqdm(total=self.total, desc=label, file=self.stream, disable=not self.enabled, ascii=".#",
                         bar_format=BAR_FORMAT, mininterval=0.1, leave=True)  # fmt: skip

    def advance(self, n: int = 1) -> None:
        step = min(n, self.total - self.done)  # never past the end: a caller's extra advance is harmless
        self.done += step
        self._bar.update(step)
        if self.done == self.total:
            self.close()

    def close(self) -> None:
        """End the bar where it is (drawn once more, then its line ended); idempotent."""
        self._bar.close()
