"""A progress bar for slow loads: drawn on a terminal, silent otherwise (logs, pipes, tests)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None):
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._drawn_at = 0.0

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        now = time.monotonic()
        if self.enabled and (now - self._drawn_at > 0.1 or self.done == self.total):
            self._drawn_at = now
            width = 30
            filled = width * self.done // self.total
            self.stream.write(
                f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{now - self.started:.1f}s"
            )
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()
