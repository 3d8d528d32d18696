"""Chunking: payloads above the broker's limit travel as numbered chunks (`split_payload`),
reassembled on arrival (`Reassembler`).

A chunk is a safetensors message too: one U8 tensor `data` and metadata `proto`, `kind`="chunk",
`update_id`, `index`, `total`, `size` (bytes of the whole payload) and `sha256` (of the whole
payload).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import save as _safetensors_save

from tomtit.wire.codec import PROTO, _meta_int, _parse_safetensors
from tomtit.wire.errors import _UPDATE_ID_RE, WireError, _as_bytes, _check_size, _short

MIN_CHUNK_LIMIT = 1024  # a chunk's own header is ~300 bytes; below this chunking is pointless
CHUNK_HEADER_MAX = 1024  # generous bound on a chunk's header, used to reject junk cheaply
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _encode_chunk(update_id: str, index: int, total: int, size: int, sha256: str, piece: bytes) -> bytes:
    meta = {"proto": PROTO, "kind": "chunk", "update_id": update_id, "index": str(index),
            "total": str(total), "size": str(size), "sha256": sha256}
    return _safetensors_save({"data": np.frombuffer(piece, dtype=np.uint8)}, metadata=meta)


def split_payload(payload: bytes, *, update_id: str, limit: int) -> list[bytes]:
    """[payload] if it fits in `limit` bytes, else chunks of at most `limit` bytes each.

    `limit` is the broker's payload limit minus room for the topic and MQTT header.
    """
    payload = _as_bytes(payload)
    if _UPDATE_ID_RE.fullmatch(update_id) is None:
        raise WireError("bad_id", f"update_id {update_id!r} is not 32 lowercase hex digits")
    if limit < MIN_CHUNK_LIMIT:
        raise ValueError(f"limit {limit} is below {MIN_CHUNK_LIMIT} bytes; a chunk's header alone is ~300")
    if len(payload) <= limit:
        return [payload]
    sha = hashlib.sha256(payload).hexdigest()
    piece, grown = limit - 512, False
    while True:
        # headers differ only in the digits of index and offsets, so the chunk with the largest
        # index and a full piece is the largest: fit that one. Grow once into the slack, then
        # shrink until it fits (a digit more or less in the header can flip the result).
        total = -(-len(payload) // piece)
        probe = len(_encode_chunk(update_id, total - 1, total, len(payload), sha, b"\0" * piece))
        if probe > limit:
            piece -= probe - limit
        elif probe == limit or grown:
            break
        else:
            piece, grown = piece + limit - probe, True
    chunks = [_encode_chunk(update_id, i, total, len(payload), sha, payload[i * piece:(i + 1) * piece])
              for i in range(total)]
    assert all(len(c) <= limit for c in chunks)
    return chunks


def _small_safetensors_meta(data: bytes) -> dict | None:
    """The __metadata__ of a payload whose header is small, without running the full parser."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > min(len(data) - 8, CHUNK_HEADER_MAX):
        return None
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def is_chunk(data: bytes) -> bool:
    """Cheap test (reads only a header of at most CHUNK_HEADER_MAX bytes); never raises on bytes."""
    meta = _small_safetensors_meta(_as_bytes(data))
    return meta is not None and meta.get("kind") == "chunk"


@dataclass(frozen=True)
class _Chunk:
    update_id: str
    index: int
    total: int
    size: int
    sha256: str
    piece: bytes | bytearray


def _decode_chunk(data: bytes, max_total_bytes: int) -> _Chunk:
    _check_size(data, max_total_bytes + CHUNK_HEADER_MAX + 8)
    meta, raw = _parse_safetensors(data)
    if meta.get("proto") != PROTO:
        raise WireError("bad_proto", f"proto {_short(str(meta.get('proto')), 40)!r} is not {PROTO!r}")
    if meta.get("kind") != "chunk":
        raise WireError("bad_chunk", "not a chunk")
    missing = [k for k in ("update_id", "index", "total", "size", "sha256") if k not in meta]
    if missing:
        raise WireError("bad_chunk", f"missing metadata: {', '.join(missing)}")
    if _UPDATE_ID_RE.fullmatch(meta["update_id"]) is None or _SHA256_RE.fullmatch(meta["sha256"]) is None:
        raise WireError("bad_chunk", "update_id or sha256 malformed")
    index, total, size = (_meta_int(meta, k, "bad_chunk") for k in ("index", "total", "size"))
    if size > max_total_bytes:
        raise WireError("too_large", f"reassembled payload would be {size} bytes, limit {max_total_bytes}")
    # every chunk carries at least one byte, so total <= size
    if not (0 <= index < total <= size):
        raise WireError("bad_chunk", f"index {index}, total {total}, size {size} are inconsistent")
    t = raw.get("data")
    if len(raw) != 1 or t is None or t.dtype != "U8" or len(t.shape) != 1 or not 1 <= t.shape[0] <= size:
        raise WireError("bad_chunk", "a chunk holds exactly one non-empty 1-D U8 tensor named data")
    return _Chunk(meta["update_id"], index, total, size, meta["sha256"], t.data)


@dataclass
class _PartialSet:
    total: int
    size: int
    sha256: str
    started: float
    parts: dict[int, bytes | bytearray] = field(default_factory=dict)
    buffered: int = 0


class Reassembler:
    """Collects chunks into whole payloads, in any order, with bounded memory.

    Memory is bounded by `max_sets` in-flight sets of at most `max_total_bytes` each; a set is
    dropped `timeout_s` after its first chunk arrived. There is no clock inside: `now` is
    passed in (seconds, any monotonic origin).

    A completed set is forgotten at once: if all its chunks arrive again (the sender re-sends
    because the ack was lost), the payload is returned again, so the node can re-ack it as a
    duplicate.

    Sets are keyed by (source, update_id), source being who sent the chunk (the child's id from
    the topic): chunks that came on two children's topics never combine into one payload.
    """

    def __init__(self, timeout_s: float, max_total_bytes: int, max_sets: int = 16) -> None:
        if not timeout_s > 0 or max_total_bytes <= 0 or max_sets <= 0:
            raise ValueError("timeout_s, max_total_bytes and max_sets must be positive")
        self.timeout_s = float(timeout_s)
        self.max_total_bytes = int(max_total_bytes)
        self.max_sets = int(max_sets)
        self._sets: dict[tuple[str, str], _PartialSet] = {}
        self._dropped: list[tuple[str, str]] = []  # (source, update_id) dropped incomplete since the last expire()

    @property
    def in_flight(self) -> int:
        return len(self._sets)

    @property
    def buffered_bytes(self) -> int:
        return sum(s.buffered for s in self._sets.values())

    def add(self, chunk: bytes, now: float, source: str = "") -> bytes | None:
        """The whole payload once the last chunk of its set arrives, else None."""
        c = _decode_chunk(_as_bytes(chunk), self.max_total_bytes)
        self._drop_expired(now)
        key = (source, c.update_id)
        s = self._sets.get(key)
        if s is None:
            if len(self._sets) >= self.max_sets:
                # evict the oldest: a set that has waited longest is the likeliest to be dead
                oldest = min(self._sets, key=lambda k: self._sets[k].started)
                del self._sets[oldest]
                self._dropped.append(oldest)
            s = self._sets[key] = _PartialSet(c.total, c.size, c.sha256, started=now)
        elif (s.total, s.size, s.sha256) != (c.total, c.size, c.sha256):
            # the set keeps its first description; the sender re-sends a consistent set on timeout
            raise WireError("chunk_mismatch", f"chunk of {c.update_id} disagrees on total/size/sha256")
        old = s.parts.get(c.index)
        if old is not None:
            if old != c.piece:
                raise WireError("chunk_conflict",
                                f"chunk {c.index} of {c.update_id} arrived with other content")
            return None  # QoS 1 redelivery of the same chunk
        if s.buffered + len(c.piece) > s.size:
            raise WireError("chunk_mismatch", f"chunks of {c.update_id} exceed the declared {s.size} bytes")
        s.parts[c.index] = c.piece
        s.buffered += len(c.piece)
        if len(s.parts) < s.total:
            return None
        del self._sets[key]
        payload = b"".join(s.parts[i] for i in range(s.total))
        if len(payload) != s.size or hashlib.sha256(payload).hexdigest() != s.sha256:
            raise WireError("bad_checksum", f"reassembled {c.update_id} does not match its sha256/size")
        return payload

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop sets older than timeout_s. Returns (source, update_id) of every set dropped
        incomplete since the last call, whether by age (here or in add) or by eviction."""
        self._drop_expired(now)
        dropped, self._dropped = self._dropped, []
        return dropped

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, s in self._sets.items() if now - s.started > self.timeout_s]:
            del self._sets[key]
            self._dropped.append(key)
