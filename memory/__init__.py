"""statemesh.memory: one interface for KV, sliding-window, recurrent and hybrid model state.

See ../DESIGN.md ("memory: the contract") and docs/snapshot-format.md.
"""

from statemesh.memory.backend import Backend, get_backend
from statemesh.memory.base import Memory
from statemesh.memory.batch import Batch
from statemesh.memory.errors import (
    BackendUnavailable,
    BatchStateError,
    InvalidBatch,
    InvalidInput,
    InvalidLayer,
    InvalidSequence,
    InvalidShape,
    MemoryFull,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotIncompatible,
    SnapshotTooLarge,
    SnapshotTruncated,
    SnapshotVersionError,
)
from statemesh.memory.factory import create_memory
from statemesh.memory.hybrid import HybridMemory
from statemesh.memory.iswa_cache import ISWACache
from statemesh.memory.kv_cache import KVCache
from statemesh.memory.plan import BatchPlan, MicroBatch
from statemesh.memory.recurrent import RecurrentMemory
from statemesh.memory.snapshot import merge_snapshots
from statemesh.memory.specs import AttentionSpec, MemorySpec, RecurrentSpec

__all__ = [
    "AttentionSpec",
    "Backend",
    "BackendUnavailable",
    "Batch",
    "BatchPlan",
    "BatchStateError",
    "HybridMemory",
    "ISWACache",
    "InvalidBatch",
    "InvalidInput",
    "InvalidLayer",
    "InvalidSequence",
    "InvalidShape",
    "KVCache",
    "Memory",
    "MemoryFull",
    "MemorySpec",
    "MicroBatch",
    "RecurrentMemory",
    "RecurrentSpec",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotIncompatible",
    "SnapshotTooLarge",
    "SnapshotTruncated",
    "SnapshotVersionError",
    "create_memory",
    "get_backend",
    "merge_snapshots",
]
