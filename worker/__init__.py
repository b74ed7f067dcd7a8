"""statemesh.worker: model loading (GGUF, Hugging Face folders), architectures over the Memory
interface, the tokenizer. Depends on statemesh.memory only (DESIGN.md)."""

from statemesh.worker.architectures.model import Model, Shard
from statemesh.worker.errors import (
    InvalidTokens,
    MissingTensor,
    ModelError,
    ModelNotFound,
    ShapeMismatch,
    UnknownArchitecture,
)
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.loader import default_model_path, load_model
from statemesh.worker.loading.tokenizer import StreamingDetokenizer, Tokenizer

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
