"""Architecture implementations, by the family name `ModelConfig.architecture` carries."""

from __future__ import annotations

from statemesh.worker.architectures.gemma import GemmaModel
from statemesh.worker.architectures.llama import LlamaModel

ARCHITECTURES = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
    "gemma2": GemmaModel,
    "gemma3": GemmaModel,
}
