"""`HybridMemory`: attention layers and recurrent layers in one model (Jamba, Bamba, Granite 4,
Falcon-H1, Nemotron-H), built purely by delegation to an attention part (`KVCache` or `ISWACache`)
and a `RecurrentMemory`. Each operation says how the parts' answers combine; the part that can
refuse goes first, so a refusal leaves both untouched.
"""

from __future__ import annotations

from typing import Any

from statemesh.memory import snapshot
from statemesh.memory.base import Leaf, Loader, Memory
from statemesh.memory.errors import InvalidLayer
from statemesh.memory.iswa_cache import ISWACache
from statemesh.memory.kv_cache import KVCache
from statemesh.memory.plan import CompositeTransaction, Transaction
from statemesh.memory.recurrent import RecurrentMemory


class HybridMemory(Memory):
    def __init__(self, attention: KVCache | ISWACache, recurrent: RecurrentMemory):
        assert attention.spec is recurrent.spec and attention.n_seq_max == recurrent.n_seq_max
        self.attention = attention
        self.recurrent = recurrent
        self.spec = attention.spec
        self.layers = tuple(sorted(attention.layers + recurrent.layers))
        self.n_seq_max = attention.n_seq_max
        self.backend = attention.backend
        self.parts: list[Memory] = [attention, recurrent]

    def clear(self) -> None:
        self._mutate()
        self.attention.clear()
        self.recurrent.clear()

    def seq_rm(self, seq: int | None, p0: int | None = None, p1: int | None = None) -> bool:
        # The recurrent part may refuse (having changed nothing); the attention part never does.
        self._mutate()
        return self.recurrent.seq_rm(seq, p0, p1) and self.attention.seq_rm(seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int | None = None, p1: int | None = None) -> None:
        self._mutate()
        self.attention.seq_cp(src, dst, p0, p1)
        self.recurrent.seq_cp(src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        self._mutate()
        self.attention.seq_keep(seq)
        self.recurrent.seq_keep(seq)

    def seq_add(self, seq: int | None, p0: int | None, p1: int | None, delta: int) -> None:
        # The attention part may raise MemoryFull (copying shared cells) before it changes anything.
        self._mutate()
        self.attention.seq_add(seq, p0, p1, delta)
        self.recurrent.seq_add(seq, p0, p1, delta)

    def seq_div(self, seq: int | None, p0: int | None, p1: int | None, d: int) -> None:
        self._mutate()
        self.attention.seq_div(seq, p0, p1, d)
        self.recurrent.seq_div(seq, p0, p1, d)

    def seq_pos_min(self, seq: int) -> int:
        return max(self.attention.seq_pos_min(seq), self.recurrent.seq_pos_min(seq))

    def seq_pos_max(self, seq: int) -> int:
        return min(self.attention.seq_pos_max(seq), self.recurrent.seq_pos_max(seq))

    def seq_ids(self) -> list[int]:
        return sorted(set(self.attention.seq_ids()) | set(self.recurrent.seq_ids()))

    @property
    def can_shift(self) -> bool:
        return self.attention.can_shift and self.recurrent.can_shift

    def room_to_grow(self) -> int | None:
        return self.attention.room_to_grow()  # a recurrent state never grows

    def stats(self) -> dict[str, Any]:
        attention, recurrent = self.attention.stats(), self.recurrent.stats()
        return {
            "kind": "hybrid",
            "cells_total": attention["cells_total"],  # token cells of the attention caches
            "cells_used": attention["cells_used"],
            "state_slots_total": recurrent["cells_total"],
            "state_slots_used": recurrent["cells_used"],
            "seqs": len(self.seq_ids()),
            "bytes": attention["bytes"] + recurrent["bytes"],
            "device": self.backend.name,
            "components": [attention, recurrent],
        }

    def check_integrity(self) -> None:
        self.attention.check_integrity()
        self.recurrent.check_integrity()

    @property
    def _equal_split(self) -> bool:
        return True

    @property
    def _attention_cells(self) -> int:
        return self.attention._attention_cells

    def _leaf(self, layer: int) -> Leaf:
        for part in self.parts:
            if layer in part.layers:
                return part._leaf(layer)
        raise InvalidLayer(f"layer {layer} is not held by this hybrid memory (it holds {list(self.layers)})")

    def _transaction(self, real: bool) -> Transaction:
        # Attention first: it is the part that can run out of cells.
        return CompositeTransaction([self.attention._transaction(real), self.recurrent._transaction(real)])

    def _snapshot_sections(self, seq: int | None, span: snapshot.Span) -> list[snapshot.Section]:
        return self.attention._snapshot_sections(seq, span) + self.recurrent._snapshot_sections(seq, span)

    def _snapshot_prepare(self, doc: snapshot.Document, seq: int | None) -> list[Loader]:
        return self.attention._snapshot_prepare(doc, seq) + self.recurrent._snapshot_prepare(doc, seq)
