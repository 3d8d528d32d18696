"""Sending an update upward, the same way from a device and from an edge.

A sender's saved state records which staged updates its reference (device) or `pushed` (edge)
already accounts for ("accounted"). Staging comes first, then the state that accounts for it:
a crash in between leaves a staged update that will be sent but is not yet in the reference,
and the sender adds it on resume (`unaccounted_deltas`) instead of sending that progress twice.
"""
from __future__ import annotations

import numpy as np

from device_runtime.adapter import flatten
from tomtit.manifest import Manifest
from tomtit.outbox import Outbox
from tomtit.wire import ModelMessage, WireError, decode_message, encode_message


def stage_update(msg: ModelMessage, manifest: Manifest, outbox: Outbox, topic: str, now: float) -> tuple[int, np.ndarray]:
    """Encode `msg`, keep it in the outbox until acknowledged, and return (payload bytes, the
    delta exactly as the receiver will decode it).

    Senders advance their reference by the decoded delta, not the one they meant to send, so
    f16/int8 rounding error stays in `local - reference` and goes out with the next update.
    """
    payload = encode_message(msg)
    received = decode_message(payload, expected=manifest.trainable, bundle_id=manifest.bundle_id,
                              max_bytes=len(payload))
    outbox.add(msg.update_id, topic, payload, now)
    return len(payload), flatten(dict(received.tensors), manifest.trainable)


def staged_delta(outbox: Outbox, update_id: str, manifest: Manifest) -> np.ndarray | None:
    """The delta a staged update carries, as the receiver will decode it; None if unreadable.

    For resuming after a crash between staging an update and saving the state that accounts
    for it: the sender advances its reference by this, as `stage_update`'s caller would have.
    """
    try:
        payload = outbox.payload(update_id)
        received = decode_message(payload, expected=manifest.trainable, bundle_id=manifest.bundle_id,
                                  max_bytes=len(payload))
    except (OSError, WireError):
        return None
    return flatten(dict(received.tensors), manifest.trainable)


def unaccounted_deltas(outbox: Outbox, accounted: set[str] | None, manifest: Manifest) -> list[np.ndarray]:
    """Deltas of staged updates the saved state does not account for (None: a state written
    before this was recorded, taken to account for everything)."""
    if accounted is None:
        return []
    out = []
    for uid in outbox.ids():
        if uid not in accounted:
            d = staged_delta(outbox, uid, manifest)
            if d is not None:
                out.append(d)
    return out
