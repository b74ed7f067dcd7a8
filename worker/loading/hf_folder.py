"""Read a Hugging Face model folder: `config.json`, single or sharded `*.safetensors`, and the
tokenizer files where present."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from statemesh.worker.errors import ModelError
from statemesh.worker.loading.config import ModelConfig, config_from_hf
from statemesh.worker.loading.progress import Progress
from statemesh.worker.loading.tensor_selection import LayerChoice, TensorSelection
from statemesh.worker.loading.tokenizer import Tokenizer, tokenizer_from_hf


def read_hf_folder(
    path: Path, progress: bool | None = None, layers: LayerChoice = None
) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer]:
    """The config, the tensors (only those of model layers `layers` and the ends they need, when
    given: `TensorSelection`; the others are never read) and the tokenizer."""
    from safetensors import safe_open

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} has no config.json: a Hugging Face model folder needs one")
    raw = _json(config_file)
    config = config_from_hf(raw, name=str(raw.get("_name_or_path") or path.name))
    files = _weight_files(path)
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="numpy") as f:  # reads the header alone
            names.update(f.keys())
    selection = TensorSelection.build(layers, config.n_layers, config.tie_word_embeddings, names)
    bar = Progress(f"loading {path.name}", len(files), enabled=progress)
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors file is not a mapping)
                if selection.wants(name):  # another stage's tensors are never read
                    t = f.get_tensor(name)
                    tensors[name] = t.astype(np.float32) if t.dtype != np.float32 else t
        bar.advance()
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelError(f"{path} has no tokenizer.json")
    tokenizer_config = _json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    return config, tensors, tokenizer_from_hf(str(tokenizer_json), raw, tokenizer_config)


def _weight_files(path: Path) -> list[Path]:
    """The files `model.safetensors.index.json` lists, else `model.safetensors` or its shards
    (`model-00001-of-00002.safetensors`, ...)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ModelError(f"{index.name} lists weight files that are missing: {missing}")
        return [path / n for n in names]
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ModelError(f"{path} has no model*.safetensors weights")
    return files


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return data
