"""`SavedSessions`: each session's state as of its last turn, kept off its worker, so that a session
outlives its replica (restored elsewhere when the replica dies) and, with a directory, the
coordinator itself (`--snapshot-dir`: read back when a server starts on the same directory).

A session's saved state is a chain of `SequenceState`s, the form `Engine.restore_session` reads:
its last turn's recovery checkpoints (the first whole, the others the pieces since) and the piece
its replica wrote at the turn's end; or one exported state (after an import, a fork or a cut). An
empty chain is a session that holds nothing yet. Nothing here is unpickled: the files are these
bytes, each checked by its own header and checksum when read.

A file per session, `<hex of its id>.chain`: a magic, a count, then each state's length and bytes,
written to a temporary name and renamed, so a crash leaves the old chain or the new one whole.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"SMCHAIN1"
COUNT = struct.Struct("<I")
LENGTH = struct.Struct("<Q")
SUFFIX = ".chain"


class SavedChainError(ValueError):
    """A saved chain file that cannot be read: says which and why."""


@dataclass
class SavedSessions:
    directory: Path | None = None  # None: kept in the coordinator's memory only
    chains: dict[str, list[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, session_id: str, chain: list[bytes]) -> None:
        self.chains[session_id] = list(chain)
        if self.directory is not None:
            path = self._path(session_id)
            partial = path.with_suffix(".partial")
            with open(partial, "wb") as f:
                f.write(MAGIC + COUNT.pack(len(chain)))
                for data in chain:
                    f.write(LENGTH.pack(len(data)))
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            partial.replace(path)

    def get(self, session_id: str) -> list[bytes] | None:
        return self.chains.get(session_id)

    def forget(self, session_id: str) -> None:
        self.chains.pop(session_id, None)
        if self.directory is not None:
            self._path(session_id).unlink(missing_ok=True)

    def rename(self, old: str, new: str) -> None:
        chain = self.chains.get(old)
        if chain is not None:
            self.save(new, chain)
            self.forget(old)

    def load(self) -> dict[str, list[bytes]]:
        """Every chain the directory holds (a server starting on it); a file that cannot be read is
        named in the error."""
        if self.directory is None:
            return {}
        for path in sorted(self.directory.glob("*" + SUFFIX)):
            try:
                session_id = bytes.fromhex(path.name[: -len(SUFFIX)]).decode()
            except ValueError:
                raise SavedChainError(f"{path}: not a saved session's file name (hex of its id + {SUFFIX})") from None
            self.chains[session_id] = read_chain(path)
        return dict(self.chains)

    def _path(self, session_id: str) -> Path:
        assert self.directory is not None
        return self.directory / (session_id.encode().hex() + SUFFIX)


def read_chain(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + COUNT.size:
        raise SavedChainError(f"{path}: not a saved session chain (bad magic)")
    (count,) = COUNT.unpack_from(data, len(MAGIC))
    at, chain = len(MAGIC) + COUNT.size, []
    for i in range(count):
        if at + LENGTH.size > len(data):
            raise SavedChainError(f"{path}: truncated before state {i} of {count}")
        (n,) = LENGTH.unpack_from(data, at)
        at += LENGTH.size
        if at + n > len(data):
            raise SavedChainError(f"{path}: state {i} declares {n} bytes; the file has {len(data) - at} left")
        chain.append(data[at : at + n])
        at += n
    if at != len(data):
        raise SavedChainError(f"{path}: {len(data) - at} bytes after its {count} states")
    return chain
