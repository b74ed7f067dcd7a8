"""Architecture implementations, by the family name `ModelConfig.architecture` carries."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from statemesh.memory import Backend
from statemesh.worker.architectures.falcon_h1 import FalconH1Model
from statemesh.worker.architectures.gemma import GemmaModel
from statemesh.worker.architectures.hybrid import HybridModel
from statemesh.worker.architectures.llama import LlamaModel
from statemesh.worker.architectures.mamba import MambaModel
from statemesh.worker.architectures.model import Model
from statemesh.worker.architectures.nemotron_h import NemotronHModel
from statemesh.worker.loading.config import ModelConfig
from statemesh.worker.loading.tokenizer import Tokenizer

# (config, tensors, tokenizer, backend, the layers to build: None for all)
Constructor = Callable[[ModelConfig, dict[str, np.ndarray], Tokenizer, Backend, range | None], Model]

ARCHITECTURES: dict[str, Constructor] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
    "gemma2": GemmaModel,
    "gemma3": GemmaModel,
    "mamba": MambaModel,
    "mamba2": MambaModel,
    "bamba": HybridModel,
    "jamba": HybridModel,
    "granitemoehybrid": HybridModel,
    "nemotron_h": NemotronHModel,
    "falcon_h1": FalconH1Model,
}
