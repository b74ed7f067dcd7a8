"""Sessions: a conversation's state kept between its requests, so the next turn prefills only its
new tokens. A session's state is resident (it keeps a sequence id in memory) while memory has room;
idle sessions are evicted least recently used first into a bounded host-memory store of snapshots
and restored when used again. A session whose snapshot falls out of the store is forgotten: its
next turn is computed from scratch, with the same result.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class Session:
    name: str
    tokens: list[int]  # what memory holds for it: its prompts and outputs so far, as fed
    history: list[int] = field(default_factory=list)  # the conversation: every prompt and output token
    seq: int | None = None  # its sequence id while resident
    snapshot: bytes | None = None  # its state while evicted
    last_used: int = 0
    busy: bool = False  # a request of this session is running


class SessionStore:
    def __init__(self, max_snapshot_bytes: int):
        self.max_snapshot_bytes = max_snapshot_bytes
        self.sessions: dict[str, Session] = {}
        self.forgotten = 0

    def get(self, name: str) -> Session | None:
        return self.sessions.get(name)

    def keep(self, name: str, tokens: list[int], seq: int, tick: int, history: list[int]) -> None:
        """A request of session `name` ended; memory's sequence `seq` holds `tokens` of its
        `history` (all but the last sampled token, which was never fed)."""
        self.sessions[name] = Session(name, tokens, history, seq=seq, last_used=tick)

    def idle_resident(self, exclude: int | None = None, spare: Collection[str] = ()) -> Session | None:
        """The least recently used session that holds memory (a sequence id other than `exclude`),
        is not running and is not one of `spare`."""
        idle = [s for s in self.sessions.values()
                if s.seq is not None and s.seq != exclude and not s.busy and s.name not in spare]  # fmt: skip
        return min(idle, key=lambda s: s.last_used) if idle else None

    def evicted(self, session: Session, snapshot: bytes) -> None:
        """`session` left memory; keep its snapshot, forgetting the oldest snapshots over budget."""
        session.seq, session.snapshot = None, snapshot
        stored = sorted((s for s in self.sessions.values() if s.snapshot is not None), key=lambda s: s.last_used)
        total = sum(len(s.snapshot or b"") for s in stored)
        for old in stored:
            if total <= self.max_snapshot_bytes:
                break
            total -= len(old.snapshot or b"")
            del self.sessions[old.name]
            self.forgotten += 1

    def drop(self, name: str) -> None:
        self.sessions.pop(name, None)

    def stored_bytes(self) -> int:
        return sum(len(s.snapshot) for s in self.sessions.values() if s.snapshot is not None)
