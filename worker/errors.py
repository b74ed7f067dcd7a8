"""Errors of the worker layer: a checkpoint that cannot be loaded, input a model cannot take."""

from __future__ import annotations

from statemesh.memory.errors import InvalidInput


class ModelError(ValueError):
    """Base of the errors for a checkpoint that cannot be loaded; says what was found and expected."""


class ModelNotFound(ModelError):
    """The checkpoint path (or the default model's package) does not exist."""


class UnknownArchitecture(ModelError):
    """The checkpoint's architecture is not one this worker implements."""


class MissingTensor(ModelError):
    """A tensor the architecture needs is not in the checkpoint."""


class ShapeMismatch(ModelError):
    """A tensor's shape disagrees with the config."""


class InvalidTokens(InvalidInput):
    """Token ids outside the vocabulary, or a batch without tokens."""
