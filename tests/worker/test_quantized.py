"""Packed weights (issue 17): `PackedMatrix`'s compiled products against the plain NumPy reference
and against float32 math within the rounding they allow, the GGUF blocks kept exactly, and the
default model loaded with packed weights against the float32 path it must agree with."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st

from statemesh.memory import Batch
from statemesh.worker import Model, ModelError, default_model_path, load_model
from statemesh.worker.kernels import quantized_kernels
from statemesh.worker.kernels.quantized import BLOCK, PackedMatrix, from_gguf_blocks, pack_q8, reference_times
from statemesh.worker.kernels.threads import Threads
from tests.worker.test_gguf import FIXTURES, logits, random_llama, write_pair


def random_packed(layout: str, n_out: int, n_in: int, seed: int) -> PackedMatrix:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * rng.uniform(0.01, 2.0, size=(n_out, 1))
    if layout == "q8":
        return pack_q8(w.astype(np.float32))
    raw = gguf.quants.quantize(w, Q.Q4_1)  # [O, I / 32 * 20] bytes
    packed = from_gguf_blocks(raw, "Q4_1", (n_out, n_in), "q4")
    assert packed is not None
    return packed


def rounding_bound(h: np.ndarray, w: PackedMatrix) -> np.ndarray:
    """|h| @ |w|.T scaled by float32's precision: how far two summation orders may fall apart."""
    return 1e-5 * (np.abs(h) @ np.abs(w.to_float()).T) + 1e-6


@given(
    layout=st.sampled_from(["q8", "q4"]),
    n=st.integers(1, 11),
    n_in=st.integers(1, 12).map(lambda b: b * BLOCK),
    n_out=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_compiled_products_equal_the_numpy_reference(layout: str, n: int, n_in: int, n_out: int, seed: int) -> None:
    w = random_packed(layout, n_out, n_in, seed)
    h = np.random.default_rng(seed + 1).standard_normal((n, n_in)).astype(np.float32)
    got = w.times(h)
    assert got.shape == (n, n_out) and got.dtype == np.float32
    assert (np.abs(got - reference_times(h, w)) <= rounding_bound(h, w)).all()


@pytest.fixture(scope="module")
def threads() -> Iterator[Threads]:
    pool = Threads(2)
    yield pool
    pool.close()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 32, 130])  # 130: widened tiles through BLAS (`TILE_ROWS_MIN`)
def test_threads_do_not_change_a_product(threads: Threads, n: int) -> None:
    """Rows split between threads are each summed whole, in one order: the same bits as on one
    thread, for a product large enough to be split (`SPLIT_MIN_MACS`) and for one that is not."""
    for layout, n_out in (("q8", 1157), ("q4", 1157), ("q8", 5)):
        w = random_packed(layout, n_out, 576, seed=n)
        h = np.random.default_rng(n).standard_normal((n, 576)).astype(np.float32)
        split = w.times(h, threads)
        np.testing.assert_array_equal(split, w.times(h))
        assert (np.abs(split - reference_times(h, w)) <= rounding_bound(h, w)).all()


@given(n_out=st.integers(1, 40), blocks=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_q8_rounds_each_value_to_within_half_its_block_scale(n_out: int, blocks: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_out, blocks * BLOCK)) * rng.uniform(1e-3, 10, size=(n_out, 1))).astype(np.float32)
    w[0, :BLOCK] = 0  # an all-zero block
    packed = pack_q8(w)
    step = np.repeat(packed.scales, BLOCK, axis=1)
    assert (np.abs(packed.to_float() - w) <= step / 2 * (1 + 1e-5)).all()
    largest = np.abs(w.reshape(n_out, blocks, BLOCK)).argmax(axis=2)  # each block's largest value is exact
    exact = np.take_along_axis(packed.to_float().reshape(n_out, blocks, BLOCK), largest[..., None], axis=2)
    np.testing.assert_allclose(exact, np.take_along_axis(w.reshape(n_out, blocks, BLOCK), largest[..., None], axis=2))
    # so a product with float32 activations stays within sum_i |h_i| * scale_i / 2 of float32 math
    h = rng.standard_normal((3, blocks * BLOCK)).astype(np.float32)
    bound = np.abs(h) @ (step / 2).T + rounding_bound(h, packed)
    assert (np.abs(packed.times(h) - h @ w.T) <= bound).all()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_blocks_are_kept_exactly(qtype: Q) -> None:
    w = np.random.default_rng(1).standard_normal((48, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    expected = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
    packed = from_gguf_blocks(raw, qtype.name, w.shape, "q4")
    assert packed is not None and packed.layout == ("q8" if qtype == Q.Q8_0 else "q4")
    np.testing.assert_array_equal(packed.to_float(), expected)
    assert (from_gguf_blocks(raw, qtype.name, w.shape, "q8") is None) == (qtype != Q.Q8_0)  # q8: rounded instead
    ids = np.array([5, 0, 47, 5])
    np.testing.assert_array_equal(packed.rows(ids), expected[ids])  # an embedding lookup


def test_stacked_rows_keep_their_values_and_mixed_layouts_become_q8() -> None:
    a, b = random_packed("q4", 10, 64, seed=1), random_packed("q4", 6, 64, seed=2)
    both = PackedMatrix.stack([a, b])
    assert both.layout == "q4" and both.shape == (16, 64)
    np.testing.assert_array_equal(both.to_float(), np.concatenate([a.to_float(), b.to_float()]))
    mixed = PackedMatrix.stack([a, random_packed("q8", 3, 64, seed=3)])
    assert mixed.layout == "q8" and mixed.shape == (13, 64)
    np.testing.assert_allclose(mixed.to_float()[:10], a.to_float(), atol=np.abs(a.to_float()).max() / 254 * 1.001)


@pytest.mark.parametrize("weights", ["q8", "q4"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q4_K])
def test_a_packed_gguf_decodes_as_its_float32_load_does(tmp_path: Path, weights: str, qtype: Q) -> None:
    """Q/K rows moved back from llama.cpp's order, biases (Qwen2), a head apart from the embedding:
    a small Llama whose blocks are kept (or rounded, for q8 of a 4-bit file and for K-quants)."""
    folder, tensors, config = random_llama(tmp_path)
    path, _ = write_pair(folder, tensors, config, qtype, tmp_path)
    ids = [5, 17, 42, 99, 100, 250, 7]
    f32 = logits(load_model(path, backend="numpy", progress=False), ids)
    packed_model = load_model(path, backend="numpy", progress=False, weights=weights)
    assert isinstance(packed_model.ends.lm_head.w, PackedMatrix)  # type: ignore[attr-defined]
    packed = logits(packed_model, ids)
    kept = qtype == Q.Q8_0 or (weights == "q4" and qtype == Q.Q4_1)  # the file's values exactly
    tolerance = 1e-5 if kept else 3e-2
    np.testing.assert_allclose(packed, f32, rtol=0, atol=tolerance * np.abs(f32).max())


def test_qwen2_biases_stay_float32_beside_packed_projections(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    folder = FIXTURES / "qwen2"
    config = __import__("json").loads((folder / "config.json").read_text())
    path, _ = write_pair(folder, load_file(str(folder / "model.safetensors")), config, Q.Q8_0, tmp_path, "qwen2")
    ids = [3, 9, 27, 81, 2]
    model = load_model(path, backend="numpy", progress=False, weights="q8")
    assert model.config.attention_bias and isinstance(model.layers[0].b_qkv, np.ndarray)  # type: ignore[attr-defined]
    f32 = logits(load_model(path, backend="numpy", progress=False), ids)
    np.testing.assert_allclose(logits(model, ids), f32, rtol=0, atol=1e-5 * np.abs(f32).max())


def test_packed_weights_are_refused_where_they_are_not_supported() -> None:
    with pytest.raises(ValueError, match="weights='q3'"):
        load_model(default_model_path(), backend="numpy", weights="q3")
    with pytest.raises(ModelError, match="GGUF files only"):
        load_model(FIXTURES / "llama", backend="numpy", weights="q8")


def test_kernels_compile_where_no_cache_can_be_written(tmp_path: Path) -> None:
    """An install whose folder and user cache are read-only, where numba refuses `cache=True`: the
    loops compile in memory instead of failing to import. Made with a read-only bind mount in a user
    and mount namespace (`unshare`), since root writes anywhere else."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user and mount namespaces here (unshare -rm)")
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copy(quantized_kernels.__file__, folder / "quantized_kernels.py")
    script = (
        "import numpy as np, quantized_kernels as k\n"
        "v = np.ones((3, 64), np.int8); s = np.full((3, 2), 0.5, np.float32); out = np.empty(3, np.float32)\n"
        "k.q8_rows_times_vector(v, s, np.ones(64, np.float32), out, 0, 3)\n"
        "print(type(k.q8_rows_times_vector._cache).__name__, out.tolist())\n"
    )
    read_only = f"mount --bind -o ro {folder} {folder} && exec {sys.executable} -c '{script}'"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(folder), "HOME": str(folder), "XDG_CACHE_HOME": str(folder)}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", read_only], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["NullCache", "[32.0,", "32.0,", "32.0]"]
    assert sorted(p.name for p in folder.iterdir()) == ["quantized_kernels.py"]


# ---- the default model ----------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]


@pytest.fixture(scope="module")
def models() -> dict[str, Model]:
    return {
        w: load_model(default_model_path(), backend="numpy", progress=False, weights=w) for w in ("f32", "q8", "q4")
    }


def greedy(model: Model, ids: list[int], n: int) -> list[int]:
    mem = model.create_memory(n_ctx=128, n_seq_max=1)
    logits = model.decode(mem, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids))
    out = []
    for pos in range(len(ids), len(ids) + n):
        out.append(int(np.argmax(logits[-1])))
        logits = model.decode(mem, Batch([pos], [0], tokens=[out[-1]]))
    return out


def teacher_forced_logits(model: Model, ids: list[int], n_ctx: int = 128) -> np.ndarray:
    mem = model.create_memory(n_ctx=n_ctx, n_seq_max=1)
    return model.decode(mem, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids))


def test_default_model_packs_to_a_fraction_of_its_float32_bytes(models: dict[str, Model]) -> None:
    # float32: 538 MB the layers and head stream a token (+ the [E, V] head copy); q8 ~1.125 bytes a
    # weight; q4: the Q4_1 layers at 0.75 bytes a weight, the Q8_0 embedding-head at 1.125
    assert models["q8"].weight_bytes < 0.25 * models["f32"].weight_bytes
    assert models["q4"].weight_bytes < 0.8 * models["q8"].weight_bytes


def test_a_decode_step_in_parts_matches_each_sequence_alone(models: dict[str, Model]) -> None:
    """32 sequences' decode step runs in parts, one per core, each through every packed product on
    its own thread (`Model.runs_in_parts`); each sequence's logits are those it gets alone."""
    model = models["q4"]
    assert model.runs_in_parts
    prompts = [model.tokenizer.encode(f"Sequence number {i} is about") for i in range(32)]
    together = model.create_memory(n_ctx=1024, n_seq_max=32)
    for seq, ids in enumerate(prompts):
        model.decode(together, Batch(list(range(len(ids))), [seq] * len(ids), tokens=ids))
    step = model.decode(together, Batch([len(p) for p in prompts], list(range(32)), tokens=[7] * 32))
    for seq in (0, 13, 31):
        alone = model.create_memory(n_ctx=64, n_seq_max=1)
        ids = prompts[seq] + [7]
        expected = model.decode(alone, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids))[-1]
        np.testing.assert_allclose(step[seq], expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_q4_keeps_the_files_weights_so_it_decodes_as_float32_does(models: dict[str, Model], prompt: str) -> None:
    ids = models["f32"].tokenizer.encode(prompt)
    assert greedy(models["q4"], ids, 16) == greedy(models["f32"], ids, 16)
    sequence = ids + greedy(models["f32"], ids, 16)
    f32, q4 = (teacher_forced_logits(models[w], sequence) for w in ("f32", "q4"))
    np.testing.assert_allclose(q4, f32, rtol=0, atol=1e-4 * np.abs(f32).max())  # summation order only


def test_a_long_prefill_through_widened_tiles_matches_float32(models: dict[str, Model]) -> None:
    ids = models["f32"].tokenizer.encode("The history of Paris spans more than two thousand years. " * 16)[:150]
    f32, q4 = (teacher_forced_logits(models[w], ids, n_ctx=160) for w in ("f32", "q4"))
    np.testing.assert_allclose(q4, f32, rtol=0, atol=1e-4 * np.abs(f32).max())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_q8_stays_close_to_float32(models: dict[str, Model], prompt: str) -> None:
    """q8 rounds the Q4_1 layers to int8 blocks (~0.6% of each matrix): measured on these prompts,
    16, 16 and 5 of the first 16 greedy tokens agree, and the logits' largest error is 2-3% of their
    largest value. Held here: the first 5 tokens, and 5%."""
    ids = models["f32"].tokenizer.encode(prompt)
    expected = greedy(models["f32"], ids, 16)
    assert greedy(models["q8"], ids, 5) == expected[:5]
    sequence = ids + expected
    f32, q8 = (teacher_forced_logits(models[w], sequence) for w in ("f32", "q8"))
    assert np.abs(q8 - f32).max() < 0.05 * np.abs(f32).max()
    assert (q8.argmax(axis=1) == f32.argmax(axis=1)).mean() >= 0.9
