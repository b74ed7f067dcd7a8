"""Property-based tests: random batches and operations on every kind of memory, checked after every
step against the plain reference model in `reference.py`, reading every row back bit-exactly and
calling check_integrity()."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statemesh.memory import AttentionSpec, Batch, MemoryFull, create_memory

from .helpers import attention_spec, hybrid_spec, iswa_spec, observe, recurrent_spec
from .reference import Reference

N_SEQ = 4
SPECS = {
    "kv": attention_spec(),
    "iswa": iswa_spec(window=3),
    "recurrent": recurrent_spec(),
    "hybrid": hybrid_spec(),
    "hybrid_iswa": hybrid_spec(window=3),
}


def k_shift(layer: int, k: Any, delta: Any) -> Any:
    return k + (delta[:, None, None] * (layer + 1)).astype(np.float32)


class Boom(Exception):
    pass


class Run:
    """One memory and its reference, driven step by step."""

    def __init__(self, kind: str, n_ctx: int, n_ubatch: int, seed: int):
        spec = SPECS[kind]
        self.n_ctx, self.n_ubatch = n_ctx, n_ubatch
        self.mem = create_memory(
            spec, n_ctx=n_ctx, n_seq_max=N_SEQ, n_ubatch=n_ubatch, backend="numpy", k_shift=k_shift
        )
        self.ref = Reference(spec, n_ctx, N_SEQ, n_ubatch, k_shift)
        self.rng = np.random.default_rng(seed)

    # ---- checks ------------------------------------------------------------------------------

    def check(self) -> None:
        mem, ref = self.mem, self.ref
        mem.check_integrity()
        assert mem.seq_ids() == ref.seq_ids()
        assert mem.stats()["cells_used"] == ref.cells_used()
        for s in range(N_SEQ):
            assert (mem.seq_pos_min(s), mem.seq_pos_max(s)) == (ref.pos_min(s), ref.pos_max(s)), s
            for layer in mem.layers:
                self.check_rows(
                    layer, s, lambda layer=layer, s=s: mem.kv(layer, s), lambda layer=layer, s=s: mem.state(layer, s)
                )

    def check_rows(self, layer: int, seq: int, read_kv: Any, read_state: Any, positions: bool = True) -> None:
        part = self.ref.part_of(layer)
        if isinstance(self.mem.spec.layers[layer], AttentionSpec):
            k, v, pos = read_kv()
            uids = part.view(seq)
            assert len(k) == len(uids)
            if positions:
                assert pos.tolist() == [part.cells[u].pos for u in uids]
            for i, u in enumerate(uids):
                np.testing.assert_array_equal(k[i], part.cells[u].rows[layer][0])
                np.testing.assert_array_equal(v[i], part.cells[u].rows[layer][1])
        else:
            conv, ssm = read_state()
            want_conv, want_ssm = part.state(seq, layer)
            np.testing.assert_array_equal(conv, want_conv)
            np.testing.assert_array_equal(ssm, want_ssm)

    # ---- steps -----------------------------------------------------------------------------------

    def batch(self, lengths: dict[int, int], n_ubatch: int, fail_at: int | None) -> None:
        seq_ids, positions = [], []
        for s, n in lengths.items():
            start = self.ref.pos_max(s) + 1 if self.ref.pos_max(s) >= 0 else int(self.rng.integers(0, 4))
            seq_ids += [s] * n
            positions += list(range(start, start + n))
        # interleave the sequences at random, keeping each one's positions in order
        by_seq = {s: iter([p for q, p in zip(seq_ids, positions, strict=True) if q == s]) for s in lengths}
        seq_ids = [seq_ids[i] for i in self.rng.permutation(len(seq_ids))]
        positions = [next(by_seq[s]) for s in seq_ids]
        before = observe(self.mem)
        try:
            plan = self.mem.batch(Batch(positions, seq_ids), n_ubatch=n_ubatch)
        except MemoryFull:
            assert observe(self.mem) == before
            if self.ref.windowed is None and self.ref.full is not None:
                assert len(seq_ids) > self.n_ctx - self.ref.full.used()
            return
        work = copy.deepcopy(self.ref)
        try:
            with plan:
                for i, ub in enumerate(plan):
                    self.ubatch(work, ub)
                    if i == fail_at:
                        raise Boom
        except Boom:
            assert observe(self.mem) == before
            return
        for p in work.attention:
            p.commit(set(lengths))
        self.ref = work

    def ubatch(self, work: Reference, ub: Any) -> None:
        uids = {id(p): p.begin_ubatch(ub.seq_ids, ub.positions) for p in work.attention}
        if work.recurrent:
            last = {s: int(ub.positions[ub.seq_ids == s].max()) for s in ub.seqs}
            before = {layer: [work.recurrent.state(s, layer) for s in ub.seqs] for layer in work.recurrent.layers}
            work.recurrent.begin_ubatch(ub.seqs, last)
        for layer in self.mem.layers:
            part = work.part_of(layer)
            spec = self.mem.spec.layers[layer]
            if isinstance(spec, AttentionSpec):
                k = self.rng.standard_normal((len(ub), *spec.k_shape)).astype(np.float32)
                v = self.rng.standard_normal((len(ub), *spec.v_shape)).astype(np.float32)
                ub.store_kv(layer, k, v)
                part.store(uids[id(part)], layer, k, v)
                for s in ub.seqs:
                    self.check_view(work, layer, s, ub)
            else:
                conv, ssm = ub.state(layer)
                for i in range(len(ub.seqs)):
                    np.testing.assert_array_equal(conv[i], before[layer][i][0])
                    np.testing.assert_array_equal(ssm[i], before[layer][i][1])
                conv = conv * np.float32(0.5) + self.rng.standard_normal(conv.shape).astype(np.float32)
                ssm = ssm + np.float32(1)
                ub.store_state(layer, conv, ssm)
                part.store(ub.seqs, layer, conv, ssm)

    def check_view(self, work: Reference, layer: int, seq: int, ub: Any) -> None:
        saved, self.ref = self.ref, work
        try:
            self.check_rows(layer, seq, lambda: ub.kv(layer, seq), None)
            # the dense rows kept between batches must follow every change the operations made
            asked = tuple(sorted(set(ub.seqs) | {seq}))
            dense = ub.kv_dense(layer, asked)
            if dense is not None:
                i = asked.index(seq)
                r, n = int(dense.rows[i]), int(dense.lengths[int(dense.rows[i])])
                k, v = dense.k[r, :, :n].transpose(1, 0, 2), dense.v[r, :, :n].transpose(1, 0, 2)
                self.check_rows(layer, seq, lambda: (k, v, None), None, positions=False)
                part = work.part_of(layer)
                last = part.cells[part.view(seq)[-1]].pos if n else -1
                assert int(dense.last_positions[i]) == last
        finally:
            self.ref = saved

    def seq_rm(self, seq: int | None, p0: int | None, p1: int | None) -> None:
        targets = self.ref.seq_ids() if seq is None else [seq]
        allowed = self.ref.recurrent is None or self.ref.recurrent.rm_allowed(targets, p0, p1)
        before = observe(self.mem)
        assert self.mem.seq_rm(seq, p0, p1) is allowed
        if not allowed:
            assert observe(self.mem) == before
            return
        for p in self.ref.attention:
            p.seq_rm(targets, p0, p1)
        if self.ref.recurrent:
            self.ref.recurrent.seq_rm(targets, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int | None, p1: int | None) -> None:
        self.mem.seq_cp(src, dst, p0, p1)
        if src == dst:
            return
        for p in self.ref.attention:
            p.seq_cp(src, dst, p0, p1)
        if self.ref.recurrent:
            self.ref.recurrent.seq_cp(src, dst)

    def seq_keep(self, seq: int) -> None:
        self.mem.seq_keep(seq)
        for p in self.ref.attention:
            p.seq_keep(seq)
        if self.ref.recurrent:
            self.ref.recurrent.seq_keep(seq)

    def shift(self, seq: int | None, p0: int | None, p1: int | None, how: str, amount: int) -> None:
        if (how == "div" and amount == 1) or (how == "add" and amount == 0):
            return

        def move(p: int) -> int:
            return p + amount if how == "add" else p // amount

        if not all(p.shift_room(seq, p0, p1) for p in self.ref.attention):
            before = observe(self.mem)
            with pytest.raises(MemoryFull):
                self.shift_memory(seq, p0, p1, how, amount)
            assert observe(self.mem) == before
            return
        self.shift_memory(seq, p0, p1, how, amount)
        for p in self.ref.attention:
            p.shift(seq, p0, p1, move)
        if self.ref.recurrent:
            self.ref.recurrent.shift(seq, p0, p1, move)

    def shift_memory(self, seq: int | None, p0: int | None, p1: int | None, how: str, amount: int) -> None:
        if how == "add":
            self.mem.seq_add(seq, p0, p1, amount)
        else:
            self.mem.seq_div(seq, p0, p1, amount)

    def snapshot(self, src: int, dst: int) -> None:
        data = self.mem.state_write()
        bigger = create_memory(
            self.mem.spec, n_ctx=self.n_ctx + 7, n_seq_max=N_SEQ + 1, n_ubatch=self.n_ubatch, backend="numpy"
        )
        bigger.state_read(data)
        bigger.check_integrity()
        assert bigger.state_write() == data
        one = self.mem.state_write(src)
        before = observe(self.mem)
        try:
            self.mem.state_read(one, seq=dst)
        except MemoryFull:
            assert observe(self.mem) == before
            return
        cells = {id(p): [copy.deepcopy(p.cells[u]) for u in p.view(src)] for p in self.ref.attention}
        for p in self.ref.attention:
            p.restore_copy(cells[id(p)], dst)
        if self.ref.recurrent:
            if src in self.ref.recurrent.seqs:
                self.ref.recurrent.restore_copy(copy.deepcopy(self.ref.recurrent.seqs[src]), dst)
            else:
                self.ref.recurrent.seqs.pop(dst, None)


positions_or_none = st.one_of(st.none(), st.integers(-2, 24))
seq_or_all = st.one_of(st.none(), st.integers(0, N_SEQ - 1))
seqs = st.integers(0, N_SEQ - 1)


@pytest.mark.parametrize("kind", list(SPECS))
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_operations_match_the_reference(kind: str, data: st.DataObject) -> None:
    n_ctx = data.draw(st.integers(6, 40), label="n_ctx")
    n_ubatch = data.draw(st.integers(1, 8), label="n_ubatch")
    run = Run(kind, n_ctx, n_ubatch, data.draw(st.integers(0, 2**32 - 1), label="seed"))
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        op = data.draw(st.sampled_from(["batch"] * 5 + ["rm", "cp", "keep", "shift", "snapshot"]), label="op")
        if op == "batch":
            lengths = data.draw(st.dictionaries(seqs, st.integers(1, 6), min_size=1, max_size=N_SEQ), label="lengths")
            fail = data.draw(st.one_of(st.none(), st.integers(0, 3)), label="fail_at")
            run.batch(lengths, data.draw(st.integers(1, 8), label="n_ubatch"), fail)
        elif op == "rm":
            run.seq_rm(data.draw(seq_or_all), data.draw(positions_or_none), data.draw(positions_or_none))
        elif op == "cp":
            run.seq_cp(data.draw(seqs), data.draw(seqs), data.draw(positions_or_none), data.draw(positions_or_none))
        elif op == "keep":
            run.seq_keep(data.draw(seqs))
        elif op == "shift":
            how = data.draw(st.sampled_from(["add", "div"]))
            amount = data.draw(st.integers(-6, 6) if how == "add" else st.integers(1, 3))
            run.shift(data.draw(seq_or_all), data.draw(positions_or_none), data.draw(positions_or_none), how, amount)
        else:
            run.snapshot(data.draw(seqs), data.draw(seqs))
        run.check()
