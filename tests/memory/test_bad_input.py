"""Bad input gets a typed error naming what was given and what was expected; nothing changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from statemesh.memory import (
    AttentionSpec,
    Batch,
    BatchStateError,
    InvalidBatch,
    InvalidInput,
    InvalidLayer,
    InvalidSequence,
    InvalidShape,
    Memory,
    MemorySpec,
    RecurrentSpec,
)

from .helpers import CONV, KINDS, SSM, D, H, make, observe, run_step


@pytest.mark.parametrize(
    ("make_batch", "error", "message"),
    [
        (lambda: Batch([], []), InvalidBatch, "at least one token"),
        (lambda: Batch([0, 1], [0]), InvalidBatch, "expected 2"),
        (lambda: Batch([[0, 1]], [[0, 0]]), InvalidBatch, "one-dimensional"),
        (lambda: Batch([0.5], [0]), InvalidBatch, "integers"),
        (lambda: Batch([-1], [0]), InvalidBatch, ">= 0"),
        (lambda: Batch([0], [0], tokens=[1, 2]), InvalidBatch, "tokens has 2"),
        (lambda: Batch([0], [0], logits=[1]), InvalidBatch, "booleans"),
    ],
)
def test_malformed_batches_are_refused_on_construction(
    make_batch: Callable[[], Batch], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        make_batch()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("positions", "seq_ids", "error", "message"),
    [
        ([5], [7], InvalidSequence, "sequence 7; ids run 0 .. 3"),
        ([5], [-1], InvalidSequence, "sequence -1"),
        ([2], [0], InvalidBatch, "must start at 3"),
        ([4], [0], InvalidBatch, "must start at 3"),
        ([3, 5], [0, 0], InvalidBatch, "rise by one"),
        ([3, 4, 3], [0, 0, 0], InvalidBatch, "rise by one"),
    ],
)
def test_batches_that_do_not_continue_their_sequences_change_nothing(
    kind: str, positions: list[int], seq_ids: list[int], error: type, message: str
) -> None:
    mem = make(kind)
    run_step(mem, [0, 1, 2], [0, 0, 0])
    before = observe(mem)
    with pytest.raises(error, match=message):
        mem.batch(Batch(positions, seq_ids))
    assert observe(mem) == before


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.seq_rm(9),
        lambda m: m.seq_cp(0, 4),
        lambda m: m.seq_cp(-1, 0),
        lambda m: m.seq_keep(True),
        lambda m: m.seq_add("0", None, None, 1),
        lambda m: m.seq_pos_max(4),
        lambda m: m.state_write(11),
        lambda m: m.kv(1, 99),
    ],
)
def test_sequence_ids_out_of_range_are_invalid_sequence(kind: str, call: Callable[[Memory], Any]) -> None:
    mem = make(kind)
    run_step(mem, [0, 1], [0, 0])
    before = observe(mem)
    with pytest.raises(InvalidSequence, match="sequence id"):
        call(mem)
    assert observe(mem) == before


@pytest.mark.parametrize("kind", KINDS)
def test_bad_shift_arguments_are_refused(kind: str) -> None:
    mem = make(kind)
    run_step(mem, [0, 1], [0, 0])
    with pytest.raises(InvalidInput, match="divisor"):
        mem.seq_div(0, None, None, 0)
    with pytest.raises(InvalidInput, match="delta"):
        mem.seq_add(0, None, None, 1.5)  # type: ignore[arg-type]


def attention_layer(mem: Memory) -> int:
    return next(i for i in mem.layers if isinstance(mem.spec.layers[i], AttentionSpec))


def recurrent_layer(mem: Memory) -> int:
    return next(i for i in mem.layers if isinstance(mem.spec.layers[i], RecurrentSpec))


BAD_ROWS = [
    (np.zeros((1, H, D), np.float32), "shape"),  # one row for a two-row micro-batch
    (np.zeros((2, H, D + 1), np.float32), "shape"),
    (np.zeros((2, H, D), np.float64), "float32"),
    ([[0.0]], "numpy array"),
]


@pytest.mark.parametrize("kind", ["kv", "iswa", "hybrid"])
@pytest.mark.parametrize(("rows", "message"), BAD_ROWS)
def test_wrong_kv_rows_raise_invalid_shape_and_the_batch_is_undone(kind: str, rows: Any, message: str) -> None:
    mem = make(kind)
    run_step(mem, [0], [0])
    before = observe(mem)
    with pytest.raises(InvalidShape, match=message), mem.batch(Batch([1, 2], [0, 0])) as plan:
        for ub in plan:
            ub.store_kv(attention_layer(mem), rows, rows)
    assert observe(mem) == before


@pytest.mark.parametrize("kind", ["recurrent", "hybrid"])
def test_wrong_state_rows_raise_invalid_shape_and_the_batch_is_undone(kind: str) -> None:
    mem = make(kind)
    run_step(mem, [0], [0])
    before = observe(mem)
    with pytest.raises(InvalidShape, match=r"shape \(1, 2, 3\)"), mem.batch(Batch([1, 2], [0, 0])) as plan:
        for ub in plan:
            ub.store_state(recurrent_layer(mem), np.zeros((2, *CONV), np.float32), np.zeros((1, *SSM), np.float32))
    assert observe(mem) == before


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_layers_and_layers_of_the_other_kind_are_invalid_layer(kind: str) -> None:
    mem = make(kind)
    with pytest.raises(InvalidLayer, match="layer 17 is not held"), mem.batch(Batch([0], [0])) as plan:
        for ub in plan:
            ub.kv(17, 0)
    if kind in ("hybrid", "hybrid_iswa"):
        with pytest.raises(InvalidLayer, match="is a recurrent layer"):
            mem.kv(recurrent_layer(mem), 0)
        with pytest.raises(InvalidLayer, match="is an attention layer"):
            mem.state(attention_layer(mem), 0)
    assert mem.seq_ids() == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_batch_protocol_is_enforced(kind: str) -> None:
    mem = make(kind)
    before = observe(mem)
    # leaving early undoes and says so
    with pytest.raises(BatchStateError, match="left after 0 of 1"), mem.batch(Batch([0, 1], [0, 0])) as plan:
        pass
    # a micro-batch that skips a layer is an error, not silent garbage
    with pytest.raises(BatchStateError, match="without storing layers"), mem.batch(Batch([0, 1], [0, 0])) as plan:
        for _ in plan:
            pass
    # no sequence operation while a batch is open
    with pytest.raises(BatchStateError, match="batch is open"), mem.batch(Batch([0], [0])) as plan:
        mem.seq_rm(0)
    # a micro-batch used after its turn
    kept = []
    run_step(mem, [0], [0])
    with mem.batch(Batch([1], [0])) as plan:
        for ub in plan:
            kept.append(ub)
            from .helpers import store_ubatch

            store_ubatch(mem, ub, 0.0)
    with pytest.raises(BatchStateError, match="no longer current"):
        kept[0].kv(mem.layers[0], 0)
    mem.seq_rm(0)
    assert observe(mem) == before


def test_specs_validate_their_fields() -> None:
    with pytest.raises(InvalidInput, match="n_kv_heads must be a positive integer, got 0"):
        AttentionSpec(0, 64)
    with pytest.raises(InvalidInput, match="window"):
        AttentionSpec(1, 64, window=0)
    with pytest.raises(InvalidInput, match="conv_shape"):
        RecurrentSpec((), (1,))
    with pytest.raises(InvalidInput, match="dtype must be one of"):
        MemorySpec((AttentionSpec(1, 4),), dtype="int8")
    with pytest.raises(InvalidInput, match=r"layers\[1\]"):
        MemorySpec((AttentionSpec(1, 4), "attention"))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_a_plan_made_before_a_change_is_refused(kind: str) -> None:
    mem = make(kind)
    run_step(mem, [0, 1], [0, 0])
    plan = mem.batch(Batch([2], [0]))
    mem.seq_rm(0)  # the plan's positions no longer continue sequence 0
    before = observe(mem)
    with pytest.raises(BatchStateError, match="changed since this batch was planned"), plan:
        pass
    assert observe(mem) == before
