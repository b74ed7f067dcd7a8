"""Which checkpoint tensors a model loaded for layers [first, end) needs (a pipeline stage's share of
the model): its layers' tensors, the token embedding when it starts at layer 0, and the final norm and
the vocabulary head when it ends at the last layer (a tied head is the embedding, so the last stage
needs that too). The readers ask before they dequantize or copy a tensor: a stage's load never holds
the rest of the model, not even for a moment.

Names are Hugging Face names (GGUF names are mapped to them first).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TypeAlias

LAYER = re.compile(r"\.layers\.(\d+)\.")  # model.layers.3.mlp..., backbone.layers.3.mixer...
EMBEDDINGS = frozenset({"model.embed_tokens.weight", "backbone.embeddings.weight", "model.embeddings.weight"})
HEAD = "lm_head.weight"

# The layers to load: a range; or a function of the model's layer count that gives it (a pipeline
# stage's share, `split_layers`, known once the reader has the config: a GGUF file's metadata takes
# seconds to parse, so a stage does not read it twice); or None for all of them.
LayerChoice: TypeAlias = "range | Callable[[int], range] | None"


def layer_range(layers: LayerChoice, n_layers: int) -> range:
    """The layers a model holds: `layers`, checked against a model of `n_layers`, or all of them."""
    if layers is None:
        return range(n_layers)
    if callable(layers):
        layers = layers(n_layers)
    if layers.step != 1 or not 0 <= layers.start < layers.stop <= n_layers:
        raise ValueError(f"layers must be a non-empty range(first, end) within 0 .. {n_layers}, got {layers}")
    return layers


@dataclass(frozen=True)
class TensorSelection:
    layers: range  # the model layers whose tensors are wanted
    n_layers: int  # of the whole model
    tied_head: bool  # the vocabulary head is the embedding (tied, or the checkpoint has no lm_head)

    @staticmethod
    def build(layers: LayerChoice, n_layers: int, tied: bool, names: Collection[str]) -> TensorSelection:
        """For a checkpoint whose tensors are `names`; `layers=None` wants every tensor."""
        return TensorSelection(layer_range(layers, n_layers), n_layers, tied or HEAD not in names)

    def wants(self, name: str) -> bool:
        found = LAYER.search(name)
        if found is not None:
            return int(found.group(1)) in self.layers
        first, last = self.layers.start == 0, self.layers.stop == self.n_layers
        if name in EMBEDDINGS:
            return first or (last and self.tied_head)
        return last  # the rest of the model-wide tensors come after the last layer: final norm, lm_head
