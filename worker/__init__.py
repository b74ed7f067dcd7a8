"""statemesh.worker: model loading (GGUF, Hugging Face folders), architectures over the Memory
interface, the tokenizer. Depends on statemesh.memory only (DESIGN.md)."""

from statemesh.worker.config import ModelConfig
from statemesh.worker.errors import (
    InvalidTokens,
    MissingTensor,
    ModelError,
    ModelNotFound,
    ShapeMismatch,
    UnknownArchitecture,
)
from statemesh.worker.loader import default_model_path, load_model
from statemesh.worker.model import Model, Shard
from statemesh.worker.tokenizer import StreamingDetokenizer, Tokenizer

__all__ = [
    "InvalidTokens",
    "MissingTensor",
    "Model",
    "ModelConfig",
    "ModelError",
    "ModelNotFound",
    "Shard",
    "ShapeMismatch",
    "StreamingDetokenizer",
    "Tokenizer",
    "UnknownArchitecture",
    "default_model_path",
    "load_model",
]
