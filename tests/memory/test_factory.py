"""create_memory: the one place that picks the strategy, and pipeline restriction by layers."""

from __future__ import annotations

import pytest

from statemesh.memory import (
    AttentionSpec,
    HybridMemory,
    InvalidInput,
    InvalidLayer,
    ISWACache,
    KVCache,
    MemorySpec,
    RecurrentMemory,
    RecurrentSpec,
    create_memory,
)

FULL, WINDOWED, REC = AttentionSpec(2, 4), AttentionSpec(2, 4, window=8), RecurrentSpec((3, 4), (4, 2))


@pytest.mark.parametrize(
    ("layers", "held", "kind", "attention_kind"),
    [
        ((FULL, FULL), None, KVCache, None),
        ((WINDOWED, FULL, WINDOWED), None, ISWACache, None),
        ((WINDOWED, WINDOWED), None, ISWACache, None),  # all-layer windows (Mistral)
        ((REC, None, REC), None, RecurrentMemory, None),
        ((REC, FULL, REC), None, HybridMemory, KVCache),
        ((REC, WINDOWED, FULL), None, HybridMemory, ISWACache),
        ((REC, FULL, REC), [0, 2], RecurrentMemory, None),  # a shard with only recurrent layers
        ((REC, FULL, REC), [1], KVCache, None),
        ((WINDOWED, FULL, WINDOWED), [1], KVCache, None),
        ((WINDOWED, FULL, WINDOWED), [0], ISWACache, None),
    ],
)
def test_strategy_follows_the_layers_held(layers, held, kind, attention_kind) -> None:  # type: ignore[no-untyped-def]
    mem = create_memory(MemorySpec(layers), n_ctx=64, n_seq_max=2, layers=held, backend="numpy")
    assert type(mem) is kind
    if attention_kind is not None:
        assert isinstance(mem, HybridMemory) and type(mem.attention) is attention_kind
    expected = tuple(i for i in (held if held is not None else range(len(layers))) if layers[i] is not None)
    assert mem.layers == expected


def test_spec_sizes_are_derived() -> None:
    spec = MemorySpec((FULL, REC, None), dtype="float16")
    assert spec.bytes_per_token == 2 * (2 * 4 + 2 * 4)
    assert spec.bytes_per_sequence_state == 2 * (12 + 8)
    assert spec.attention_layers == (0,) and spec.recurrent_layers == (1,)
    smollm2 = MemorySpec((AttentionSpec(3, 64),) * 30)
    assert smollm2.bytes_per_token * 4096 == 188_743_680
    assert spec.fingerprint != MemorySpec((FULL, REC, None)).fingerprint
    assert spec.fingerprint == MemorySpec((FULL, REC, None), dtype="float16").fingerprint


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n_ctx": 0}, InvalidInput, "n_ctx must be a positive integer"),
        ({"n_seq_max": -1}, InvalidInput, "n_seq_max"),
        ({"layers": [5]}, InvalidLayer, "layer 5 is not a layer"),
        ({"layers": [0, 0]}, InvalidLayer, "twice"),
        ({"layers": [2]}, InvalidLayer, "keep no state"),
        ({"backend": "tpu"}, InvalidInput, "backend must be"),
    ],
)
def test_bad_arguments(kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    args = {"n_ctx": 8, "n_seq_max": 2, "backend": "numpy", **kwargs}
    with pytest.raises(error, match=message):
        create_memory(MemorySpec((FULL, REC, None)), **args)


def test_auto_backend_is_numpy_without_a_gpu() -> None:
    mem = create_memory(MemorySpec((FULL,)), n_ctx=8, n_seq_max=1)
    assert mem.stats()["device"] in ("numpy", "cupy")
