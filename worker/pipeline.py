"""A replica split into pipeline stages: the model and the memory the engine sees when a replica's
layers live in several workers, so the engine never asks how many there are.

`PipelineModel` stands for the model: its `decode` runs a batch through every stage. Its
`create_memory` gives a `PipelineMemory`, whose operations go to every stage's memory and whose
answers combine as a hybrid's parts' do. Stage 0 runs here, in the engine's process. The later
stages are `Stage`s: a worker holding layers [first, end) and their memory, called synchronously
(`shard_actor.RayStage` reaches one through Ray; a test may pass a `StageWorker` itself).

One batch, across actors, keeps the contract's rule that a batch that fails changes nothing:
- every stage plans it first (its memory's dry run), so MemoryFull on any stage changes no stage;
- then it runs, stage 0 here and the others in turn, activations passing stage to stage (as Ray
  object references: this process gets only the last stage's logits);
- nothing else writes the stages' memories between the plan and the run (the engine is their only
  writer), so the run cannot run out of room.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

from statemesh.memory import Batch, Memory, MemorySpec, merge_snapshots
from statemesh.memory import snapshot as snapshot_format
from statemesh.memory.base import Leaf, Loader
from statemesh.memory.plan import BatchPlan, Transaction
from statemesh.memory.snapshot import Document, Section, Span
from statemesh.worker.architectures.model import Model

# memory operations a stage answers (`StageWorker.memory`): the contract's public ones
MEMORY_OPS = frozenset({
    "clear", "seq_rm", "seq_cp", "seq_keep", "seq_add", "seq_div", "seq_pos_min", "seq_pos_max", "seq_ids",
    "room_to_grow", "stats", "check_integrity", "state_write", "state_read", "can_shift",
})  # fmt: skip


class Stage(Protocol):
    """A later pipeline stage, as stage 0 calls it."""

    def plan(self, batch: Batch, n_ubatch: int) -> None:
        """Dry-run `batch` on this stage's memory: MemoryFull (nothing changed) if it cannot fit."""

    def forward(self, batch: Batch, hidden: Any, n_ubatch: int) -> Any:
        """Run the batch through this stage's layers; `hidden` may be what the previous stage's
        `forward` returned (a reference); returns a reference to its output."""

    def result(self, ref: Any) -> Any:
        """The value behind what `forward` returned."""

    def memory(self, op: str, *args: Any) -> Any:
        """Call memory operation `op` (one of MEMORY_OPS) on this stage's memory."""


def split_layers(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Layers [first, end) of each stage, as even as whole layers allow: 30 layers, 4 stages ->
    [(0, 8), (8, 15), (15, 23), (23, 30)]."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"a model of {n_layers} layers splits into 1 .. {n_layers} stages, not {n_stages}")
    cuts = [(2 * i * n_layers + n_stages) // (2 * n_stages) for i in range(n_stages + 1)]  # halves round up
    return list(itertools.pairwise(cuts))


class PipelineMemory(Memory):
    """The memories of every stage as one: operations go to all; answers combine (a sequence's
    first position is the largest of the stages' firsts, its last the smallest of their lasts;
    room to grow is the least any stage has)."""

    def __init__(self, local: Memory, stages: list[Stage], spec: MemorySpec, recurrent: list[bool]):
        self.local = local
        self.stages = stages
        self.spec = spec
        self.layers = tuple(range(len(spec.layers)))
        self.n_seq_max = local.n_seq_max
        self.backend = local.backend
        self.recurrent = recurrent  # per part (stage 0 first): whether it holds recurrent layers

    def _call(self, part: int, op: str, *args: Any) -> Any:
        if part == 0:
            return getattr(self.local, op)(*args)
        return self.stages[part - 1].memory(op, *args)

    def _all(self, op: str, *args: Any) -> list[Any]:
        return [self._call(i, op, *args) for i in range(1 + len(self.stages))]

    def clear(self) -> None:
        self._all("clear")

    def seq_rm(self, seq: int | None, p0: int | None = None, p1: int | None = None) -> bool:
        # Only a recurrent part refuses (a cut inside its state), and every recurrent part holds the
        # same positions, so they all answer alike: ask them first, and the attention-only parts,
        # which never refuse, only once they have accepted. A refusal leaves every part unchanged.
        order = sorted(range(1 + len(self.stages)), key=lambda i: not self.recurrent[i])
        return all(self._call(i, "seq_rm", seq, p0, p1) for i in order)

    def seq_cp(self, src: int, dst: int, p0: int | None = None, p1: int | None = None) -> None:
        self._all("seq_cp", src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        self._all("seq_keep", seq)

    def seq_add(self, seq: int | None, p0: int | None, p1: int | None, delta: int) -> None:
        self._all("seq_add", seq, p0, p1, delta)

    def seq_div(self, seq: int | None, p0: int | None, p1: int | None, d: int) -> None:
        self._all("seq_div", seq, p0, p1, d)

    def seq_pos_min(self, seq: int) -> int:
        return int(max(self._all("seq_pos_min", seq)))

    def seq_pos_max(self, seq: int) -> int:
        return int(min(self._all("seq_pos_max", seq)))

    def seq_ids(self) -> list[int]:
        return sorted(set().union(*self._all("seq_ids")))

    @property
    def can_shift(self) -> bool:
        return bool(self.local.can_shift and all(stage.memory("can_shift") for stage in self.stages))

    def room_to_grow(self) -> int | None:
        rooms = [r for r in self._all("room_to_grow") if r is not None]
        return min(rooms) if rooms else None

    def stats(self) -> dict[str, Any]:
        parts = self._all("stats")
        return {
            "kind": parts[0]["kind"],
            "cells_total": min(p["cells_total"] for p in parts),
            "cells_used": max(p["cells_used"] for p in parts),
            "seqs": len(self.seq_ids()),
            "bytes": sum(p["bytes"] for p in parts),
            "device": self.backend.name,
            "stages": parts,
        }

    def check_integrity(self) -> None:
        self._all("check_integrity")

    def state_write_buffer(self, seq: int | None = None, p0: int | None = None, p1: int | None = None) -> memoryview:
        return memoryview(merge_snapshots(self._all("state_write", seq, p0, p1)))

    def state_read(self, data: Any, seq: int | None = None) -> None:
        """Each stage reads its own layers. Reading into one sequence is atomic across stages: when
        a stage refuses, those that had read drop the sequence again (the engine reads only into
        empty sequences), or, for a piece that continues the sequence, drop what it added (a
        piece that also ends it has replaced recurrent states, which cannot come back: the engine
        drops a sequence whose piece failed)."""
        data = bytes(data)
        done: list[int] = []
        try:
            for i in range(1 + len(self.stages)):
                self._call(i, "state_read", data, seq)
                done.append(i)
        except BaseException:
            if seq is not None and done:  # stage 0 read it, so it decodes: where a piece began
                p0 = snapshot_format.decode(data).span.p0
                for i in done:
                    self._call(i, "seq_rm", seq, p0 or None, None)
            raise

    @property
    def max_snapshot_bytes(self) -> int:
        return self.local.max_snapshot_bytes * (1 + len(self.stages))

    # the hooks below serve the base class's batch and snapshot code, which this class replaces
    def batch(self, batch: Batch, n_ubatch: int = 512) -> BatchPlan:
        raise NotImplementedError("a pipeline's memory is planned stage by stage: use PipelineModel.decode")

    @property
    def _attention_cells(self) -> int:
        raise NotImplementedError

    @property
    def _equal_split(self) -> bool:
        raise NotImplementedError

    def _leaf(self, layer: int) -> Leaf:
        raise NotImplementedError

    def _transaction(self, real: bool) -> Transaction:
        raise NotImplementedError

    def _snapshot_sections(self, seq: int | None, span: Span) -> list[Section]:
        raise NotImplementedError

    def _snapshot_prepare(self, doc: Document, seq: int | None) -> list[Loader]:
        raise NotImplementedError


class PipelineModel(Model):
    """A model whose layers [0, end) run here and the rest in `stages`, in order."""

    def __init__(self, model: Model, ranges: list[tuple[int, int]], stages: list[Stage]):
        if len(ranges) != 1 + len(stages) or ranges[0][0] != 0:
            raise ValueError(f"stage 0 runs here from layer 0, and each later stage needs a range; got {ranges}")
        self.inner = model
        self.ranges = [range(a, b) for a, b in ranges]
        self.end = ranges[0][1]
        self.stages = stages
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.backend = model.backend
        self.held = range(model.n_layers)  # every layer runs, here or in a stage
        self.weight_bytes = (
            model.weight_bytes
        )  # of this process: stage 0 needs only its own layers' (and the embedding)

    @property
    def runs_in_parts(self) -> bool:
        return self.inner.runs_in_parts

    def memory_spec(self) -> MemorySpec:
        return self.inner.memory_spec()

    def create_memory(self, n_ctx: int, n_seq_max: int, n_ubatch: int = 512, layers: range | None = None) -> Memory:
        local = self.inner.create_memory(n_ctx, n_seq_max, n_ubatch, layers=range(0, self.end))
        recurrent_layers = set(self.memory_spec().recurrent_layers)
        recurrent = [bool(set(self.inner.memory_layers(r)) & recurrent_layers) for r in self.ranges]
        return PipelineMemory(local, self.stages, self.memory_spec(), recurrent)

    def decode(self, mem: Memory, batch: Batch, n_ubatch: int = 512) -> Any:
        assert isinstance(mem, PipelineMemory)
        mem.local.batch(batch, n_ubatch=n_ubatch)  # plan every stage first: MemoryFull anywhere changes nothing
        for stage in self.stages:
            stage.plan(batch, n_ubatch)
        x = self.inner.shard(0, self.end).forward(mem.local, batch, n_ubatch=n_ubatch)
        for stage in self.stages:
            x = stage.forward(batch, x, n_ubatch)
        return self.stages[-1].result(x)

    def embed(self, tokens: Any) -> Any:
        return self.inner.embed(tokens)

    def block(self, layer: int, x: Any, ub: Any, shared: Any, keep: Any = None) -> Any:
        return self.inner.block(layer, x, ub, shared, keep)

    def head(self, x: Any) -> Any:
        return self.inner.head(x)


class StageWorker:
    """A later stage: layers [first, end) of `model` and their memory."""

    def __init__(self, model: Model, first: int, end: int, n_ctx: int, n_seq_max: int, n_ubatch: int):
        self.model = model
        self.shard = model.shard(first, end)
        self.mem = model.create_memory(n_ctx, n_seq_max, n_ubatch, layers=range(first, end))

    def plan(self, batch: Batch, n_ubatch: int) -> None:
        self.mem.batch(batch, n_ubatch=n_ubatch)

    def forward(self, batch: Batch, hidden: Any, n_ubatch: int) -> Any:
        return self.shard.forward(self.mem, batch, hidden, n_ubatch=n_ubatch)

    def result(self, ref: Any) -> Any:
        return ref

    def memory(self, op: str, *args: Any) -> Any:
        if op not in MEMORY_OPS:
            raise ValueError(f"{op!r} is not a memory operation a stage answers ({sorted(MEMORY_OPS)})")
        value = getattr(self.mem, op)
        return value(*args) if callable(value) else value
