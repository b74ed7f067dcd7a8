"""`SequenceState`: one sequence's portable state, as bytes — an idle session's (what
`Sessions/Export` gives a client, `Sessions/Import` takes back, and an idle session's migration
moves) or a running request's (what its live migration moves). One object, one encoder: the memory
snapshot of the sequence (`docs/snapshot-format.md`: checked, per layer, so it restores on another
device or pipeline split) with a small header: its tokens, how many of them the memory holds and,
for a running request, what else it carries (its sampling parameters, sampler, detokenizer and
stop-string state).

    offset  size  field
    0       8     magic "SMSTATE\\n"
    8       2     u16 version (1)
    10      2     u16 reserved, 0
    12      4     u32 header length H (at most MAX_HEADER_BYTES)
    16      8     u64 snapshot length S (0: the session holds no memory)
    24      H     the header: UTF-8 JSON {"history": [token ids], "fed": n, "request": {...} or null}
    24+H    S     the memory snapshot of one sequence
    24+H+S  8     u64 xxh3-64 of every byte before it

All integers little-endian. No pickle: the JSON holds integers only, every length is checked
before it is used, and a damaged or forged state raises a `SnapshotError` subclass.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import xxhash

from statemesh.memory.errors import SnapshotCorrupt, SnapshotTooLarge, SnapshotTruncated, SnapshotVersionError

MAGIC = b"SMSTATE\n"
VERSION = 1
HEAD = struct.Struct("<8sHHIQ")  # 24 bytes
CHECKSUM = struct.Struct("<Q")
MAX_HEADER_BYTES = 64 << 20  # a history of ~8M tokens


@dataclass(frozen=True)
class SequenceState:
    history: tuple[int, ...]  # every token: a session's conversation, or a request's prompt and output so far
    fed: int  # the memory holds history[:fed] (the last sampled token is never fed)
    snapshot: bytes  # the memory snapshot of the sequence; b"" when it holds nothing
    request: dict[str, Any] | None = None  # a running request's own state (JSON data; `Engine.detach`)

    def encode(self) -> bytes:
        fields = {"history": list(self.history), "fed": self.fed, "request": self.request}
        header = json.dumps(fields, separators=(",", ":")).encode()
        head = HEAD.pack(MAGIC, VERSION, 0, len(header), len(self.snapshot))
        body = b"".join([head, header, self.snapshot])
        return body + CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))

    @staticmethod
    def decode(data: Any, max_bytes: int) -> SequenceState:
        """Check and parse; SnapshotError subclasses say what is wrong (nothing is trusted)."""
        raw = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        n = len(raw)
        if n > max_bytes:
            raise SnapshotTooLarge(f"sequence state of {n} bytes exceeds this replica's cap of {max_bytes} bytes")
        if bytes(raw[: len(MAGIC)]) != MAGIC[: min(n, len(MAGIC))] or n == 0:
            raise SnapshotCorrupt("not a statemesh sequence state (bad magic in the first 8 bytes)")
        if n < HEAD.size + CHECKSUM.size:
            raise SnapshotTruncated(f"sequence state is {n} bytes, shorter than its {HEAD.size}-byte head")
        _, version, reserved, header_len, snapshot_len = HEAD.unpack_from(raw, 0)
        if version != VERSION:
            raise SnapshotVersionError(f"sequence state version {version}; this reader reads version {VERSION}")
        if reserved or header_len > MAX_HEADER_BYTES:
            raise SnapshotCorrupt(f"sequence state head is malformed (header length {header_len})")
        total = HEAD.size + header_len + snapshot_len + CHECKSUM.size
        if n < total:
            raise SnapshotTruncated(f"sequence state is {n} bytes but its head declares {total}")
        if n > total:
            raise SnapshotCorrupt(f"sequence state has {n - total} bytes after its declared end at {total}")
        (expected,) = CHECKSUM.unpack_from(raw, total - CHECKSUM.size)
        if xxhash.xxh3_64_intdigest(raw[: total - CHECKSUM.size]) != expected:
            raise SnapshotCorrupt("sequence state checksum mismatch: the bytes were changed or damaged")
        history, fed, request = _header(bytes(raw[HEAD.size : HEAD.size + header_len]))
        snapshot = bytes(raw[HEAD.size + header_len : total - CHECKSUM.size])
        return SequenceState(history, fed, snapshot, request)


def _header(text: bytes) -> tuple[tuple[int, ...], int, dict[str, Any] | None]:
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotCorrupt(f"sequence state header is not JSON: {e}") from None
    if not isinstance(header, dict) or set(header) != {"history", "fed", "request"}:
        raise SnapshotCorrupt("sequence state header must be {'history': [ids], 'fed': n, 'request': {...} or null}")
    history, fed, request = header["history"], header["fed"], header["request"]
    ok = isinstance(history, list) and all(type(t) is int and t >= 0 for t in history)
    if not ok or type(fed) is not int or not 0 <= fed <= len(history):
        raise SnapshotCorrupt("sequence state header holds a bad history (non-negative ids) or fed count")
    if request is not None and not isinstance(request, dict):
        raise SnapshotCorrupt("sequence state header's request must be an object or null")
    return tuple(history), fed, request
