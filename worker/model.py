"""`Model`: a loaded checkpoint whose forward pass talks only to `statemesh.memory.Memory`.

An architecture supplies three pieces — `embed` (token ids -> hidden), `block` (one layer over a
micro-batch) and `head` (hidden -> logits) — and its `MemorySpec`. Everything else is here: running
a batch through memory micro-batch by micro-batch, pipeline shards by layer range, and the checks of
the input (token ids, logits flags) before memory changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import Any

import numpy as np

from statemesh.memory import Backend, Batch, Memory, MemorySpec, MicroBatch, create_memory
from statemesh.worker.config import ModelConfig
from statemesh.worker.errors import InvalidTokens
from statemesh.worker.row_blocks import RowBlocks
from statemesh.worker.threads import Threads
from statemesh.worker.tokenizer import Tokenizer


class Model(ABC):
    config: ModelConfig
    tokenizer: Tokenizer
    backend: Backend

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @cached_property
    def threads(self) -> Threads | None:
        """The host's cores for work that would run on one (decode attention); None on a device."""
        return Threads() if self.backend.is_host else None

    @cached_property
    def row_blocks(self) -> RowBlocks | None:
        """Small products for a few rows through a large weight (the vocabulary head), where the
        host's BLAS has the kernels for them; None on a device or without them."""
        threads = self.threads
        return RowBlocks(threads) if threads is not None and RowBlocks.available() else None

    @abstractmethod
    def memory_spec(self) -> MemorySpec:
        """What each layer keeps per token or per sequence."""

    def k_shift(self, layer: int, k: Any, delta: Any) -> Any | None:
        """Re-rotate stored keys when positions move; None for models without positional keys."""
        return None

    def memory_layers(self, layers: range) -> list[int]:
        """The memory layers that model layers `layers` use: the same ids, unless a model layer
        keeps two kinds of state (Falcon-H1 runs attention and a state space mixer side by side)."""
        return list(layers)

    def create_memory(self, n_ctx: int, n_seq_max: int, n_ubatch: int = 512, layers: range | None = None) -> Memory:
        """Memory for the whole model, or for the model layers `layers` of a pipeline shard."""
        has_shift = type(self).k_shift is not Model.k_shift
        return create_memory(
            self.memory_spec(), n_ctx=n_ctx, n_seq_max=n_seq_max, n_ubatch=n_ubatch,
            layers=None if layers is None else self.memory_layers(layers), backend=self.backend.name,
            k_shift=self.k_shift if has_shift else None,
        )  # fmt: skip

    def decode(self, mem: Memory, batch: Batch, n_ubatch: int = 512) -> Any:
        """float32 logits [rows whose `logits` flag is set (every row when None), vocab], in batch
        order; the batch's tokens are now in `mem`."""
        return self.shard(0, self.n_layers).forward(mem, batch, n_ubatch=n_ubatch)

    def shard(self, first: int, end: int) -> Shard:
        """Layers [first, end) as one pipeline stage (embedding on the first, head on the last)."""
        if not 0 <= first < end <= self.n_layers:
            raise ValueError(f"a shard covers layers [first, end) within 0 .. {self.n_layers}, got [{first}, {end})")
        return Shard(self, first, end)

    # ---- what an architecture implements ----------------------------------------------------------

    @abstractmethod
    def embed(self, tokens: np.ndarray) -> Any:
        """token ids [n] -> hidden [n, hidden_size]"""

    def prepare(self, ub: MicroBatch) -> Any:
        """What every layer of this micro-batch shares (e.g. RoPE tables), computed once per
        micro-batch and handed to `block`; None by default."""
        return None

    @abstractmethod
    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any, keep: Any = None) -> Any:
        """One layer over the micro-batch's rows: hidden [n, E] -> hidden [n, E]. With `keep` (row
        indices on the backend) only those rows come out, [len(keep), E]: the mixer still runs over
        every row, whose keys and states memory must hold, but what follows it only over the kept
        ones (the last layer of a prompt chunk, of which one row's logits are wanted)."""

    @abstractmethod
    def head(self, x: Any) -> Any:
        """hidden [n, E] -> float32 logits [n, vocab] (final norm included)."""


class Shard:
    """Layers [first, end) of a model over a memory that holds (at least) those layers."""

    def __init__(self, model: Model, first: int, end: int):
        self.model, self.first, self.end = model, first, end

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.model.n_layers

    def forward(self, mem: Memory, batch: Batch, hidden: Any = None, n_ubatch: int = 512) -> Any:
        """The first stage takes `batch.tokens`; later ones take `hidden` [n, E] in batch order.
        Returns hidden [n, E] in batch order, or on the last stage logits as `Model.decode`."""
        model, xp = self.model, self.model.backend.xp
        if self.is_first:
            tokens = self._checked_tokens(batch)
        elif hidden is None or hidden.shape != (batch.n_tokens, model.config.hidden_size):
            raise InvalidTokens(
                f"layers from {self.first} take hidden states of shape ({batch.n_tokens}, {model.config.hidden_size})"
            )
        wanted = np.ones(batch.n_tokens, dtype=bool) if batch.logits is None else batch.logits
        out_row = np.cumsum(wanted) - 1  # batch row -> its row in the logits
        out = None
        with mem.batch(batch, n_ubatch=n_ubatch) as plan:
            for ub in plan:
                rows = model.backend.index(ub.rows)  # the micro-batch's rows, as the device indexes
                x = model.embed(tokens[ub.rows]) if self.is_first else hidden[rows]
                shared = model.prepare(ub)
                picked = wanted[ub.rows]
                # the last layer's output only for the rows whose logits are wanted (as llama.cpp does)
                keep = model.backend.index(np.flatnonzero(picked)) if self.is_last and not picked.all() else None
                for layer in range(self.first, self.end):
                    x = model.block(layer, x, ub, shared, keep if layer == self.end - 1 else None)
                if not self.is_last:
                    if out is None:
                        out = xp.empty((batch.n_tokens, x.shape[1]), dtype=x.dtype)
                    out[rows] = x
                    continue
                if out is None:
                    out = xp.empty((int(wanted.sum()), model.config.vocab_size), dtype=xp.float32)
                if picked.any():  # x holds just the picked rows (`keep`)
                    out[model.backend.index(out_row[ub.rows[picked]])] = model.head(x)
        return out

    def _checked_tokens(self, batch: Batch) -> np.ndarray:
        if batch.tokens is None:
            raise InvalidTokens("the first stage needs batch.tokens (token ids), got none")
        tokens: np.ndarray = batch.tokens
        vocab = self.model.config.vocab_size
        bad = tokens[(tokens < 0) | (tokens >= vocab)]
        if len(bad):
            raise InvalidTokens(f"token ids {bad[:5].tolist()} are outside the vocabulary 0 .. {vocab - 1}")
        return tokens
