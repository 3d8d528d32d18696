"""Sending an update upward, the same way from a device and from an edge."""
from __future__ import annotations

import numpy as np

from device_runtime.adapter import flatten
from tomtit.manifest import Manifest
from tomtit.outbox import Outbox
from tomtit.wire import ModelMessage, decode_message, encode_message


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
