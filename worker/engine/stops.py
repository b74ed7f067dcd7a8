"""Stop strings across token boundaries: text that could still become a stop string is held back,
so a client never sees any part of a stop string, and text is cut exactly where one begins.

    stops ("\\n\\nUser:",): tokens "Hi", "\\n", "\\nUs", "er:" -> emits "Hi", then holds "\\n" and
    "\\n\\nUs", then finds the stop: nothing more is emitted, and the output ends with "Hi".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopMatcher:
    stops: tuple[str, ...]
    held: str = ""  # produced but not yet emitted: it may be the start of a stop string

    def push(self, text: str) -> tuple[str, bool]:
        """Add newly decoded text; returns (text safe to emit now, whether a stop string was hit)."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = self._partial_suffix()
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out, False

    def flush(self) -> str:
        """At the end of a generation, what was held back was not a stop string after all."""
        out, self.held = self.held, ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest end of `held` that is the beginning of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.held)), longest, -1):
                if self.held.endswith(stop[:n]):
                    longest = n
                    break
        return longest
