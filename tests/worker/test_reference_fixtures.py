"""Every architecture against Hugging Face transformers, on the tiny seeded models that
tools/make_fixtures.py built (tests/fixtures/<name>/): prompt logits within max|d| / max|ref| < 2e-3,
the 16-token greedy continuation equal, and the memory operations that must not change a result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from statemesh.memory import Batch, KVCache, MicroBatch, merge_snapshots
from statemesh.worker import MissingTensor, Model, ModelError, ShapeMismatch, UnknownArchitecture, load_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.safetensors").is_file())
TOLERANCE = 2e-3


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=NAMES)
def case(request: pytest.FixtureRequest) -> tuple[Model, dict[str, np.ndarray]]:
    folder = FIXTURES / request.param
    return load_model(folder, backend="numpy", progress=False), load_file(str(folder / "expected.safetensors"))


def prefill(model: Model, mem, ids: list[int], seq: int = 0, start: int = 0):  # type: ignore[no-untyped-def]
    return model.decode(mem, Batch(list(range(start, start + len(ids))), [seq] * len(ids), tokens=ids))


def test_prompt_logits_and_greedy_continuation_match_transformers(case) -> None:  # type: ignore[no-untyped-def]
    model, expected = case
    ids = expected["prompt_ids"].tolist()
    assert model.tokenizer.encode(model.tokenizer.decode(ids)) == ids
    mem = model.create_memory(n_ctx=64, n_seq_max=1)
    logits = prefill(model, mem, ids)
    assert relative_error(logits, expected["prompt_logits"]) < TOLERANCE
    pos, greedy, steps = len(ids), [], []
    for _ in range(len(expected["greedy_ids"])):
        steps.append(logits[-1])
        greedy.append(int(np.argmax(logits[-1])))
        logits = model.decode(mem, Batch([pos], [0], tokens=[greedy[-1]]))
        pos += 1
    assert greedy == expected["greedy_ids"].tolist()
    assert relative_error(np.stack(steps), expected["greedy_logits"]) < TOLERANCE


def test_logits_of_some_rows_equal_those_of_all_rows_and_match_transformers(case) -> None:  # type: ignore[no-untyped-def]
    """Asking for some rows' logits runs the last layer past its mixer for those rows alone (`keep`);
    they equal the same rows of a run that wants every row, and the reference."""
    model, expected = case
    ids = expected["prompt_ids"].tolist()
    every = prefill(model, model.create_memory(n_ctx=64, n_seq_max=1), ids)
    wanted = [i in (2, len(ids) - 1) for i in range(len(ids))]  # a middle row and the last
    mem = model.create_memory(n_ctx=64, n_seq_max=1)
    some = model.decode(mem, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids, logits=wanted))
    assert some.shape == (2, every.shape[1])
    np.testing.assert_allclose(some, every[[2, len(ids) - 1]], rtol=1e-5, atol=1e-5 * float(np.abs(every).max()))
    assert relative_error(some, expected["prompt_logits"][[2, len(ids) - 1]]) < TOLERANCE
    following = model.decode(mem, Batch([len(ids)], [0], tokens=[int(np.argmax(some[-1]))]))  # memory whole
    assert int(np.argmax(following[-1])) == expected["greedy_ids"].tolist()[1]
    quiet = Batch(list(range(len(ids))), [0] * len(ids), tokens=ids, logits=[False] * len(ids))
    none = model.decode(model.create_memory(n_ctx=64, n_seq_max=1), quiet)
    assert none.shape == (0, every.shape[1])


def test_prefill_in_chunks_equals_one_pass_equals_token_by_token(case) -> None:  # type: ignore[no-untyped-def]
    model, expected = case
    ids = expected["prompt_ids"].tolist()
    one_pass = prefill(model, model.create_memory(n_ctx=64, n_seq_max=1), ids)
    chunked_mem = model.create_memory(n_ctx=64, n_seq_max=1)
    chunks = [prefill(model, chunked_mem, ids[a : a + 4], start=a) for a in range(0, len(ids), 4)]
    one_by_one_mem = model.create_memory(n_ctx=64, n_seq_max=1)
    singles = [prefill(model, one_by_one_mem, [t], start=i) for i, t in enumerate(ids)]
    ubatched = model.decode(
        model.create_memory(n_ctx=64, n_seq_max=1), Batch(list(range(len(ids))), [0] * len(ids), tokens=ids), n_ubatch=3
    )
    for other in (np.concatenate(chunks), np.concatenate(singles), ubatched):
        assert relative_error(other, one_pass) < 1e-4  # the same up to float summation order


def test_fork_then_both_continue_identically(case) -> None:  # type: ignore[no-untyped-def]
    model, expected = case
    ids = expected["prompt_ids"].tolist()
    mem = model.create_memory(n_ctx=96, n_seq_max=2)
    prefill(model, mem, ids)
    mem.seq_cp(0, 1)
    nxt = [int(t) for t in expected["greedy_ids"][:3]]
    a = prefill(model, mem, nxt, seq=0, start=len(ids))
    b = prefill(model, mem, nxt, seq=1, start=len(ids))
    np.testing.assert_array_equal(a, b)
    assert relative_error(a[0], expected["greedy_logits"][1]) < TOLERANCE


def test_snapshot_restored_under_another_id_gives_identical_next_logits(case) -> None:  # type: ignore[no-untyped-def]
    model, expected = case
    ids = expected["prompt_ids"].tolist()
    mem = model.create_memory(n_ctx=64, n_seq_max=1)
    prefill(model, mem, ids)
    fresh = model.create_memory(n_ctx=40, n_seq_max=3)
    fresh.state_read(mem.state_write(0), seq=2)
    token = int(expected["greedy_ids"][0])
    np.testing.assert_array_equal(
        prefill(model, fresh, [token], seq=2, start=len(ids)), prefill(model, mem, [token], start=len(ids))
    )


def test_two_pipeline_shards_then_merged_into_one_piece(case) -> None:  # type: ignore[no-untyped-def]
    model, expected = case
    ids = expected["prompt_ids"].tolist()
    cut = 1
    front, back = model.shard(0, cut), model.shard(cut, model.n_layers)
    mem_front = model.create_memory(n_ctx=64, n_seq_max=1, layers=range(0, cut))
    mem_back = model.create_memory(n_ctx=64, n_seq_max=1, layers=range(cut, model.n_layers))
    batch = Batch(list(range(len(ids))), [0] * len(ids), tokens=ids)
    logits = back.forward(mem_back, batch, hidden=front.forward(mem_front, batch))
    assert relative_error(logits, expected["prompt_logits"]) < TOLERANCE
    whole = model.create_memory(n_ctx=64, n_seq_max=1)
    whole.state_read(merge_snapshots([mem_front.state_write(), mem_back.state_write()]))
    token = int(expected["greedy_ids"][0])
    assert relative_error(prefill(model, whole, [token], start=len(ids))[0], expected["greedy_logits"][1]) < TOLERANCE


# ---- loading: config styles, sharded weights, clear errors ------------------------------------------


def copy_fixture(tmp_path: Path, name: str = "llama") -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def prompt_logits(folder: Path) -> np.ndarray:
    model = load_model(folder, backend="numpy", progress=False)
    ids = load_file(str(FIXTURES / "llama" / "expected.safetensors"))["prompt_ids"].tolist()
    return prefill(model, model.create_memory(n_ctx=32, n_seq_max=1), ids)


def test_older_top_level_rope_theta_config_and_sharded_weights_load_the_same(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path)
    reference = prompt_logits(folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[1::2]}, str(folder / "model-00002-of-00002.safetensors"))
    np.testing.assert_array_equal(prompt_logits(folder), reference)


@pytest.mark.parametrize(
    ("breakage", "error", "message"),
    [
        (lambda f: (f / "config.json").unlink(), ModelError, "no config.json"),
        (lambda f: edit_config(f, architectures=["GPT2LMHeadModel"]), UnknownArchitecture, "GPT2LMHeadModel"),
        (lambda f: drop_tensor(f, "model.layers.1.mlp.up_proj.weight"), MissingTensor, "up_proj"),
        (lambda f: edit_config(f, intermediate_size=96), ShapeMismatch, r"\(96, 64\)"),
        (lambda f: (f / "model.safetensors").unlink(), ModelError, r"no model\*\.safetensors"),
    ],
)
def test_broken_checkpoints_say_what_is_wrong(tmp_path: Path, breakage, error, message) -> None:  # type: ignore[no-untyped-def]
    folder = copy_fixture(tmp_path)
    breakage(folder)
    with pytest.raises(error, match=message):
        load_model(folder, backend="numpy", progress=False)


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def drop_tensor(folder: Path, name: str) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"))


def test_a_missing_path_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"give a \.gguf file or a Hugging Face model folder"):
        load_model(tmp_path / "nowhere.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        load_model(tmp_path / "junk.gguf")


def test_moving_positions_re_rotates_keys_as_if_computed_there(case) -> None:  # type: ignore[no-untyped-def]
    """seq_add through the model's k_shift: a prompt prefilled at 0.. and moved by +5 continues as
    one prefilled at 5.. does (RoPE keys re-rotated; states do not depend on positions)."""
    model, expected = case
    ids = expected["prompt_ids"].tolist()
    moved = model.create_memory(n_ctx=64, n_seq_max=1)
    if not moved.can_shift:
        pytest.skip("windowed caches cannot move positions (cells that left a window are gone)")
    prefill(model, moved, ids)
    moved.seq_add(0, None, None, 5)
    assert moved.seq_pos_max(0) == len(ids) + 4
    there = model.create_memory(n_ctx=64, n_seq_max=1)
    prefill(model, there, ids, start=5)
    token = int(expected["greedy_ids"][0])
    a = prefill(model, moved, [token], start=len(ids) + 5)
    b = prefill(model, there, [token], start=len(ids) + 5)
    assert relative_error(a, b) < 1e-4


def test_a_mixed_batch_of_decodes_and_a_prompt_chunk_equals_running_each_alone(case) -> None:  # type: ignore[no-untyped-def]
    """Decoding sequences are attended together (padded), a prompt chunk alone; either way each
    sequence's logits are what it gets by itself."""
    model, expected = case
    ids = expected["prompt_ids"].tolist()
    mem = model.create_memory(n_ctx=128, n_seq_max=3)
    prefill(model, mem, ids[:9], seq=0)
    prefill(model, mem, ids[:5], seq=1)
    batch = Batch([9, 5, 0, 1, 2, 3], [0, 1, 2, 2, 2, 2], tokens=[ids[9], ids[5], *ids[:4]])
    together = model.decode(mem, batch)
    for seq, chunk, start, rows in ((0, ids[:10], 0, [0]), (1, ids[:6], 0, [1]), (2, ids[:4], 0, [2, 3, 4, 5])):
        alone = prefill(model, model.create_memory(n_ctx=64, n_seq_max=1), chunk, start=start)
        assert relative_error(together[rows], alone[-len(rows) :]) < 1e-4, seq


def test_thirty_two_sequences_decoding_at_once_match_transformers(case, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A decode step of 32 sequences, each at its own point of the greedy continuation: each row's
    logits are the reference's for that point. Where the architecture runs a micro-batch in parts
    (`Model.runs_in_parts`: the Llama family, on a host whose BLAS has small kernels) and its memory
    cuts one (a plain KV cache; Mistral's windows make an ISWA cache), this step ran as two parts on
    two threads."""
    model, expected = case
    ids, greedy = expected["prompt_ids"].tolist(), expected["greedy_ids"].tolist()
    depth = [s % (len(greedy) - 1) for s in range(32)]  # sequence s holds the prompt and greedy[:depth]
    mem = model.create_memory(n_ctx=32 * (len(ids) + len(greedy)), n_seq_max=32)
    texts = [ids + greedy[:m] for m in depth]
    for s, text in enumerate(texts):  # one at a time: a windowed cache holds a few prompts' rows at once
        prefill(model, mem, text, seq=s)
    cuts: list[int] = []
    cut_into = MicroBatch.parts
    monkeypatch.setattr(MicroBatch, "parts", lambda ub, n: cuts.append(len(parts := cut_into(ub, n))) or parts)
    step = Batch([len(t) for t in texts], list(range(32)), tokens=[greedy[m] for m in depth])
    logits = model.decode(mem, step)
    for s, m in enumerate(depth):
        assert relative_error(logits[s], expected["greedy_logits"][m + 1]) < TOLERANCE, s
    assert cuts == ([2 if isinstance(mem, KVCache) else 1] if model.runs_in_parts else [])
