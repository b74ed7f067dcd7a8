"""`Model`: a loaded checkpoint whose forward pass talks only to `statemesh.memory.Memory`.

An architecture supplies three pieces — `embed` (token ids -> hidden), `block` (one layer over a
micro-batch) and `head` (hidden -> logits) — and its `MemorySpec`. Everything else is here: running
a batch through memory micro-batch by micro-batch, pipeline shards by layer range, and the checks of
the input (token ids, logits flags) before memory changes.

A model may hold only some layers' weights (`held`: a pipeline stage's, `load_model(layers=...)`).
An architecture then builds those layers alone, in dicts by layer id, and the ends only where it
holds them (`EndWeights`); everything model-wide (config, memory spec, k_shift) stays the whole
model's, so a stage's memory is the whole spec restricted to its layers (`create_memory(layers=...)`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from statemesh.memory import Backend, Batch, Memory, MemorySpec, MicroBatch, create_memory
from statemesh.worker.errors import InvalidTokens, ModelError
from statemesh.worker.kernels.nn import LMHead, Weights
from statemesh.worker.kernels.row_blocks import RowBlocks
from statemesh.worker.kernels.threads import Threads
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.tokenizer import Tokenizer


class Model(ABC):
    config: ModelConfig
    tokenizer: Tokenizer
    backend: Backend
    held: range  # the layers whose weights it holds: all, or a pipeline stage's [first, end)
    weight_bytes: int  # what those weights (and the ends it holds) take on its backend

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

    @property
    def runs_in_parts(self) -> bool:
        """Whether a micro-batch of many sequences may run in parts, one per core (`Shard`): the
        architecture's layers then run on threads side by side, so they must not call BLAS's own
        threaded products there (`nn.in_part`). False unless the architecture says so."""
        return False

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
        held = self.held
        if not held.start <= first < end <= held.stop:
            raise ValueError(
                f"a shard of layers [{first}, {end}) needs weights this model does not hold: it was loaded with "
                f"layers [{held.start}, {held.stop}) of {self.n_layers}"
            )
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


class CountedWeights(Weights):
    """`Weights` that count the bytes they put on the backend: what the model built from them holds."""

    def __init__(self, tensors: dict[str, np.ndarray], backend: Backend):
        super().__init__(tensors, backend)
        self.nbytes = 0

    def put(self, t: np.ndarray, aside: bool = False) -> Any:
        out = super().put(t, aside)
        self.nbytes += int(out.nbytes)
        return out

    def put_side_by_side(self, parts: list[np.ndarray], axis: int, aside: bool = False) -> Any:
        out = super().put_side_by_side(parts, axis, aside)
        self.nbytes += int(out.nbytes)
        return out


@dataclass(frozen=True)
class EndWeights:
    """The weights outside the layers, which the pipeline stages at either end hold: the token
    embedding (before layer 0; `embed`) and the final norm and vocabulary head (after the last
    layer; `head`). None where the model does not hold them."""

    held: range
    n_layers: int
    embedding: Any | None  # [V, E]
    final_norm: Any | None  # [E]
    lm_head: LMHead | None

    @staticmethod
    def load(w: Weights, config: ModelConfig, held: range, embedding: str, final_norm: str, tied: bool) -> EndWeights:
        """The ends that layers `held` need, from the tensors named `embedding` and `final_norm` (and
        lm_head.weight unless `tied` or the checkpoint has none: then the head is the embedding)."""
        v, e = config.vocab_size, config.hidden_size
        first, last = held.start == 0, held.stop == config.n_layers
        table, head = None, None
        if first and last:
            table, head = w.embedding_and_head(embedding, v, e, tied)  # a tied head shares the table
        elif first:
            table = w.put(w.get(embedding, (v, e)))
        elif last:  # the head alone: a tied one from the embedding's tensor
            weight = w.get(embedding if tied or "lm_head.weight" not in w.tensors else "lm_head.weight", (v, e))
            head = w.lm_head(weight)
        norm = w.put(w.get(final_norm, (e,))) if last else None
        return EndWeights(held, config.n_layers, table, norm, head)

    def token_embedding(self) -> Any:
        if self.embedding is None:
            raise ModelError(f"the token embedding is held by the stage of layer 0; {self._holding}")
        return self.embedding

    def norm_and_head(self) -> tuple[Any, LMHead]:
        if self.final_norm is None or self.lm_head is None:
            last = self.n_layers - 1
            raise ModelError(f"the final norm and head are held by the stage of layer {last}; {self._holding}")
        return self.final_norm, self.lm_head

    @property
    def _holding(self) -> str:
        return f"this model holds layers [{self.held.start}, {self.held.stop}) of {self.n_layers}"


# Sequences per part. Below the least, a part's products stream all of the weights for too few rows
# (a 16-stream step in parts of 8: 76-86 -> 85-99 ms); above the most, they are too large for the
# small products (`RowBlocks`), and BLAS's own are better fed.
PART_MIN_SEQS = 16
PART_MAX_SEQS = 64


class Shard:
    """Layers [first, end) of a model over a memory that holds (at least) those layers.

    A micro-batch of many sequences runs in parts, one per core, each through every layer on its
    own thread (`MicroBatch.parts`): a decode step's products, attention and the small steps
    between them then need no hand-off between threads, where splitting each operation would
    need one or two a layer (~60 us each here)."""

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
        if self.is_last:
            out = xp.empty((int(wanted.sum()), model.config.vocab_size), dtype=xp.float32)
        else:
            out = xp.empty((batch.n_tokens, model.config.hidden_size), dtype=xp.float32)
        run = _Run(self, tokens if self.is_first else hidden, wanted, out)
        threads = model.threads
        with mem.batch(batch, n_ubatch=n_ubatch) as plan:
            for ub in plan:
                parts = ub.parts(threads.n) if threads is not None and self._cut(ub, threads.n) else [ub]
                if len(parts) > 1:
                    assert threads is not None
                    threads.map(run, [(part,) for part in parts])
                else:
                    run(ub)
        return out

    def _cut(self, ub: MicroBatch, n: int) -> bool:
        """Whether to run the micro-batch's sequences in n parts, one per core (`MicroBatch.parts`):
        where the model's layers can, for a decode step (one row a sequence) in which every part
        gets `PART_MIN_SEQS` to `PART_MAX_SEQS` sequences."""
        decoding = len(ub) == len(ub.seqs)
        return self.model.runs_in_parts and decoding and n * PART_MIN_SEQS <= len(ub) <= n * PART_MAX_SEQS

    def _checked_tokens(self, batch: Batch) -> np.ndarray:
        if batch.tokens is None:
            raise InvalidTokens("the first stage needs batch.tokens (token ids), got none")
        tokens: np.ndarray = batch.tokens
        vocab = self.model.config.vocab_size
        bad = tokens[(tokens < 0) | (tokens >= vocab)]
        if len(bad):
            raise InvalidTokens(f"token ids {bad[:5].tolist()} are outside the vocabulary 0 .. {vocab - 1}")
        return tokens


class _Run:
    """One micro-batch (or part of one) through a shard's layers, its rows written into `out`."""

    def __init__(self, shard: Shard, source: Any, wanted: np.ndarray, out: Any):
        self.shard, self.source, self.wanted, self.out = shard, source, wanted, out
        self.out_row = np.cumsum(wanted) - 1  # batch row -> its row in the logits

    def __call__(self, ub: MicroBatch) -> None:
        shard, model = self.shard, self.shard.model
        rows = model.backend.index(ub.rows)  # the micro-batch's rows, as the device indexes
        x = model.embed(self.source[ub.rows]) if shard.is_first else self.source[rows]
        shared = model.prepare(ub)
        picked = self.wanted[ub.rows]
        # the last layer's output only for the rows whose logits are wanted (as llama.cpp does)
        keep = model.backend.index(np.flatnonzero(picked)) if shard.is_last and not picked.all() else None
        for layer in range(shard.first, shard.end):
            x = model.block(layer, x, ub, shared, keep if layer == shard.end - 1 else None)
        if not shard.is_last:
            self.out[rows] = x
        elif picked.any():  # x holds just the picked rows (`keep`)
            self.out[model.backend.index(self.out_row[ub.rows[picked]])] = model.head(x)
