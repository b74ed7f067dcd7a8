"""A plain model of the memory semantics of DESIGN.md, for the property-based tests.

It keeps dicts and sets instead of arrays and owner matrices, and follows the contract's words:
an attention cell is a uid with a position, a stamp (its age) and rows per layer, owned by a set
of sequences; a recurrent state is a value per sequence with a share group (copy-on-write).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from statemesh.memory import AttentionSpec, MemorySpec

KShift = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Cell:
    pos: int
    stamp: int
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # layer -> (k, v)


class RefAttention:
    def __init__(self, layers: tuple[int, ...], window: int | None, n_cells: int, k_shift: KShift | None):
        self.layers, self.window, self.n_cells, self.k_shift = layers, window, n_cells, k_shift
        self.cells: dict[int, Cell] = {}
        self.owned: dict[int, set[int]] = {}  # seq -> uids
        self.next_uid = 0
        self.next_stamp = 0

    def _new(self, pos: int) -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.cells[uid] = Cell(pos, self.next_stamp)
        self.next_stamp += 1
        return uid

    def _gc(self) -> None:
        alive = set().union(*self.owned.values()) if self.owned else set()
        self.cells = {u: c for u, c in self.cells.items() if u in alive}
        self.owned = {s: us for s, us in self.owned.items() if us}

    def view(self, seq: int) -> list[int]:
        return sorted(self.owned.get(seq, ()), key=lambda u: (self.cells[u].pos, self.cells[u].stamp))

    def used(self) -> int:
        return len(self.cells)

    def pos_min(self, seq: int) -> int:
        v = self.view(seq)
        return self.cells[v[0]].pos if v else -1

    def pos_max(self, seq: int) -> int:
        v = self.view(seq)
        return self.cells[v[-1]].pos if v else -1

    def seq_rm(self, seqs: list[int], p0: int | None, p1: int | None) -> None:
        for s in seqs:
            self.owned[s] = {u for u in self.owned.get(s, ()) if not in_range(self.cells[u].pos, p0, p1)}
        self._gc()

    def seq_cp(self, src: int, dst: int, p0: int | None, p1: int | None) -> None:
        self.seq_rm([dst], p0, p1)
        shared = {u for u in self.owned.get(src, ()) if in_range(self.cells[u].pos, p0, p1)}
        self.owned[dst] = self.owned.get(dst, set()) | shared
        self._gc()

    def seq_keep(self, seq: int) -> None:
        self.owned = {s: us for s, us in self.owned.items() if s == seq}
        self._gc()

    def shift_room(self, seq: int | None, p0: int | None, p1: int | None) -> bool:
        if seq is None:
            return True
        need = sum(1 for u in self.view(seq) if in_range(self.cells[u].pos, p0, p1) and self._shared(u, seq))
        return need <= self.n_cells - self.used()

    def _shared(self, uid: int, seq: int) -> bool:
        return any(uid in us for s, us in self.owned.items() if s != seq)

    def shift(self, seq: int | None, p0: int | None, p1: int | None, move: Callable[[int], int]) -> None:
        if seq is None:
            moving = [u for u in self.cells if in_range(self.cells[u].pos, p0, p1)]
        else:
            moving = []
            for u in self.view(seq):
                if not in_range(self.cells[u].pos, p0, p1):
                    continue
                if self._shared(u, seq):  # copy-on-write: seq gets its own cell
                    copy_uid = self._new(self.cells[u].pos)
                    self.cells[copy_uid].rows = {k: (a.copy(), b.copy()) for k, (a, b) in self.cells[u].rows.items()}
                    self.owned[seq] = (self.owned[seq] - {u}) | {copy_uid}
                    u = copy_uid
                moving.append(u)
        for u in moving:
            old = self.cells[u].pos
            new = move(old)
            if new < 0:
                for us in self.owned.values():
                    us.discard(u)
                continue
            self.cells[u].pos = new
            if self.k_shift is not None:
                for layer, (k, v) in self.cells[u].rows.items():
                    shifted = self.k_shift(layer, k[None], np.array([new - old]))[0]
                    self.cells[u].rows[layer] = (shifted, v)
        self._gc()

    def begin_ubatch(self, seq_ids: np.ndarray, positions: np.ndarray) -> list[int]:
        """Window first (relative to each sequence's first new position), then one cell per row."""
        if self.window is not None:
            for s in np.unique(seq_ids):
                first = int(positions[seq_ids == s].min())
                self.owned[int(s)] = {u for u in self.owned.get(int(s), ()) if self.cells[u].pos > first - self.window}
            self._gc()
        uids = []
        for s, p in zip(seq_ids.tolist(), positions.tolist(), strict=True):
            uid = self._new(p)
            self.owned.setdefault(s, set()).add(uid)
            uids.append(uid)
        return uids

    def store(self, uids: list[int], layer: int, k: np.ndarray, v: np.ndarray) -> None:
        for i, u in enumerate(uids):
            self.cells[u].rows[layer] = (k[i].copy(), v[i].copy())

    def commit(self, seqs: set[int]) -> None:
        if self.window is not None:
            for s in seqs:
                nxt = self.pos_max(s) + 1
                self.owned[s] = {u for u in self.owned.get(s, ()) if self.cells[u].pos > nxt - self.window}
            self._gc()

    def restore_copy(self, src_cells: list[Cell], dst: int) -> None:
        """A one-sequence snapshot read under `dst`: fresh cells in the snapshot's order."""
        self.seq_rm([dst], None, None)
        for c in src_cells:
            uid = self._new(c.pos)
            self.cells[uid].rows = {k: (a.copy(), b.copy()) for k, (a, b) in c.rows.items()}
            self.owned.setdefault(dst, set()).add(uid)


@dataclass
class State:
    pos: int
    group: int  # sequences with the same group share one slot (copy-on-write)
    rows: dict[int, tuple[np.ndarray, np.ndarray]]


class RefRecurrent:
    def __init__(self, spec: MemorySpec, layers: tuple[int, ...]):
        self.spec, self.layers = spec, layers
        self.seqs: dict[int, State] = {}
        self.next_group = 0

    def _group(self) -> int:
        self.next_group += 1
        return self.next_group

    def used(self) -> int:
        return len({st.group for st in self.seqs.values()})

    def pos(self, seq: int) -> int:
        return self.seqs[seq].pos if seq in self.seqs else -1

    def rm_allowed(self, seqs: list[int], p0: int | None, p1: int | None) -> bool:
        for s in seqs:
            last = self.pos(s)
            if last < 0 or (p0 is not None and p0 > last):
                continue
            if not ((p0 is None or p0 <= 0) and (p1 is None or p1 > last)):
                return False
        return True

    def seq_rm(self, seqs: list[int], p0: int | None, p1: int | None) -> None:
        for s in seqs:
            last = self.pos(s)
            if last >= 0 and not (p0 is not None and p0 > last):
                del self.seqs[s]

    def seq_cp(self, src: int, dst: int) -> None:
        self.seqs.pop(dst, None)
        if src in self.seqs:
            self.seqs[dst] = copy.deepcopy(self.seqs[src])

    def seq_keep(self, seq: int) -> None:
        self.seqs = {s: st for s, st in self.seqs.items() if s == seq}

    def shift(self, seq: int | None, p0: int | None, p1: int | None, move: Callable[[int], int]) -> None:
        for s in [seq] if seq is not None else list(self.seqs):
            if s in self.seqs and in_range(self.seqs[s].pos, p0, p1):
                new = move(self.seqs[s].pos)
                if new < 0:
                    del self.seqs[s]
                else:
                    self.seqs[s].pos = new

    def state(self, seq: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        if seq in self.seqs:
            return self.seqs[seq].rows[layer]
        rec = self.spec.recurrent(layer)
        return np.zeros(rec.conv_shape, np.float32), np.zeros(rec.ssm_shape, np.float32)

    def begin_ubatch(self, seqs: tuple[int, ...], last_pos: dict[int, int]) -> None:
        for s in seqs:
            rows = {layer: self.state(s, layer) for layer in self.layers}
            self.seqs[s] = State(last_pos[s], self._group(), {k: (a.copy(), b.copy()) for k, (a, b) in rows.items()})

    def store(self, seqs: tuple[int, ...], layer: int, conv: np.ndarray, ssm: np.ndarray) -> None:
        for i, s in enumerate(seqs):
            self.seqs[s].rows[layer] = (conv[i].copy(), ssm[i].copy())

    def restore_copy(self, src: State, dst: int) -> None:
        self.seqs[dst] = State(src.pos, self._group(), copy.deepcopy(src.rows))


def in_range(pos: int, p0: int | None, p1: int | None) -> bool:
    return (p0 is None or pos >= p0) and (p1 is None or pos < p1)


class Reference:
    """The whole memory: attention parts (full, windowed) and an optional recurrent part."""

    def __init__(self, spec: MemorySpec, n_ctx: int, n_seq_max: int, n_ubatch: int, k_shift: KShift | None):
        attn = spec.attention_layers
        full = tuple(i for i in attn if spec.attention(i).window is None)
        windowed = tuple(i for i in attn if spec.attention(i).window is not None)
        window = max((spec.attention(i).window or 0 for i in windowed), default=None)
        self.full = RefAttention(full, None, n_ctx, k_shift) if full else None
        win_cells = min(n_ctx, n_seq_max * (window or 0) + n_ubatch)
        self.windowed = RefAttention(windowed, window, win_cells, k_shift) if windowed else None
        self.attention = [p for p in (self.full, self.windowed) if p is not None]
        self.recurrent = RefRecurrent(spec, spec.recurrent_layers) if spec.recurrent_layers else None
        self.spec = spec

    def part_of(self, layer: int) -> Any:
        if isinstance(self.spec.layers[layer], AttentionSpec):
            return next(p for p in self.attention if layer in p.layers)
        return self.recurrent

    def seq_ids(self) -> list[int]:
        live = set()
        for p in self.attention:
            live |= set(p.owned)
        if self.recurrent:
            live |= set(self.recurrent.seqs)
        return sorted(live)

    def pos_max(self, seq: int) -> int:
        values = []
        if self.attention:
            values.append((self.full or self.windowed).pos_max(seq))  # type: ignore[union-attr]
        if self.recurrent:
            values.append(self.recurrent.pos(seq))
        return min(values)

    def pos_min(self, seq: int) -> int:
        values = []
        if self.attention:
            last = (self.full or self.windowed).pos_max(seq)  # type: ignore[union-attr]
            if self.windowed is not None and self.windowed.pos_min(seq) < 0:
                values.append(last + 1 if last >= 0 else -1)
            else:
                values.append(max(p.pos_min(seq) for p in self.attention))
        if self.recurrent:
            values.append(self.recurrent.pos(seq))
        return max(values)

    def cells_used(self) -> int:
        if self.attention:
            return sum(p.used() for p in self.attention)
        assert self.recurrent is not None
        return self.recurrent.used()
