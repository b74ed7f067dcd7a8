"""Automatic prefix caching, for every kind of memory, through the `Memory` interface only.

A checkpoint is a sequence id the cache owns, made by `seq_cp(src, checkpoint, 0, depth)` when a
prompt's prefill stands at `depth`: attention cells are shared, not copied; a recurrent state is
copied (copy-on-write) as it is at that moment. Checkpoints are found by a hash chain over full
blocks of `block` tokens (key_i = H(key_{i-1}, tokens of block i)), so a prompt that repeats a
cached prompt's first blocks finds them.

- Attention-only memories can cut: one checkpoint per prompt serves every shorter prefix of it
  (each of its block keys points at it), and a hit copies just the matching range.
- Memories with recurrent layers cannot: a state is a prefix of exactly one length, so checkpoints
  are taken at every `stride`-th block boundary during prefill (the engine ends prefill chunks
  there), and a hit needs a checkpoint at that very depth. A prompt that extends a cached one
  resumes from the deepest such checkpoint.
Checkpoints are evicted least recently used first when their ids or their cells are needed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from statemesh.memory import Memory


@dataclass
class Checkpoint:
    seq: int
    depth: int  # tokens it holds
    keys: list[bytes]  # the block keys that lead to it
    last_used: int = 0


def block_keys(tokens: list[int], block: int) -> list[bytes]:
    """key_i for each full block of `tokens`: a hash of the previous key and the block's ids."""
    keys, previous = [], b""
    for start in range(0, len(tokens) - block + 1, block):
        chunk = ",".join(str(t) for t in tokens[start : start + block]).encode()
        previous = hashlib.blake2b(previous + chunk, digest_size=16).digest()
        keys.append(previous)
    return keys


class PrefixCache:
    def __init__(self, memory: Memory, seq_ids: list[int], block: int, exact: bool, window: int | None):
        self.memory = memory
        self.free = list(seq_ids)
        self.block = block
        self.exact = exact  # recurrent layers: a checkpoint serves its own depth only
        self.window = window  # the widest attention window, to check a windowed prefix is whole
        self.by_key: dict[bytes, tuple[Checkpoint, int]] = {}  # key -> checkpoint, depth of that key
        self.checkpoints: list[Checkpoint] = []
        self.tick = 0
        self.queries = self.hits = self.hit_tokens = 0

    def lookup(self, prompt: list[int]) -> tuple[Checkpoint, int] | None:
        """The deepest cached prefix of `prompt` that leaves at least one token to feed."""
        self.queries += 1
        keys = block_keys(prompt, self.block)
        for i in range(len(keys) - 1, -1, -1):
            found = self.by_key.get(keys[i])
            depth = (i + 1) * self.block
            if found is None or depth >= len(prompt):
                continue
            checkpoint, key_depth = found
            if self.exact and checkpoint.depth != depth:
                continue
            return checkpoint, min(depth, key_depth)
        return None

    def apply(self, hit: tuple[Checkpoint, int], seq: int) -> int:
        """Give `seq` (empty) the cached prefix; returns how many tokens it now holds (0 if the
        memory could not take it whole, e.g. a window whose cells are gone)."""
        checkpoint, depth = hit
        self.memory.seq_cp(checkpoint.seq, seq, 0, depth)
        whole = self.memory.seq_pos_max(seq) == depth - 1
        if whole and self.window is not None:
            whole = self.memory.seq_pos_min(seq) <= max(0, depth - self.window + 1)
        if not whole:
            self.memory.seq_rm(seq)
            return 0
        self.tick += 1
        checkpoint.last_used = self.tick
        self.hits += 1
        self.hit_tokens += depth
        return depth

    def _wants(self, keys: list[bytes], depth: int) -> bool:
        """Whether a checkpoint at `depth`, whose block keys are `keys`, would be new."""
        if not keys or depth % self.block:
            return False
        found = self.by_key.get(keys[-1])
        return found is None or (self.exact and found[0].depth != depth) or found[1] < depth

    def add(self, src: int, tokens: list[int], depth: int) -> bool:
        """Checkpoint `src`, which holds `tokens[:depth]` now (exactly, for recurrent layers)."""
        keys = block_keys(tokens[:depth], self.block)
        if not self._wants(keys, depth) or (not self.free and not self.evict()):
            return False
        seq = self.free.pop()
        self.memory.seq_cp(src, seq, 0, depth)
        self.tick += 1
        checkpoint = Checkpoint(seq, depth, keys if not self.exact else keys[-1:], self.tick)
        self.checkpoints.append(checkpoint)
        for i, key in enumerate(checkpoint.keys):
            key_depth = depth if self.exact else (i + 1) * self.block
            self.by_key[key] = (checkpoint, key_depth)
        return True

    def evict(self) -> bool:
        """Free the least recently used checkpoint's id and cells."""
        if not self.checkpoints:
            return False
        oldest = min(self.checkpoints, key=lambda c: c.last_used)
        self.checkpoints.remove(oldest)
        for key in oldest.keys:
            if self.by_key.get(key, (None, 0))[0] is oldest:
                del self.by_key[key]
        self.memory.seq_rm(oldest.seq)
        self.free.append(oldest.seq)
        return True
