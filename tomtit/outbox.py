"""A sender's on-disk outbox: every update stays until the receiving node acknowledges it.

PUBACK only says the broker holds a message, and brokers lose messages (amqtt 0.12.1 dropped QoS 1
messages queued for an offline persistent session; a broker without persistence forgets its
queues on restart). So a sender keeps each encoded update in a file until the node's ack names
its update_id, and re-sends after a timeout with exponential backoff. The node deduplicates by
update_id, so a re-send of something already applied is harmless. Files are written atomically,
so a crash at any moment leaves either the old or the new state, never half of one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from tomtit.fsutil import atomic_write_bytes, atomic_write_json

_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Pending:
    update_id: str
    topic: str
    created_at: float
    attempts: int = 0
    last_sent: float | None = None


class Outbox:
    def __init__(self, folder: str | Path, *, resend_after_s: float = 30.0, max_backoff_s: float = 600.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.resend_after_s = resend_after_s
        self.max_backoff_s = max_backoff_s
        self._pending: dict[str, Pending] = {}
        for meta in sorted(self.folder.glob("*.json")):
            uid = meta.stem
            if not _ID.match(uid) or not (self.folder / f"{uid}.msg").is_file():
                continue  # a crash between the two writes leaves a lone file: the .msg comes first
            try:
                d = json.loads(meta.read_text())
                self._pending[uid] = Pending(uid, str(d["topic"]), float(d["created_at"]),
                                             int(d.get("attempts", 0)), d.get("last_sent"))
            except (ValueError, KeyError, TypeError):
                continue
        # A .msg without its .json is an `add` cut short by a crash: its caller never got to record
        # the update as staged (and so never counted on it). It was never sent: drop it.
        # (A .msg whose .json exists but did not parse is left alone: that is damage, not a crash.)
        for msg in self.folder.glob("*.msg"):
            if _ID.match(msg.stem) and msg.stem not in self._pending and not msg.with_suffix(".json").exists():
                msg.unlink(missing_ok=True)
        # Anything loaded at start-up is re-sent at once: we cannot know what reached the node.
        self._pending = {k: replace(v, last_sent=None) for k, v in self._pending.items()}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, update_id: str) -> bool:
        return update_id in self._pending

    def add(self, update_id: str, topic: str, payload: bytes, now: float) -> None:
        if not _ID.match(update_id):
            raise ValueError(f"update_id {update_id!r} is not a uuid4 hex")
        atomic_write_bytes(self.folder / f"{update_id}.msg", payload)
        p = Pending(update_id, topic, now)
        atomic_write_json(self.folder / f"{update_id}.json", p.__dict__)
        self._pending[update_id] = p

    def ids(self) -> list[str]:
        """update_ids awaiting an ack, oldest first."""
        return [p.update_id for p in sorted(self._pending.values(), key=lambda p: p.created_at)]

    def payload(self, update_id: str) -> bytes:
        return (self.folder / f"{update_id}.msg").read_bytes()

    def due(self, now: float) -> list[Pending]:
        """Updates never sent, or whose ack is overdue (backoff doubles per attempt)."""
        out = []
        for p in sorted(self._pending.values(), key=lambda p: p.created_at):
            if p.last_sent is None:
                out.append(p)
                continue
            wait = min(self.max_backoff_s, self.resend_after_s * 2 ** max(0, p.attempts - 1))
            if now - p.last_sent >= wait:
                out.append(p)
        return out

    def mark_sent(self, update_id: str, now: float) -> None:
        p = self._pending.get(update_id)
        if p is None:
            return
        p = replace(p, attempts=p.attempts + 1, last_sent=now)
        self._pending[update_id] = p
        atomic_write_json(self.folder / f"{update_id}.json", p.__dict__)

    def reset_timers(self) -> None:
        """After a reconnect: re-send everything unacknowledged now rather than after the backoff."""
        self._pending = {k: replace(v, last_sent=None) for k, v in self._pending.items()}

    def ack(self, update_id: str) -> bool:
        if self._pending.pop(update_id, None) is None:
            return False
        (self.folder / f"{update_id}.json").unlink(missing_ok=True)
        (self.folder / f"{update_id}.msg").unlink(missing_ok=True)
        return True


def send_due(outbox: Outbox, transport, *, chunk_bytes: int, now: float) -> list[tuple[Pending, int]]:
    """Publish every update that is due (chunked above `chunk_bytes`); returns (pending, bytes)."""
    from tomtit.wire import split_payload

    sent = []
    for p in outbox.due(now):
        payload = outbox.payload(p.update_id)
        for chunk in split_payload(payload, update_id=p.update_id, limit=chunk_bytes):
            transport.publish(p.topic, chunk, qos=1)
        outbox.mark_sent(p.update_id, now)
        sent.append((p, len(payload)))
    return sent
