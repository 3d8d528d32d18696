"""One aggregating node type for every tier (DESIGN §1): an edge has a parent, the cloud has none.

Per received payload on `node/{id}/up/{child}`, in order: reassemble chunks -> decode and
validate (tomtit.wire: size, schema, sender == topic, bundle, names/shapes/dtypes, finite) ->
norm bound -> duplicate? (ack "duplicate" again, never apply again) -> staleness bound ->
buffer. As soon as the strategy's buffer is ready: aggregate and bump the version. Then, once
per batch of received messages (group commit): checkpoint atomically, publish the model retained
on `node/{id}/down`, and only then ack every update handled — so an ack always means "in a
checkpointed model", and a crash before the checkpoint makes children re-send (the seen-ids set
in the checkpoint makes that exactly-once).

Why group commit: under load a node would otherwise write a checkpoint (an fsync: tens of ms on
a Pi's SD card), encode and publish a 300 KB model, and send one ack message per update for
every K updates. Batching what is already queued (bounded by `commit_max_updates` and
`commit_max_s`) keeps every aggregation exactly K updates, and acks only get later by at most
one batch; when updates trickle in, a batch is one message and nothing changes.

Edge (with a parent): each absorbed child update is one "step" for its own sync scheduler
(loss = the child's train loss, joules = the energy the child reported plus this node's own);
when the scheduler says sync, it pushes `model - pushed` upward through an on-disk outbox, like
a device. A new parent model P is merged as `P + (model - pushed)` (`merge_parent_model`): the
parent already holds what we pushed, and what children sent since is kept.

Cloud (no parent): evaluates each new global model on held-out data with ORT inference, stops at
the target accuracy or the time limit, announces "finished" (which propagates down the tree), and
writes the summary JSON.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_runtime.adapter import flatten, unflatten
from device_runtime.scheduler import StepObservation, SyncScheduler
from device_runtime.uplink import stage_update, unaccounted_deltas
from edge_broker.aggregation import (
    AggregationError,
    AsyncBuffer,
    ChildUpdate,
    StaleUpdateError,
    merge_parent_model,
)
from edge_broker.checkpoint import NodeCheckpoint, load_checkpoint, save_checkpoint
from tomtit.manifest import Manifest
from tomtit.outbox import Outbox, send_due
from tomtit.transport import Transport
from tomtit.wire import (
    MAX_ACKS_PER_MESSAGE,
    Ack,
    ErrorReport,
    FlatDecoder,
    ModelMessage,
    Presence,
    Reassembler,
    Topics,
    WireError,
    decode_acks,
    decode_message,
    decode_presence,
    encode_ack,
    encode_acks,
    encode_error,
    encode_message,
    encode_presence,
    encode_telemetry,
    is_chunk,
    new_update_id,
)

log = logging.getLogger("tomtit.node")
_KEEP = 2**62  # base_version recorded when none is known: never pruned


@dataclass(frozen=True)
class NodeConfig:
    node_id: str  # unique in the job; children publish to node/{node_id}/up/{child}
    parent: str | None = None  # None: this node is the cloud (the root)
    job: str = "default"
    max_update_bytes: int = 64 << 20  # refuse bigger payloads before parsing them
    max_update_norm: float = 100.0  # L2 bound on one child delta: catches exploded or hostile updates
    model_codec: str = "f32"  # models go down exactly: every child must start from the same point
    up_codec: str = "f16"  # an edge's pushes upward
    chunk_bytes: int = 1_000_000  # split payloads above this (EMQX's default packet limit is 1 MB)
    chunk_timeout_s: float = 120.0  # drop a partial chunk set after this
    resend_after_s: float = 30.0  # edge: re-send an unacknowledged upward push after this
    link_joules_per_mb: float = 0.5  # edge: radio energy per MB pushed upward (sync cost)
    target_accuracy: float | None = None  # cloud: stop once reached
    max_minutes: float | None = None  # stop after this long
    eval_max_examples: int = 1000  # cloud: evaluate on at most this many held-out examples
    telemetry_every_s: float = 5.0
    commit_max_updates: int = 256  # group commit: at most this many messages handled per commit...
    commit_max_s: float = 0.25  # ...or this long, so acks and the model never wait on a long burst


@dataclass
class NodeStats:
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    duplicates: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    aggregations: int = 0
    pushes_up: int = 0
    push_times: list[float] = field(default_factory=list)
    child_arrivals: dict = field(default_factory=lambda: defaultdict(list))  # child -> [(t, local_steps)]
    accuracy: list[dict] = field(default_factory=list)
    versions: list[dict] = field(default_factory=list)
    stop_reason: str = ""


class Evaluator:
    """Accuracy and loss of an adapter on pre-encoded held-out examples (cloud only)."""

    def __init__(self, classifier, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray):
        self.classifier, self.ids, self.mask, self.labels = classifier, ids, mask, labels

    def __call__(self, adapter: np.ndarray) -> tuple[float, float]:
        return self.classifier.accuracy(self.ids, self.mask, self.labels, adapter)


class Node:
    def __init__(
        self,
        config: NodeConfig,
        *,
        manifest: Manifest,
        initial_adapter: np.ndarray,
        buffer: AsyncBuffer,
        transport: Transport,
        state_dir: Path,
        scheduler: SyncScheduler | None = None,
        evaluator: Evaluator | None = None,
        own_joules: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if config.parent is not None and scheduler is None:
            raise ValueError("an edge node (with a parent) needs a sync scheduler")
        self.cfg = config
        self.manifest = manifest
        self.buffer = buffer
        self.transport = transport
        self.scheduler = scheduler
        self.evaluator = evaluator
        self.own_joules = own_joules or (lambda: 0.0)
        self.clock = clock
        self.topics = Topics(config.job)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.stats = NodeStats()
        self.model = np.array(initial_adapter, np.float32)
        self.pushed = self.model.copy()  # edge: what the parent holds of us
        self.version = 0
        self.parent_version = 0
        self.seen: dict[str, int] = {}  # applied update_id -> its reported base_version (prune_seen)
        self.seen_horizon = 0  # updates reporting a base_version below this may have been pruned
        self._pending_base: dict[str, int] = {}  # buffered update_id -> its reported base_version
        self.children_seen: set[str] = set()  # ids that have sent us an update
        self.offline: set[str] = set()  # ids whose retained presence says offline
        self._up_prefix = self.topics.up_filter(config.node_id)[:-1]  # "tomtit/{job}/node/{id}/up/"
        self.decoder = FlatDecoder(manifest.trainable, bundle_id=manifest.bundle_id, max_bytes=config.max_update_bytes)
        self.reassembler = Reassembler(timeout_s=config.chunk_timeout_s, max_total_bytes=config.max_update_bytes)
        self.outbox = Outbox(self.state_dir / "outbox", resend_after_s=config.resend_after_s) if config.parent else None
        self.finished = False
        self.started = clock()
        self._last_telemetry = 0.0
        self._was_connected = False
        self._pending_meta: dict[str, tuple[float, float, int]] = {}  # update_id -> (loss, joules, samples)
        self._uncommitted: list = []  # AggregateResults applied to the model, not yet checkpointed
        self._acks_out: dict[str, list[Ack]] = defaultdict(list)  # child -> acks sent at the next commit
        self._child_samples: dict[str, int] = {}  # child -> its latest num_samples
        self._resume()

    # -- checkpoints -----------------------------------------------------------------------
    def _resume(self) -> None:
        ck = load_checkpoint(self.state_dir, self.manifest)
        if ck is None:
            return
        self.model, self.pushed, self.version = ck.model, ck.pushed, ck.version
        self.parent_version, self.seen = ck.parent_version, dict(ck.seen)
        self.seen_horizon = ck.seen_horizon
        if self.outbox is not None:  # a push staged just before a crash: account for it now
            accounted = None if ck.accounted is None else set(ck.accounted)
            for d in unaccounted_deltas(self.outbox, accounted, self.manifest):
                self.pushed = self.pushed + d
        log.info("resumed from checkpoint: version %d, %d update ids seen", self.version, len(self.seen))

    def checkpoint(self) -> None:
        save_checkpoint(self.state_dir, self.manifest, NodeCheckpoint(
            model=self.model, pushed=self.pushed, version=self.version,
            parent_version=self.parent_version, seen=self.seen,
            accounted=tuple(self.outbox.ids()) if self.outbox is not None else (), seen_horizon=self.seen_horizon))

    # -- publishing ------------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.transport.publish(topic, payload, qos=qos, retain=retain)
        self.stats.bytes_out += len(payload)

    def publish_model(self) -> None:
        msg = ModelMessage(
            kind="model", sender=self.cfg.node_id, job=self.cfg.job, bundle_id=self.manifest.bundle_id,
            base_version=self.parent_version, version=self.version, num_samples=0, local_steps=0,
            train_loss=0.0, energy_j=0.0, is_delta=False, created_at=self.clock(), codec=self.cfg.model_codec,
            update_id=new_update_id(), tensors=unflatten(self.model, self.manifest.trainable))
        # Retained: a child that connects later (or restarts) gets the current model at once.
        # Not chunked: a retained message must be one message (MiniLM's adapter is ~300 KB).
        self._publish(self.topics.down(self.cfg.node_id), encode_message(msg), retain=True)

    def presence(self, state: str) -> bytes:
        return encode_presence(Presence(id=self.cfg.node_id, state=state, role="node",
                                        version=self.version, ts=self.clock()))

    def _ack(self, child: str, update_id: str, status: str, reason: str = "") -> None:
        """Queue an ack; `commit` sends each child's queued acks as one message, after the checkpoint."""
        self._acks_out[child].append(Ack(update_id=update_id, status=status, reason=reason,
                                         node_version=self.version))

    def _send_acks(self) -> None:
        for child, acks in self._acks_out.items():
            topic = self.topics.ack(self.cfg.node_id, child)
            if len(acks) == 1:  # the single-ack form: children older than ack batches read it too
                self._publish(topic, encode_ack(acks[0]))
                continue
            for i in range(0, len(acks), MAX_ACKS_PER_MESSAGE):
                self._publish(topic, encode_acks(acks[i:i + MAX_ACKS_PER_MESSAGE]))
        self._acks_out.clear()

    def _reject(self, child: str, update_id: str, reason: str, detail: str) -> None:
        self.stats.rejected[reason] += 1
        log.warning("rejected update %s from %s: %s (%s)", update_id[:8] or "?", child, reason, detail[:200])
        self._publish(self.topics.errors(self.cfg.node_id),
                      encode_error(ErrorReport(update_id=update_id, sender=child, reason=reason, detail=detail)))
        if update_id:
            self._ack(child, update_id, "rejected", reason)

    # -- connection ------------------------------------------------------------------------
    def _on_connection_change(self) -> None:
        now = self.transport.connected
        if now and not self._was_connected:
            t, c = self.topics, self.cfg
            self.transport.subscribe(t.up_filter(c.node_id), qos=1)
            self.transport.subscribe(t.status_filter(), qos=1)
            if c.parent:
                self.transport.subscribe(t.down(c.parent), qos=1)
                self.transport.subscribe(t.ack(c.parent, c.node_id), qos=1)
                self.outbox.reset_timers()
            self._publish(t.status(c.node_id), self.presence("finished" if self.finished else "online"), retain=True)
            self.publish_model()
        self._was_connected = now

    # -- inbound ---------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        t, c = self.topics, self.cfg
        self.stats.bytes_in += len(payload)
        if topic.startswith(self._up_prefix):  # first: nearly every message is a child's update
            try:
                _, child = t.parse_up(topic)
            except WireError as e:
                log.warning("ignored %s: %s", topic, e)
                return
            self._on_update_payload(child, payload)
        elif c.parent and topic == t.down(c.parent):
            self._on_parent_model(payload)
        elif c.parent and topic == t.ack(c.parent, c.node_id):
            try:
                acks = decode_acks(payload)
            except WireError as e:
                log.warning("ignored a malformed ack: %s", e)
                return
            for ack in acks:
                if self.outbox.ack(ack.update_id) and ack.status == "rejected":
                    log.error("parent %s rejected our push %s: %s", c.parent, ack.update_id[:8], ack.reason)
        elif _parses(t.parse_status, topic):
            self._on_presence(topic, payload)
        else:
            log.warning("ignored a message on %s", topic)

    def _on_presence(self, topic: str, payload: bytes) -> None:
        try:
            who = self.topics.parse_status(topic)
            p = decode_presence(payload) if payload else None
        except WireError:
            return
        if p is None:
            return
        if who == self.cfg.parent and p.state == "finished":
            self.finish("parent finished")
        elif who not in (self.cfg.node_id, self.cfg.parent):
            # Presence of anyone in the job; it matters only for ids that send us updates.
            if p.state == "online":
                self.offline.discard(who)
            else:
                self.offline.add(who)

    def _on_update_payload(self, child: str, payload: bytes) -> None:
        if is_chunk(payload):
            try:
                whole = self.reassembler.add(payload, self.clock())
            except WireError as e:
                self._reject(child, "", e.reason, e.detail)
                return
            if whole is None:
                return
            payload = whole
        try:
            msg, delta = self.decoder.decode(payload, expect_kind="update", expect_sender=child,
                                             expect_job=self.cfg.job)
        except WireError as e:
            self._reject(child, _update_id_hint(payload), e.reason, e.detail)
            return
        if msg.update_id in self.seen:
            self.stats.duplicates += 1
            self._ack(child, msg.update_id, "duplicate")  # its first ack may have been lost
            return
        if msg.update_id in self.buffer:
            return  # a re-send of something waiting in the buffer: acked when applied
        if msg.base_version < self.seen_horizon:
            # it may be an applied update whose id was pruned (prune_seen): never apply it again
            self._reject(child, msg.update_id, "stale",
                         f"base_version {msg.base_version} is below {self.seen_horizon}, the oldest this node remembers")
            return
        norm = float(np.linalg.norm(delta))
        if norm > self.cfg.max_update_norm:
            self._reject(child, msg.update_id, "norm", f"L2 norm {norm:.3g} > bound {self.cfg.max_update_norm}")
            return
        # A base_version ahead of ours means this node lost or replaced its state dir (models are
        # checkpointed before they are published): count the update as fresh, do not waste it.
        update = ChildUpdate(update_id=msg.update_id, sender=child, delta=delta, num_samples=max(1, msg.num_samples),
                             local_steps=max(1, msg.local_steps), base_version=min(msg.base_version, self.version),
                             train_loss=msg.train_loss)
        try:
            self.buffer.add(update, node_version=self.version, now=self.clock())
        except StaleUpdateError as e:
            self._reject(child, msg.update_id, "stale", str(e))
            return
        except AggregationError as e:
            self._reject(child, msg.update_id, "invalid", str(e))
            return
        self.children_seen.add(child)
        self.offline.discard(child)
        self.stats.accepted += 1
        self.stats.child_arrivals[child].append((round(self.clock() - self.started, 3), msg.local_steps))
        self._pending_meta[msg.update_id] = (msg.train_loss, msg.energy_j, msg.num_samples)
        self._pending_base[msg.update_id] = msg.base_version
        self._child_samples[child] = msg.num_samples

    def _on_parent_model(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            msg = decode_message(payload, expected=self.manifest.trainable, bundle_id=self.manifest.bundle_id,
                                 max_bytes=self.cfg.max_update_bytes, expect_kind="model", expect_job=self.cfg.job)
        except WireError as e:
            log.error("ignored parent model: %s", e)
            return
        if msg.version <= self.parent_version:
            return
        parent = flatten(dict(msg.tensors), self.manifest.trainable)
        self.model = merge_parent_model(parent, self.model, self.pushed)
        self.pushed = parent
        lag = msg.version - self.parent_version
        self.parent_version = msg.version
        self.version += 1
        self.scheduler.on_parent_model(msg.version, parent_version_lag=lag)
        self.checkpoint()
        self.publish_model()
        log.info("merged parent model v%d -> our v%d", msg.version, self.version)

    # -- aggregation -----------------------------------------------------------------------
    def effective_ready(self, now: float) -> bool:
        if self.buffer.ready(now):
            return True
        # Children that went offline are dropped from the waiting set: each known child whose
        # presence says offline lowers K by one (never below one pending update).
        gone = len(self.children_seen & self.offline)
        pending = self.buffer.pending
        return pending > 0 and gone > 0 and pending >= max(1, self.buffer.config.k_updates - gone)

    def _apply_ready(self, now: float) -> None:
        if self.effective_ready(now):
            self.apply_buffer(now)

    def apply_buffer(self, now: float) -> None:
        """Aggregate the buffer into the model and bump the version; `commit` makes it durable."""
        result = self.buffer.flush(now)
        self.model = self.model + result.delta  # both float32: the sum is float32, a new array
        self.version += 1
        for uid in result.update_ids:
            self.seen[uid] = self._pending_base.pop(uid, _KEEP)
        self.stats.aggregations += 1
        for uid, child in zip(result.update_ids, result.senders):
            self._ack(child, uid, "applied")
        self._uncommitted.append(result)
        self.stats.versions.append({"t": round(now - self.started, 3), "version": self.version,
                                    "updates": len(result.update_ids), "senders": list(result.senders),
                                    "staleness": list(result.staleness), "train_loss": result.mean_train_loss})
        log.info("v%d: aggregated %d update(s) from %s (staleness %s), train loss %.4f", self.version,
                 len(result.update_ids), ",".join(result.senders), list(result.staleness), result.mean_train_loss)

    def prune_seen(self) -> None:
        """Forget applied update ids that the staleness bound already guards.

        A re-send of update u, reporting base_version b, is judged with base min(b, version), so it
        is refused as stale whenever b < version - max_staleness, and version only grows. Its id
        is then no longer needed for exactly-once, and dropping it keeps the seen set (and every
        checkpoint) at about K x max_staleness ids instead of growing with every update ever
        applied. Such a late re-send is acked "rejected: stale" rather than "duplicate"; either
        way the sender drops it, and it is never applied twice. The *reported* b is kept, not
        the clamped one: a node that lost its state must not re-apply an update whose b is ahead.
        """
        horizon = self.version - self.buffer.config.max_staleness
        if any(b < horizon for b in self.seen.values()):
            self.seen = {u: b for u, b in self.seen.items() if b >= horizon}
        # Remembered (and checkpointed): a restart with a larger max_staleness must not let a
        # pruned id back in; `_on_update_payload` refuses anything reporting a base below it.
        self.seen_horizon = max(self.seen_horizon, horizon)

    def commit(self) -> None:
        """Checkpoint and publish what was applied since the last commit, then send queued acks.

        The order is the exactly-once guarantee: an ack must never outlive a crash.
        """
        if self._uncommitted:
            self.prune_seen()
            self.checkpoint()  # if this raises, nothing below runs: no ack without its checkpoint
            self.publish_model()
        applied, self._uncommitted = self._uncommitted, []
        self._send_acks()
        if not applied:
            return
        if self.evaluator is not None:
            self.evaluate_current()
            acc = self.stats.accuracy[-1]["accuracy"]
            if self.cfg.target_accuracy is not None and acc >= self.cfg.target_accuracy:
                self.finish(f"target accuracy {self.cfg.target_accuracy} reached")
        for result in applied:
            if self.scheduler is not None:
                self._observe_absorbed(result)  # pops each update's metadata as it observes it
            for uid in result.update_ids:
                self._pending_meta.pop(uid, None)  # the cloud has no scheduler: do not keep it forever

    def aggregate(self) -> None:
        """Apply the buffer and commit at once (what `run_once` does when one update is waiting)."""
        self.apply_buffer(self.clock())
        self.commit()

    def _observe_absorbed(self, result) -> None:
        own = self.own_joules()
        for uid in result.update_ids:
            loss, energy, samples = self._pending_meta.pop(uid, (result.mean_train_loss, 0.0, 1))
            decision = self.scheduler.observe(StepObservation(
                loss=loss, joules=energy + own / max(1, len(result.update_ids)), seconds=0.0, samples=samples))
            if decision.sync:
                size = self.push_up(decision.steps_since_sync)
                self.scheduler.on_synced(cost_joules=self.cfg.link_joules_per_mb * size / 1e6)
                log.info("pushed model delta to %s (%s)", self.cfg.parent, decision.reason)

    def push_up(self, absorbed_updates: int) -> int:
        """Send `model - pushed` to the parent. To the parent this is one fresh update: its
        staleness is counted there, in the parent's versions (never compounded across tiers)."""
        delta = self.model - self.pushed
        uid = new_update_id()
        recent = self.stats.versions[-max(1, absorbed_updates):]
        msg = ModelMessage(
            kind="update", sender=self.cfg.node_id, job=self.cfg.job, bundle_id=self.manifest.bundle_id,
            base_version=self.parent_version, version=self.version,
            num_samples=max(1, sum(self._child_samples.values())),
            local_steps=max(1, absorbed_updates),
            train_loss=float(np.mean([v["train_loss"] for v in recent])) if recent else 0.0,
            energy_j=0.0, is_delta=True, created_at=self.clock(), codec=self.cfg.up_codec, update_id=uid,
            tensors=unflatten(delta, self.manifest.trainable))
        size, sent = stage_update(msg, self.manifest, self.outbox, self.topics.up(self.cfg.parent, self.cfg.node_id),
                                  self.clock())
        self.pushed = self.pushed + sent  # error feedback, as on devices
        self.checkpoint()
        self.stats.pushes_up += 1
        self.stats.push_times.append(round(self.clock() - self.started, 3))
        self.flush_outbox()
        return size

    def flush_outbox(self) -> None:
        if self.outbox is None or not self.transport.connected:
            return
        for _, size in send_due(self.outbox, self.transport, chunk_bytes=self.cfg.chunk_bytes, now=self.clock()):
            self.stats.bytes_out += size

    # -- lifecycle -------------------------------------------------------------------------
    def finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.stats.stop_reason = reason
        log.info("finishing: %s", reason)
        if self.transport.connected:
            self._publish(self.topics.status(self.cfg.node_id), self.presence("finished"), retain=True)

    def telemetry(self, now: float) -> None:
        if now - self._last_telemetry < self.cfg.telemetry_every_s or not self.transport.connected:
            return
        self._last_telemetry = now
        values = {"version": self.version, "accepted": self.stats.accepted, "duplicates": self.stats.duplicates,
                  "rejected": sum(self.stats.rejected.values()), "pending": self.buffer.pending,
                  "children_offline": len(self.children_seen & self.offline), "aggregations": self.stats.aggregations,
                  "pushes_up": self.stats.pushes_up}
        if self.stats.accuracy:
            values["accuracy"] = self.stats.accuracy[-1]["accuracy"]
        self._publish(self.topics.telemetry(self.cfg.node_id), encode_telemetry(values), qos=0)

    def run_once(self, timeout: float = 0.2) -> None:
        """Handle one batch of queued messages (group commit), then the timers."""
        self._on_connection_change()
        msg = self.transport.get(timeout)
        batch_start, handled = time.monotonic(), 0
        while msg is not None:
            self.handle(msg.topic, msg.payload)
            self._apply_ready(self.clock())  # every aggregation is exactly K updates, even in a burst
            handled += 1
            if handled >= self.cfg.commit_max_updates or time.monotonic() - batch_start >= self.cfg.commit_max_s:
                break
            msg = self.transport.get(0)
        now = self.clock()
        self._apply_ready(now)  # the buffer's timer, or children gone offline
        self.commit()
        self.reassembler.expire(now)
        self.flush_outbox()
        self.telemetry(now)
        if self.cfg.max_minutes is not None and now - self.started >= 60 * self.cfg.max_minutes:
            self.finish(f"time limit {self.cfg.max_minutes} min")

    def evaluate_current(self) -> None:
        """Record the accuracy of the model as it stands (the untrained head's, at version 0)."""
        if self.evaluator is None:
            return
        acc, loss = self.evaluator(self.model)
        self.stats.accuracy.append({"t": round(self.clock() - self.started, 3), "version": self.version,
                                    "accuracy": acc, "loss": loss})
        log.info("v%d%s: held-out accuracy %.4f, loss %.4f", self.version,
                 " (untrained head)" if self.version == 0 else "", acc, loss)

    def run(self, should_stop: Callable[[], bool]) -> NodeStats:
        # Subscribe first: evaluation takes seconds, and a non-retained update published while we
        # are not yet subscribed would be dropped by the broker (children would re-send, but late).
        self._on_connection_change()
        self.evaluate_current()
        try:
            while not should_stop() and not self.finished:
                self.run_once()
            if not self.finished:
                self.stats.stop_reason = "signal"
        finally:
            self.shutdown()
        return self.stats

    def shutdown(self) -> None:
        self.commit()
        self.checkpoint()
        if self.transport.connected:
            self.flush_outbox()
            state = "finished" if self.finished else "offline"
            self._publish(self.topics.status(self.cfg.node_id), self.presence(state), retain=True)
            self.transport.flush(timeout=5.0)

    def summary(self) -> dict:
        intervals = {c: [s for _, s in arr] for c, arr in self.stats.child_arrivals.items()}
        return {
            "node": self.cfg.node_id, "parent": self.cfg.parent, "job": self.cfg.job,
            "bundle_id": self.manifest.bundle_id, "stop_reason": self.stats.stop_reason,
            "final_version": self.version, "aggregations": self.stats.aggregations,
            "versions": self.stats.versions, "accuracy": self.stats.accuracy,
            "updates_accepted": self.stats.accepted, "duplicates": self.stats.duplicates,
            "updates_rejected": dict(self.stats.rejected), "bytes_in": self.stats.bytes_in,
            "bytes_out": self.stats.bytes_out, "pushes_up": self.stats.pushes_up, "push_times": self.stats.push_times,
            "child_arrivals": {c: arr for c, arr in self.stats.child_arrivals.items()},
            "child_local_steps": intervals,
            "seconds": round(self.clock() - self.started, 3),
        }


def _parses(parse, topic: str) -> bool:
    try:
        parse(topic)
        return True
    except WireError:
        return False


def _update_id_hint(payload: bytes) -> str:
    """The update_id of a payload that failed validation, if its header is readable: it lets us
    ack the rejection so the sender stops re-sending. Never trusted for anything else."""
    import re

    try:
        n = int.from_bytes(payload[:8], "little")
        if n > 100_000 or n + 8 > len(payload):
            return ""
        meta = json.loads(payload[8 : 8 + n]).get("__metadata__", {})
        uid = str(meta.get("update_id", ""))
        return uid if re.fullmatch(r"[0-9a-f]{32}", uid) else ""
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""
