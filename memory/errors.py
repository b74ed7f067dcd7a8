"""Errors of the memory layer.

Three channels (STYLE.md, habit 7):
- a refusal that is part of the contract (`seq_rm` returning False, `MemoryFull`) leaves state untouched;
- bad input raises an `InvalidInput` subclass naming what was given and what was expected;
- `assert` is only for internal invariants.
"""

from __future__ import annotations


class MemoryFull(Exception):
    """There are not enough free cells (or state slots) for the request; nothing was changed."""


class InvalidInput(ValueError):
    """Base of the errors for arguments that break the contract; nothing was changed."""


class InvalidSequence(InvalidInput):
    """A sequence id outside `0 .. n_seq_max-1`, or not an integer."""


class InvalidBatch(InvalidInput):
    """A batch whose arrays disagree, or whose positions do not continue their sequences."""


class InvalidLayer(InvalidInput):
    """A layer id this memory does not hold, or a layer of another kind than the call needs."""


class InvalidShape(InvalidInput):
    """An array of the wrong shape or dtype for the layer it is stored into."""


class BatchStateError(RuntimeError):
    """The batch protocol was misused: a micro-batch used after its turn, a batch left unfinished,
    or a memory operation called while a batch is open."""


class BackendUnavailable(RuntimeError):
    """The requested array backend (CuPy) cannot be used on this machine."""


class SnapshotError(ValueError):
    """Base of the errors for a snapshot that cannot be read; the memory is exactly as it was."""


class SnapshotTruncated(SnapshotError):
    """The snapshot ends before the length its header declares."""


class SnapshotCorrupt(SnapshotError):
    """Bad magic, a checksum mismatch, trailing bytes or an inconsistent structure."""


class SnapshotVersionError(SnapshotError):
    """The snapshot was written in a format version this code cannot read."""


class SnapshotIncompatible(SnapshotError):
    """The snapshot is well formed but belongs to another model, dtype or layer set."""


class SnapshotTooLarge(SnapshotError):
    """The snapshot is larger than the cap this reader accepts."""
