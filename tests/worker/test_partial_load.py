"""A pipeline stage loads only its layers' weights (issue 14): `load_model(path, layers=range(a, b))`
reads the tensors of those layers (and the embedding on the first stage, the final norm and head on
the last) and nothing else. A partially loaded model's shard gives what the fully loaded model's shard
gives, holds exactly its share of the weights, and refuses a shard of layers it does not hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from statemesh.memory import Batch
from statemesh.worker import Model, ModelError, default_model_path, load_model
from statemesh.worker.loading.gguf_file import read_gguf
from statemesh.worker.loading.hf_folder import read_hf_folder
from statemesh.worker.pipeline import PipelineModel, StageWorker, split_layers
from statemesh.worker.shard_actor import ShardSpec, load_stage

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def layer_ranges(n_layers: int) -> list[range]:
    """The first layer, the middle ones, the last, and all (3 layers: [0, 1), [1, 2), [2, 3), [0, 3))."""
    return [range(0, 1), range(1, n_layers - 1), range(n_layers - 1, n_layers), range(0, n_layers)]


@pytest.fixture(scope="module", params=NAMES)
def fixture(request: pytest.FixtureRequest) -> tuple[Path, Model, list[int]]:
    folder = FIXTURES / request.param
    ids = load_file(str(folder / "expected.safetensors"))["prompt_ids"].tolist()
    return folder, load_model(folder, backend="numpy", progress=False), ids


def run_stage(model: Model, layers: range, hidden: Any, ids: list[int]) -> list[np.ndarray]:
    """Layers `layers` of `model` over fresh memory: the prompt, then one more token (which reads what
    the prompt left in memory); the outputs of both batches."""
    mem = model.create_memory(n_ctx=64, n_seq_max=1, layers=layers)
    shard = model.shard(layers.start, layers.stop)
    prompt = Batch(list(range(len(ids))), [0] * len(ids), tokens=ids)
    step = Batch([len(ids)], [0], tokens=[ids[0]])
    return [shard.forward(mem, prompt, hidden[0]), shard.forward(mem, step, hidden[1])]


def inputs(model: Model, first: int, ids: list[int]) -> list[Any]:
    """What layer `first` takes for `run_stage`'s two batches: hidden states of the layers before it
    (from the fully loaded model), or nothing for the first layer (it takes the tokens)."""
    if first == 0:
        return [None, None]
    return run_stage(model, range(0, first), [None, None], ids)


def array_bytes(root: Model) -> int:
    """The bytes of every distinct array the model reaches through its own objects (layers, mixers,
    heads, RoPE tables): what it holds, measured without asking it."""
    seen: set[int] = set()
    total, todo = 0, [vars(root)]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            total += item.nbytes
        elif isinstance(item, dict):
            todo += [v for k, v in item.items() if k not in ("tokenizer", "config", "backend")]
        elif isinstance(item, (list, tuple)):
            todo += list(item)
        elif type(item).__module__.startswith("statemesh.worker.") and hasattr(item, "__dict__"):
            todo.append(vars(item))
    return total


@pytest.mark.parametrize("which", ["first", "middle", "last", "all"])
def test_a_partially_loaded_shard_gives_what_the_whole_model_s_shard_gives(fixture, which: str) -> None:  # type: ignore[no-untyped-def]
    folder, full, ids = fixture
    layers = layer_ranges(full.n_layers)[["first", "middle", "last", "all"].index(which)]
    partial = load_model(folder, backend="numpy", progress=False, layers=layers)
    assert partial.held == layers and partial.config == full.config
    assert partial.memory_spec() == full.memory_spec()  # the whole model's, whatever it holds
    hidden = inputs(full, layers.start, ids)
    expected, got = run_stage(full, layers, hidden, ids), run_stage(partial, layers, hidden, ids)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)  # the same weights, the same arithmetic: bit for bit


def test_stages_hold_exactly_their_share_of_the_weights(fixture) -> None:  # type: ignore[no-untyped-def]
    """Two stages hold what the whole model holds, no layer twice; only a tied head costs the last
    stage its own copy of the embedding table (the whole model's head shares its embedding's)."""
    folder, full, _ = fixture
    ranges = split_layers(full.n_layers, 2)
    front, back = (load_model(folder, backend="numpy", progress=False, layers=range(*r)) for r in ranges)
    tied = full.ends.lm_head.w is full.ends.embedding  # type: ignore[attr-defined]
    table_bytes = 4 * full.config.vocab_size * full.config.hidden_size
    assert front.weight_bytes < full.weight_bytes and back.weight_bytes < full.weight_bytes
    assert front.weight_bytes + back.weight_bytes == full.weight_bytes + (table_bytes if tied else 0)
    # measured from the objects themselves: beyond the weights they count, every model holds the same
    # few config-derived arrays (RoPE frequencies), so no stage holds a tensor it did not count
    extra = array_bytes(full) - full.weight_bytes
    assert array_bytes(front) - front.weight_bytes == extra
    assert array_bytes(back) - back.weight_bytes == extra


def test_a_shard_outside_the_held_layers_is_refused(fixture) -> None:  # type: ignore[no-untyped-def]
    folder, full, ids = fixture
    n = full.n_layers
    middle = load_model(folder, backend="numpy", progress=False, layers=range(1, n - 1))
    for first, end in ((0, n - 1), (1, n), (0, n)):
        with pytest.raises(ValueError, match=rf"layers \[{first}, {end}\).*loaded with layers \[1, {n - 1}\) of {n}"):
            middle.shard(first, end)
    with pytest.raises(ValueError, match="loaded with layers"):
        middle.decode(middle.create_memory(n_ctx=32, n_seq_max=1), Batch([0], [0], tokens=[ids[0]]))
    with pytest.raises(ModelError, match=rf"token embedding is held by the stage of layer 0.*\[1, {n - 1}\) of {n}"):
        middle.embed(np.array(ids))
    with pytest.raises(ModelError, match=rf"final norm and head are held by the stage of layer {n - 1}"):
        middle.head(np.zeros((1, full.config.hidden_size), dtype=np.float32))


@pytest.mark.parametrize("layers", [range(0, 9), range(2, 2), range(0, 3, 2), range(-1, 2)])
def test_layers_outside_the_model_are_refused_before_loading(layers: range) -> None:
    with pytest.raises(ValueError, match=r"non-empty range\(first, end\) within 0 \.\. 3, got"):
        load_model(FIXTURES / "llama", backend="numpy", progress=False, layers=layers)


def test_a_two_stage_pipeline_of_partial_loads_decodes_as_the_whole_model(fixture) -> None:  # type: ignore[no-untyped-def]
    folder, full, ids = fixture
    ranges = split_layers(full.n_layers, 2)
    front, back = (  # the layers as a function of the layer count, as a worker gives them
        load_model(folder, backend="numpy", progress=False, layers=lambda n, i=i: range(*split_layers(n, 2)[i]))
        for i in (0, 1)
    )
    assert (front.held, back.held) == (range(*ranges[0]), range(*ranges[1]))
    piped = PipelineModel(front, ranges, [StageWorker(back, *ranges[1], n_ctx=64, n_seq_max=2, n_ubatch=512)])
    mem, whole = piped.create_memory(64, 2), full.create_memory(64, 2)
    batches = [
        Batch(list(range(len(ids))), [0] * len(ids), tokens=ids),
        Batch([len(ids), 0, 1], [0, 1, 1], tokens=[ids[1], ids[2], ids[3]]),  # a decode beside a new prompt
    ]
    for batch in batches:
        np.testing.assert_array_equal(piped.decode(mem, batch), full.decode(whole, batch))


@pytest.mark.parametrize(
    ("name", "layers", "ends"),
    [
        ("llama", range(1, 2), set()),
        ("llama", range(0, 1), {"model.embed_tokens.weight"}),
        ("llama", range(2, 3), {"model.norm.weight", "lm_head.weight"}),
        ("llama_tied", range(2, 3), {"model.norm.weight", "model.embed_tokens.weight"}),  # the head is the table
        ("mamba", range(0, 3), {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"}),
        ("nemotron_h", range(3, 5), {"backbone.norm_f.weight", "lm_head.weight"}),
    ],
)
def test_the_reader_reads_only_the_tensors_of_the_layers_and_the_ends_they_need(
    name: str, layers: range, ends: set[str]
) -> None:
    folder = FIXTURES / name
    every = load_file(str(folder / "model.safetensors"))
    _, tensors, _ = read_hf_folder(folder, progress=False, layers=layers)
    ours = {n for n in every if any(f".layers.{i}." in n for i in layers)}
    assert ours and set(tensors) == ours | ends
    for n, t in tensors.items():
        np.testing.assert_array_equal(t, every[n])


@pytest.mark.parametrize(("stage", "n_stages", "held"), [(0, 1, range(0, 3)), (0, 2, range(0, 2)), (1, 2, range(2, 3))])
def test_a_worker_loads_the_layers_of_its_stage(stage: int, n_stages: int, held: range) -> None:
    spec = ShardSpec("r", str(FIXTURES / "llama"), stage=stage, n_stages=n_stages)
    model = load_stage(spec)
    assert model.held == held == range(*spec.layers(model.n_layers))


def test_a_stage_of_the_default_model_holds_its_layers_alone_and_gives_the_same_hidden_states() -> None:
    path = default_model_path()
    full = load_model(path, backend="numpy", progress=False)
    stage = load_model(path, backend="numpy", progress=False, layers=range(0, 15))
    assert full.n_layers == 30
    # the embedding and half the layers; the whole holds the other half and the head too (tied: the
    # embedding's table, and its transpose for one-row products)
    table = full.ends.embedding.nbytes  # type: ignore[attr-defined]
    per_layer = (full.weight_bytes - 2 * table) / 30
    assert stage.weight_bytes < full.weight_bytes
    assert stage.weight_bytes == pytest.approx(table + 15 * per_layer, rel=1e-3)
    _, tensors, _ = read_gguf(path, progress=False, layers=range(15, 30))  # a last stage: its layers, norm, head
    held = {int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")}
    assert held == set(range(15, 30)) and len(tensors) == 15 * 9 + 2
    ends = {n for n in tensors if not n.startswith("model.layers.")}
    assert ends == {"model.norm.weight", "model.embed_tokens.weight"}  # SmolLM2 ties its head to the embedding
    ids = full.tokenizer.encode("The capital of France is")
    expected, got = run_stage(full, range(0, 15), [None, None], ids), run_stage(stage, range(0, 15), [None, None], ids)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
