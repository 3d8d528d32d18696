"""The uplink to my parent: what a device and an edge both keep about the node above them.

One object, used the same way by `DeviceAgent` (a leaf) and by an edge `Node` (an aggregator with
a parent), so the two cannot drift apart:

- `reference`: what the parent holds of us: the last parent model we adopted plus every delta we
  have sent since. An update carries `local - reference`, and after sending, `reference` advances
  by the *decoded* delta, so f16/int8 rounding error stays in `local - reference` and goes out
  with the next update (error feedback) instead of being lost.
- `base_version`: the parent version our unsent progress is built on (reported in updates; the
  parent counts staleness from it).
- adopting a parent model P: `local = P + (local - reference)`, `reference = P` (progress not yet
  sent survives the swap; `edge_broker.aggregation.merge_parent_model` is the same rule), and the
  scheduler is told, with lag 0 because we rebased.
- sending: the 14-field update message is built here, staged in the on-disk outbox and kept until
  the parent's ack names its update_id (re-sent after a timeout).
- a synchronous round (FedAvg / HierFAVG baselines, `wait_for_parent=True`): after a send, the
  sender waits until a parent model newer than the one it sent from arrives.

A sender's saved state records which staged updates its reference already accounts for
("accounted"). Staging comes first, then the state that accounts for it: a crash in between
leaves a staged update that will be sent but is not yet in the reference, and the sender adds it
on resume (`unaccounted_deltas`) instead of sending that progress twice.

Nothing here reads a clock or sleeps: `now` is passed in, so the MQTT processes and the
virtual-clock simulator run this same object.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from device_runtime.adapter import flatten, unflatten
from device_runtime.scheduler import SyncScheduler
from tomtit.manifest import Manifest
from tomtit.outbox import Outbox, send_due
from tomtit.signing import Keyring, Signer, strip_unverified
from tomtit.transport import Transport
from tomtit.wire import (
    MAX_ENERGY_J,
    MAX_LOCAL_STEPS,
    MAX_NUM_SAMPLES,
    Ack,
    ModelMessage,
    Topics,
    WireError,
    decode_acks,
    decode_message,
    encode_message,
    new_update_id,
)

log = logging.getLogger("tomtit.uplink")


@dataclass(frozen=True)
class UplinkConfig:
    sender: str  # our id: names our up/ack topics and the sender field of every update
    parent: str  # the node we sync with
    job: str = "default"  # run id: every topic lives under tomtit/{job}/
    codec: str = "f16"  # update encoding: f16 halves the bytes at ~2e-4 relative error
    chunk_bytes: int = 1_000_000  # split larger payloads (EMQX's default packet limit is 1 MB)
    max_model_bytes: int = 64 << 20  # refuse larger parent models before parsing them
    wait_for_parent: bool = False  # synchronous rounds: after a send, wait for the parent's next model


@dataclass(frozen=True)
class ParentModel:
    version: int
    sender: str
    params: np.ndarray  # flat float32 in the manifest's order


def stage_update(msg: ModelMessage, manifest: Manifest, outbox: Outbox, topic: str, now: float,
                 signer: Signer | None = None) -> tuple[int, np.ndarray]:
    """Encode (and sign) `msg`, keep it in the outbox until acknowledged, and return (payload
    bytes, the delta exactly as the receiver will decode it)."""
    payload = encode_message(msg)
    received = decode_message(payload, expected=manifest.trainable, bundle_id=manifest.bundle_id,
                              max_bytes=len(payload))
    if signer is not None:
        payload = signer.sign(payload)  # signed as a whole, before any chunking
    outbox.add(msg.update_id, topic, payload, now)
    return len(payload), flatten(dict(received.tensors), manifest.trainable)


def staged_delta(outbox: Outbox, update_id: str, manifest: Manifest) -> np.ndarray | None:
    """The delta a staged update carries, as the receiver will decode it; None if unreadable."""
    try:
        payload = strip_unverified(outbox.payload(update_id))  # our own bytes: nothing to verify
        received = decode_message(payload, expected=manifest.trainable, bundle_id=manifest.bundle_id,
                                  max_bytes=len(payload))
    except (OSError, WireError):
        return None
    return flatten(dict(received.tensors), manifest.trainable)


def unaccounted_deltas(outbox: Outbox, accounted: set[str], manifest: Manifest) -> list[np.ndarray]:
    """Deltas of staged updates the saved state does not account for."""
    out = []
    for uid in outbox.ids():
        if uid not in accounted:
            d = staged_delta(outbox, uid, manifest)
            if d is not None:
                out.append(d)
    return out


class Uplink:
    def __init__(self, config: UplinkConfig, *, manifest: Manifest, outbox: Outbox, scheduler: SyncScheduler,
                 reference: np.ndarray, base_version: int = 0, signer: Signer | None = None,
                 keyring: Keyring | None = None) -> None:
        """`signer`: sign what we send; `keyring`: accept only models our parent signed."""
        self.cfg = config
        self.signer = signer
        self.keyring = keyring
        self.manifest = manifest
        self.outbox = outbox
        self.scheduler = scheduler
        self.topics = Topics(config.job)
        self.reference = np.array(reference, np.float32)
        self.base_version = base_version
        self.models_adopted = 0
        self.acked = 0
        self.rejected = 0
        # This process's ledger, for end-to-end exactly-once accounting (summaries, fault tests):
        # every update we staged, and the first ack each one got (applied | duplicate | rejected).
        self.staged_ids: list[str] = []
        self.ack_status: dict[str, str] = {}
        self.bytes_up = 0
        self._waiting_since_version: int | None = None  # synchronous rounds: the version we sent from

    # -- topics ----------------------------------------------------------------------------
    @property
    def down_topic(self) -> str:
        return self.topics.down(self.cfg.parent)

    @property
    def ack_topic(self) -> str:
        return self.topics.ack(self.cfg.parent, self.cfg.sender)

    def subscribe(self, transport: Transport) -> None:
        transport.subscribe(self.down_topic, qos=1)
        transport.subscribe(self.ack_topic, qos=1)

    def _from_parent(self, payload: bytes) -> bytes:
        """The message inside what our parent signed (WireError "signature" otherwise); without
        keys configured we cannot check a signature, so an envelope is only taken off."""
        if self.keyring is not None:
            return self.keyring.verify(payload, expect_signer=self.cfg.parent)
        return strip_unverified(payload)

    # -- the parent's model ----------------------------------------------------------------
    def decode_model(self, payload: bytes) -> ParentModel:
        """Validate a parent model message (raises WireError with the reason)."""
        msg = decode_message(self._from_parent(payload), expected=self.manifest.trainable, bundle_id=self.manifest.bundle_id,
                             max_bytes=self.cfg.max_model_bytes, expect_kind="model", expect_job=self.cfg.job)
        if msg.is_delta:  # adopting a delta as the model would replace our model with a difference
            raise WireError("not_full", "a parent model must carry full adapter values (is_delta=false)")
        return ParentModel(msg.version, msg.sender, flatten(dict(msg.tensors), self.manifest.trainable))

    def is_new(self, model: ParentModel) -> bool:
        """Newer than what we hold (the first model is always taken: a fresh start has version 0)."""
        return model.version > self.base_version or self.models_adopted == 0

    def adopt(self, model: ParentModel, local: np.ndarray) -> np.ndarray:
        """Merge the parent's model into ours; returns the new local model `P + (local - reference)`."""
        merged = (model.params + (np.asarray(local, np.float32) - self.reference)).astype(np.float32)
        self.reference = model.params
        self.base_version = model.version
        self.models_adopted += 1
        if self._waiting_since_version is not None and model.version > self._waiting_since_version:
            self._waiting_since_version = None
        # We rebased onto the newest model: our unsent progress is built on it, lag 0.
        self.scheduler.on_parent_model(model.version, parent_version_lag=0)
        return merged

    @property
    def waiting_for_parent(self) -> bool:
        """Synchronous rounds only: sent, and the parent's next model has not arrived yet."""
        return self._waiting_since_version is not None

    # -- sending ---------------------------------------------------------------------------
    def send(self, local: np.ndarray, *, version: int, num_samples: int, local_steps: int, train_loss: float,
             energy_j: float, now: float) -> int:
        """Stage `local - reference` as an update (kept until acked); returns the payload size.

        The caller then saves the state that accounts for it, and calls `flush`.
        """
        delta = np.asarray(local, np.float32) - self.reference
        msg = ModelMessage(
            kind="update", sender=self.cfg.sender, job=self.cfg.job, bundle_id=self.manifest.bundle_id,
            # clamped to the wire's ranges: an edge's sums over its children must not make its own
            # update illegal (each child's values were range-checked on arrival)
            base_version=self.base_version, version=version,
            num_samples=min(max(1, int(num_samples)), MAX_NUM_SAMPLES),
            local_steps=min(max(1, int(local_steps)), MAX_LOCAL_STEPS), train_loss=float(train_loss),
            energy_j=min(max(0.0, float(energy_j)), MAX_ENERGY_J),
            is_delta=True, created_at=now, codec=self.cfg.codec, update_id=new_update_id(),
            tensors=unflatten(delta, self.manifest.trainable))
        size, sent = stage_update(msg, self.manifest, self.outbox, self.topics.up(self.cfg.parent, self.cfg.sender),
                                  now, signer=self.signer)
        self.reference = self.reference + sent
        self.staged_ids.append(msg.update_id)
        if self.cfg.wait_for_parent:
            self._waiting_since_version = self.base_version
        return size

    def flush(self, transport: Transport, now: float) -> int:
        """Publish every staged update that is due; returns the bytes sent."""
        if not transport.connected:
            return 0
        total = 0
        for p, size in send_due(self.outbox, transport, chunk_bytes=self.cfg.chunk_bytes, now=now):
            total += size
            if p.attempts:
                log.info("%s re-sent update %s (attempt %d, no ack yet)", self.cfg.sender, p.update_id[:8],
                         p.attempts + 1)
        self.bytes_up += total
        return total

    def on_acks(self, payload: bytes) -> list[Ack]:
        """Drop acknowledged updates from the outbox; returns the acks that were news."""
        news = []
        for ack in decode_acks(self._from_parent(payload)):  # a forged ack would lose an update
            if not self.outbox.ack(ack.update_id):
                continue  # already acknowledged (a re-send's second ack)
            news.append(ack)
            self.ack_status[ack.update_id] = ack.status
            if ack.status == "rejected":
                self.rejected += 1
                log.error("%s: parent %s rejected update %s: %s", self.cfg.sender, self.cfg.parent,
                          ack.update_id[:8], ack.reason)
            else:
                self.acked += 1
        return news

    def ledger(self) -> dict:
        """What this process staged and how each was acknowledged; `pending` = still unacked."""
        by = {st: [u for u, s in self.ack_status.items() if s == st] for st in ("applied", "duplicate", "rejected")}
        return {"staged": list(self.staged_ids), **by, "pending": self.outbox.ids()}

    # -- resume ----------------------------------------------------------------------------
    def resume(self, reference: np.ndarray, base_version: int, accounted: set[str]) -> int:
        """Restore from saved state; staged updates the state does not account for are added to
        the reference now, as `send` would have. Returns how many there were."""
        late = unaccounted_deltas(self.outbox, accounted, self.manifest)
        ref = np.array(reference, np.float32)
        for d in late:
            ref = ref + d
        self.reference = ref
        self.base_version = base_version
        return len(late)
