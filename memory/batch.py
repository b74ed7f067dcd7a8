"""`Batch`: the tokens a model step feeds through memory, one row per token.

Per row: its position and sequence (and for the model, its token id and whether its logits are
wanted). Arrays or lists are accepted and normalized to NumPy on construction; a batch whose arrays
disagree is refused here, before any memory sees it. Whether positions continue their sequences
depends on the memory, so `Memory.batch` checks that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from statemesh.memory.errors import InvalidBatch


def _int_array(name: str, value: Any) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != 1:
        raise InvalidBatch(f"batch {name} must be one-dimensional, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InvalidBatch(f"batch {name} must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class Batch:
    """`positions[i]`, `seq_ids[i]` (and optionally `tokens[i]`, `logits[i]`) describe row i."""

    positions: Any
    seq_ids: Any
    tokens: Any = None
    logits: Any = None

    def __post_init__(self) -> None:
        positions = _int_array("positions", self.positions)
        seq_ids = _int_array("seq_ids", self.seq_ids)
        n = len(positions)
        if n == 0:
            raise InvalidBatch("a batch needs at least one token, got 0")
        if len(seq_ids) != n:
            raise InvalidBatch(f"batch seq_ids has {len(seq_ids)} entries, expected {n} (one per position)")
        if positions.min() < 0:
            raise InvalidBatch(f"batch positions must be >= 0, got {int(positions.min())}")
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "seq_ids", seq_ids)
        if self.tokens is not None:
            tokens = _int_array("tokens", self.tokens)
            if len(tokens) != n:
                raise InvalidBatch(f"batch tokens has {len(tokens)} entries, expected {n}")
            object.__setattr__(self, "tokens", tokens)
        if self.logits is not None:
            logits = np.asarray(self.logits)
            if logits.shape != (n,) or logits.dtype != np.bool_:
                raise InvalidBatch(f"batch logits must be {n} booleans, got dtype {logits.dtype} shape {logits.shape}")
            object.__setattr__(self, "logits", logits)

    @property
    def n_tokens(self) -> int:
        return len(self.positions)
