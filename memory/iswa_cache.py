"""`ISWACache`: interleaved sliding-window attention (Gemma 2/3, gpt-oss; all-layer windows as in
Mistral): a full `KVCache` for the full-attention layers plus a small windowed `KVCache` for the
windowed layers, pure delegation.

The windowed cache is sized from the windows, `n_seq_max` and `n_ubatch`: each sequence keeps at most
`window - 1` cells between batches and a micro-batch adds at most `n_ubatch`, so
`n_seq_max * window + n_ubatch` cells (never more than `n_ctx`) always suffice.
"""

from __future__ import annotations

from typing import Any

from statemesh.memory import snapshot
from statemesh.memory.backend import Backend
from statemesh.memory.base import Leaf, Loader, Memory
from statemesh.memory.errors import InvalidLayer
from statemesh.memory.kv_cache import KShift, KVCache
from statemesh.memory.plan import CompositeTransaction, Transaction
from statemesh.memory.specs import MemorySpec


class ISWACache(Memory):
    def __init__(
        self,
        spec: MemorySpec,
        *,
        n_ctx: int,
        n_seq_max: int,
        n_ubatch: int,
        layers: tuple[int, ...],
        backend: Backend,
        k_shift: KShift | None = None,
    ):
        full = tuple(i for i in layers if spec.attention(i).window is None)
        windowed = tuple(i for i in layers if spec.attention(i).window is not None)
        if not windowed:
            raise InvalidLayer("an ISWACache needs at least one windowed layer; use a KVCache")
        window = max(spec.attention(i).window or 0 for i in windowed)
        self.spec = spec
        self.layers = tuple(layers)
        self.n_seq_max = n_seq_max
        self.backend = backend
        self.window = window
        common: dict[str, Any] = dict(n_seq_max=n_seq_max, backend=backend, k_shift=k_shift)
        self.full = KVCache(spec, n_cells=n_ctx, layers=full, **common) if full else None
        self.windowed = KVCache(
            spec,
            n_cells=min(n_ctx, n_seq_max * window + n_ubatch),
            layers=windowed,
            window=window,
            part=snapshot.PART_WINDOWED,
            **common,
        )
        self.parts = [p for p in (self.full, self.windowed) if p is not None]

    def clear(self) -> None:
        self._mutate()
        for p in self.parts:
            p.clear()

    def seq_rm(self, seq: int | None, p0: int | None = None, p1: int | None = None) -> bool:
        self._mutate()
        seq = self._check_seq_or_all(seq)
        return all([p.seq_rm(seq, p0, p1) for p in self.parts])  # KV caches never refuse

    def seq_cp(self, src: int, dst: int, p0: int | None = None, p1: int | None = None) -> None:
        self._mutate()
        for p in self.parts:
            p.seq_cp(src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        self._mutate()
        for p in self.parts:
            p.seq_keep(seq)

    def seq_add(self, seq: int | None, p0: int | None, p1: int | None, delta: int) -> None:
        self._mutate()
        self.check_room_to_shift(self._check_seq_or_all(seq), p0, p1)  # ask both, then move both
        for p in self.parts:
            p.seq_add(seq, p0, p1, delta)

    def seq_div(self, seq: int | None, p0: int | None, p1: int | None, d: int) -> None:
        self._mutate()
        self.check_room_to_shift(self._check_seq_or_all(seq), p0, p1)
        for p in self.parts:
            p.seq_div(seq, p0, p1, d)

    def check_room_to_shift(self, seq: int | None, p0: int | None, p1: int | None) -> None:
        for p in self.parts:
            p.check_room_to_shift(seq, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        # The full cache holds every position; the windowed one may hold none after a cut.
        return (self.full or self.windowed).seq_pos_max(seq)

    def seq_pos_min(self, seq: int) -> int:
        # Where the cells every layer holds begin; seq_pos_max + 1 when the windowed layers hold
        # none (the caller must recompute the window). Full 0..9, windowed 7..9 -> 7.
        last = self.seq_pos_max(seq)
        windowed_min = self.windowed.seq_pos_min(seq)
        if windowed_min < 0:
            return last + 1 if last >= 0 else -1
        return max(p.seq_pos_min(seq) for p in self.parts)

    def seq_ids(self) -> list[int]:
        return sorted(set().union(*(p.seq_ids() for p in self.parts)))

    @property
    def can_shift(self) -> bool:
        return False  # cells that fell out of a window are gone: moved positions would need them

    def room_to_grow(self) -> int | None:
        return self.full.room_to_grow() if self.full is not None else None  # windowed cells come and go

    def stats(self) -> dict[str, Any]:
        parts = [p.stats() for p in self.parts]
        return {
            "kind": "iswa",
            "cells_total": sum(p["cells_total"] for p in parts),
            "cells_used": sum(p["cells_used"] for p in parts),
            "seqs": len(self.seq_ids()),
            "bytes": sum(p["bytes"] for p in parts),
            "device": self.backend.name,
            "components": parts,
        }

    def check_integrity(self) -> None:
        for p in self.parts:
            p.check_integrity()

    @property
    def _equal_split(self) -> bool:
        return False

    @property
    def _attention_cells(self) -> int:
        return sum(p.n_cells for p in self.parts)

    def _leaf(self, layer: int) -> Leaf:
        for p in self.parts:
            if layer in p.layers:
                return p
        raise InvalidLayer(f"layer {layer} is not held by this ISWA cache (it holds {list(self.layers)})")

    def _transaction(self, real: bool) -> Transaction:
        return CompositeTransaction([p._transaction(real) for p in self.parts])

    def _snapshot_sections(self, seq: int | None, span: snapshot.Span) -> list[snapshot.Section]:
        return [s for p in self.parts for s in p._snapshot_sections(seq, span)]

    def _snapshot_prepare(self, doc: snapshot.Document, seq: int | None) -> list[Loader]:
        return [load for p in self.parts for load in p._snapshot_prepare(doc, seq)]
