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
(loss = the child's train loss, joules = the energy the child reported plus this node's own,
read from its injected meter); when the scheduler says sync, it pushes `model - pushed` upward
through the same `Uplink` a device uses (outbox, acks, error feedback, merge rule
`P + (model - pushed)` for a new parent model).

What happens with each new model (the cloud's evaluate-and-stop) is an observer plugged in
(`edge_broker.observers`), not a branch on "am I the root". Clock, meter and transport are
injected: `tomtit node run` gives wall time and paho, the simulator a virtual clock and its
in-memory network, and both drive this same object.
"""
from __future__ import annotations

import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_runtime.adapter import unflatten
from device_runtime.energy import EnergyMeter, EnergyMeterError
from device_runtime.scheduler import StepObservation, SyncScheduler
from device_runtime.uplink import Uplink, UplinkConfig
from edge_broker.aggregation import (
    AggregationError,
    AsyncBuffer,
    ChildUpdate,
    StaleUpdateError,
)
from edge_broker.observers import Evaluator, ModelObserver
from edge_broker.checkpoint import NodeCheckpoint, load_checkpoint, save_checkpoint
from tomtit.manifest import Manifest
from tomtit.outbox import Outbox
from tomtit.signing import Keyring, Signer, is_signed, strip_unverified
from tomtit.transport import Transport
from tomtit.wire import (
    MAX_ACKS_PER_MESSAGE,
    Ack,
    ErrorReport,
    FlatDecoder,
    ModelMessage,
    Presence,
    Reassembler,
    RunConfig,
    Topics,
    WireError,
    decode_presence,
    encode_ack,
    encode_acks,
    encode_error,
    encode_message,
    encode_presence,
    encode_run_config,
    encode_telemetry,
    is_chunk,
    new_update_id,
)

__all__ = ["Evaluator", "Node", "NodeConfig", "NodeStats"]

log = logging.getLogger("tomtit.node")
_KEEP = 2**62  # base_version recorded when none is known: never pruned


@dataclass(frozen=True)
class NodeConfig:
    node_id: str  # unique in the job; children publish to node/{node_id}/up/{child}
    parent: str | None = None  # None: this node is the cloud (the root)
    job: str = "default"
    max_update_bytes: int = 64 << 20  # refuse bigger payloads before parsing them
    max_update_norm: float = 100.0  # L2 bound on one child delta: catches exploded or hostile updates
    max_local_steps: int = 1000  # bound on one update's local steps (>= every scheduler's tau_max): convergence needs it
    # An update built on a version ahead of ours is legal only after this node lost its state (it
    # is then counted as fresh); this far ahead it is junk, and its id could never be pruned
    # from `seen` (prune_seen keeps it until our version passes its base), so it is refused.
    max_base_ahead: int = 10_000
    model_codec: str = "f32"  # models go down exactly: every child must start from the same point
    up_codec: str = "f16"  # an edge's pushes upward
    chunk_bytes: int = 1_000_000  # split payloads above this (EMQX's default packet limit is 1 MB)
    chunk_timeout_s: float = 120.0  # drop a partial chunk set after this
    resend_after_s: float = 30.0  # edge: re-send an unacknowledged upward push after this
    link_joules_per_mb: float = 0.5  # edge: radio energy per MB pushed upward, where the meter cannot see the link
    max_minutes: float | None = None  # stop after this long
    wait_for_parent: bool = False  # edge, synchronous rounds (HierFAVG): after a push, hold our model until the parent's arrives
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
    pushes_postponed: int = 0  # push decisions deferred while the link was still sending
    push_times: list[float] = field(default_factory=list)
    push_intervals: list[int] = field(default_factory=list)  # absorbed updates per push cycle
    push_reasons: list[str] = field(default_factory=list)  # the edge scheduler's reason for each push
    child_arrivals: dict = field(default_factory=lambda: defaultdict(list))  # child -> [(t, local_steps)]
    applied_ids: dict = field(default_factory=lambda: defaultdict(list))  # child -> update ids applied (this process)
    versions: list[dict] = field(default_factory=list)
    stop_reason: str = ""


class Node:
    """The node as a state machine fed events (messages, timers) with clock, meter and transport
    injected. The receive core (validate -> dedupe -> buffer -> group commit -> publish -> ack)
    is the same at every tier; an edge adds an `Uplink`, the cloud adds observers."""

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
        observers: Sequence[ModelObserver] = (),
        meter: EnergyMeter | None = None,
        run_config: RunConfig | None = None,
        clock: Callable[[], float] = time.time,
        signer: Signer | None = None,
        keyring: Keyring | None = None,
    ):
        """`run_config`: the cloud publishes it, retained, on tomtit/{job}/run at every connect.
        `signer` signs our models (and an edge's pushes); with a `keyring` (our children's and
        our parent's public keys) only what they signed is accepted (tomtit.signing)."""
        if config.parent is not None and scheduler is None:
            raise ValueError("an edge node (with a parent) needs a sync scheduler")
        self.cfg = config
        self.manifest = manifest
        self.buffer = buffer
        self.transport = transport
        self.scheduler = scheduler
        self.observers = tuple(observers)
        self.meter = meter
        self.run_config = run_config
        self.clock = clock
        self.signer, self.keyring = signer, keyring
        self.topics = Topics(config.job)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.stats = NodeStats()
        self.model = np.array(initial_adapter, np.float32)
        self.version = 0
        self.uplink: Uplink | None = None
        if config.parent is not None:
            self.uplink = Uplink(
                UplinkConfig(sender=config.node_id, parent=config.parent, job=config.job, codec=config.up_codec,
                             chunk_bytes=config.chunk_bytes, max_model_bytes=config.max_update_bytes,
                             wait_for_parent=config.wait_for_parent),
                manifest=manifest, outbox=Outbox(self.state_dir / "outbox", resend_after_s=config.resend_after_s),
                scheduler=scheduler, reference=self.model, signer=signer, keyring=keyring)
        self.seen: dict[str, int] = {}  # applied update_id -> its reported base_version (prune_seen)
        self.seen_horizon = 0  # updates reporting a base_version below this may have been pruned
        self._pending_base: dict[str, int] = {}  # buffered update_id -> its reported base_version
        self.children_seen: set[str] = set()  # ids that have sent us an update
        self.offline: set[str] = set()  # ids whose retained presence says offline
        self._up_prefix = self.topics.up_filter(config.node_id)[:-1]  # "tomtit/{job}/node/{id}/up/"
        self.decoder = FlatDecoder(manifest.trainable, bundle_id=manifest.bundle_id, max_bytes=config.max_update_bytes)
        self.reassembler = Reassembler(timeout_s=config.chunk_timeout_s, max_total_bytes=config.max_update_bytes)
        self.finished = False
        self.started = clock()
        self._last_telemetry = -float("inf")
        self._was_connected = False
        self._pending_meta: dict[str, tuple[float, float, int]] = {}  # update_id -> (loss, joules, samples)
        self._uncommitted: list = []  # AggregateResults applied to the model, not yet checkpointed
        self._unobserved: list = []  # ...and not yet seen by this edge's scheduler
        self._acks_out: dict[str, list[Ack]] = defaultdict(list)  # child -> acks sent at the next commit
        self._child_samples: dict[str, int] = {}  # child -> its latest num_samples
        self._child_loss: dict[str, tuple[float, int]] = {}  # child -> its latest (train loss, samples)
        self._meter_last: float | None = None  # own meter reading at the last absorbed update
        self._cycle_joules = 0.0  # edge: children's reported + own joules since our last push
        self._resume()

    # Views of the uplink (the cloud has none: what "the parent holds of us" is the model itself).
    @property
    def outbox(self) -> Outbox | None:
        return self.uplink.outbox if self.uplink is not None else None

    @property
    def pushed(self) -> np.ndarray:
        return self.uplink.reference if self.uplink is not None else self.model

    @property
    def parent_version(self) -> int:
        return self.uplink.base_version if self.uplink is not None else 0

    # -- checkpoints -----------------------------------------------------------------------
    def _resume(self) -> None:
        ck = load_checkpoint(self.state_dir, self.manifest)
        if ck is None:
            if self.uplink is not None and len(self.uplink.outbox):
                # staged before the first checkpoint was ever written: none of it is accounted for
                self.uplink.resume(self.model, 0, set())
            return
        self.model, self.version = ck.model, ck.version
        self.seen = dict(ck.seen)
        self.seen_horizon = ck.seen_horizon
        if self.uplink is not None:  # a push staged just before a crash: the uplink accounts for it now
            self.uplink.resume(ck.pushed, ck.parent_version, set(ck.accounted))
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
        payload = encode_message(msg)
        if self.signer is not None:
            payload = self.signer.sign(payload)
        self._publish(self.topics.down(self.cfg.node_id), payload, retain=True)

    def presence(self, state: str) -> bytes:
        return encode_presence(Presence(id=self.cfg.node_id, state=state, role="node",
                                        version=self.version, ts=self.clock()))

    def _ack(self, child: str, update_id: str, status: str, reason: str = "") -> None:
        """Queue an ack; `commit` sends each child's queued acks as one message, after the checkpoint."""
        self._acks_out[child].append(Ack(update_id=update_id, status=status, reason=reason,
                                         node_version=self.version))

    def _send_acks(self) -> None:
        # Signed like our models: a child drops an update from its outbox on an ack, so a forged
        # "applied" (a compromised broker or bridge) would lose that update for good.
        sign = self.signer.sign if self.signer is not None else (lambda payload: payload)
        for child, acks in self._acks_out.items():
            topic = self.topics.ack(self.cfg.node_id, child)
            if len(acks) == 1:  # the single-ack form (children read both forms)
                self._publish(topic, sign(encode_ack(acks[0])))
                continue
            for i in range(0, len(acks), MAX_ACKS_PER_MESSAGE):
                self._publish(topic, sign(encode_acks(acks[i:i + MAX_ACKS_PER_MESSAGE])))
        self._acks_out.clear()

    def _reject(self, child: str, update_id: str, reason: str, detail: str, *, ack: bool = True) -> None:
        """Count, report on errors/ and (with `ack`) tell the sender, which then drops the update.
        ack=False where a clean re-send would succeed: the sender keeps it and re-sends."""
        self.stats.rejected[reason] += 1
        log.warning("rejected update %s from %s: %s (%s)", update_id[:8] or "?", child, reason, detail[:200])
        self._publish(self.topics.errors(self.cfg.node_id),
                      encode_error(ErrorReport(update_id=update_id, sender=child, reason=reason, detail=detail)))
        if update_id and ack:
            self._ack(child, update_id, "rejected", reason)

    # -- connection ------------------------------------------------------------------------
    def _on_connection_change(self) -> None:
        now = self.transport.connected
        if now and not self._was_connected:
            t, c = self.topics, self.cfg
            self.transport.subscribe(t.up_filter(c.node_id), qos=1)
            self.transport.subscribe(t.status_filter(), qos=1)
            if self.uplink is not None:
                self.uplink.subscribe(self.transport)
                self.uplink.outbox.reset_timers()
            if self.run_config is not None:
                self._publish(t.run(), encode_run_config(self.run_config), retain=True)
            self._publish(t.status(c.node_id), self.presence("finished" if self.finished else "online"), retain=True)
            self.publish_model()
        self._was_connected = now

    # -- inbound ---------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        t = self.topics
        self.stats.bytes_in += len(payload)
        if topic.startswith(self._up_prefix):  # first: nearly every message is a child's update
            try:
                _, child = t.parse_up(topic)
            except WireError as e:
                log.warning("ignored %s: %s", topic, e)
                return
            self._on_update_payload(child, payload)
        elif self.uplink is not None and topic == self.uplink.down_topic:
            self._on_parent_model(payload)
        elif self.uplink is not None and topic == self.uplink.ack_topic:
            try:
                self.uplink.on_acks(payload)
            except WireError as e:
                log.warning("ignored a malformed ack: %s", e)
        elif _parses(t.parse_status, topic):
            self._on_presence(topic, payload)
        elif topic == t.run():
            pass  # the run configuration: read once at start (tomtit node run)
        else:
            log.warning("ignored a message on %s", topic)

    def _handle_guarded(self, topic: str, payload: bytes) -> None:
        """`handle`, with a last line of defence: every parser is meant to raise WireError on
        bad input, but a message that still finds an unexpected exception must cost one
        rejection (reason `internal`, logged with its traceback), not the node."""
        try:
            self.handle(topic, payload)
        except (MemoryError, RecursionError, ValueError, TypeError, KeyError, IndexError, OverflowError,
                ArithmeticError, AttributeError) as e:
            log.exception("internal error handling a message on %s", topic)
            child = ""
            if topic.startswith(self._up_prefix):
                try:
                    child = self.topics.parse_up(topic)[1]
                except WireError:
                    pass
            self._reject(child, _update_id_hint(payload) if child else "", "internal",
                         f"{type(e).__name__}: {str(e)[:200]}")

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
                # keyed by the child's topic too: one set cannot be assembled from two children's chunks
                whole = self.reassembler.add(payload, self.clock(), source=child)
            except WireError as e:
                # A chunk that is bad in itself would be bad again when re-sent: the sender is told
                # (by the chunk's update id) and drops it. A set that went wrong (chunks disagreeing
                # with each other) is reported but not acked: the sender's re-send of the whole set
                # after its timeout starts a clean one, and its progress is not thrown away.
                self._reject(child, _update_id_hint(payload), e.reason, e.detail,
                             ack=e.reason not in _SET_ERRORS)
                return
            if whole is None:
                return
            payload = whole
        if self.keyring is not None:
            try:  # before any parsing: an unsigned or forged payload goes no further
                payload = self.keyring.verify(payload, expect_signer=child)
            except WireError as e:
                # reported, never acked: an honest sender's signature does not fail, and an ack
                # naming an id would let a forger cancel the real sender's pending update
                self._reject(child, "", e.reason, e.detail, ack=False)
                return
        elif is_signed(payload):
            payload = strip_unverified(payload)  # no keys configured here: accepted as before
        try:
            msg, delta = self.decoder.decode(payload, expect_kind="update", expect_sender=child,
                                             expect_job=self.cfg.job)
        except WireError as e:
            self._reject(child, _update_id_hint(payload), e.reason, e.detail)
            return
        if not msg.is_delta:
            # full adapter values added as a delta would double the model
            self._reject(child, msg.update_id, "not_delta", "an update must carry a delta (is_delta=true)")
            return
        if msg.update_id in self.seen:
            self.stats.duplicates += 1
            self._ack(child, msg.update_id, "duplicate")  # its first ack may have been lost
            return
        if msg.update_id in self.buffer:
            return  # a re-send of something waiting in the buffer: acked when applied
        if msg.base_version > self.version + self.cfg.max_base_ahead:
            self._reject(child, msg.update_id, "future_base",
                         f"base_version {msg.base_version} is more than {self.cfg.max_base_ahead} "
                         f"versions ahead of ours ({self.version})")
            return
        if msg.base_version < self.seen_horizon:
            # it may be an applied update whose id was pruned (prune_seen): never apply it again
            self._reject(child, msg.update_id, "stale",
                         f"base_version {msg.base_version} is below {self.seen_horizon}, the oldest this node remembers")
            return
        norm = float(np.linalg.norm(delta))
        if norm > self.cfg.max_update_norm:
            self._reject(child, msg.update_id, "norm", f"L2 norm {norm:.3g} > bound {self.cfg.max_update_norm}")
            return
        if msg.local_steps > self.cfg.max_local_steps:
            # the convergence argument (docs/evaluation.md) needs bounded local work per update
            self._reject(child, msg.update_id, "local_steps",
                         f"{msg.local_steps} local steps > bound {self.cfg.max_local_steps}")
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
            model = self.uplink.decode_model(payload)
        except WireError as e:
            log.error("ignored parent model: %s", e)
            return
        if model.version <= self.parent_version:
            return
        self.model = self.uplink.adopt(model, self.model)  # P + (model - pushed); the scheduler is told
        self.version += 1
        self.checkpoint()
        self.publish_model()
        log.info("merged parent model v%d -> our v%d", model.version, self.version)

    # -- aggregation -----------------------------------------------------------------------
    def effective_ready(self, now: float) -> bool:
        if self.buffer.ready(now):
            return True
        # Children that went offline are dropped from the waiting set: each known child whose
        # presence says offline lowers K by one (never below one pending update).
        gone = len(self.children_seen & self.offline)
        pending = self.buffer.pending
        return pending > 0 and gone > 0 and pending >= max(1, self.buffer.config.k_updates - gone)

    def next_timer(self) -> float | None:
        """When the buffer's max-wait timer fires (clock time), or None: for event-driven callers."""
        return self.buffer.deadline()

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
            self.stats.applied_ids[child].append(uid)
        self._uncommitted.append(result)
        self._unobserved.append(result)
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
        """Make what was applied since the last commit durable and visible, then ack it.

        Order: the edge's scheduler sees the absorbed updates (and may stage a push: staged
        before the checkpoint that accounts for it) -> checkpoint -> publish the model (held,
        in synchronous rounds, while a push waits for the parent's answer) -> acks -> observers.
        An ack never outlives a crash: if the checkpoint raises, nothing after it runs.
        """
        had = bool(self._uncommitted)
        if had:
            self.prune_seen()
            # Observed once, even if the checkpoint below fails and shutdown commits again.
            observe, self._unobserved = self._unobserved, []
            for result in observe:
                if self.scheduler is not None and self.uplink is not None:
                    self._observe_absorbed(result)
                for uid in result.update_ids:
                    self._pending_meta.pop(uid, None)
            self.checkpoint()
            if self.uplink is None or not self.uplink.waiting_for_parent:
                self.publish_model()  # (held in synchronous rounds: the parent's model comes next, children wait for it)
        self._uncommitted = []
        self._send_acks()
        self.flush_outbox()
        if not had:
            return
        for observer in self.observers:
            stop = observer.on_model(self.version, self.model, self.clock() - self.started)
            if stop:
                self.finish(stop)

    def _own_joules(self) -> float:
        """Joules this node spent since the last call (its own meter; 0 without one)."""
        if self.meter is None:
            return 0.0
        try:
            now = self.meter.joules()
        except EnergyMeterError as e:
            log.warning("energy meter read failed (%s); counting 0 J", e)
            return 0.0
        last, self._meter_last = self._meter_last, now
        return max(0.0, now - last) if last is not None else 0.0

    def _observe_absorbed(self, result) -> None:
        """Each absorbed update is one step of this edge's scheduler. Its loss is the
        sample-weighted mean of every child's latest reported loss: an estimate of the loss of
        the edge's population that one update moves a little. (Feeding each child's raw loss,
        as before, made the edge's loss curve jump between children whose data differ (non-IID
        children sit at different loss levels), so the rule saw noise and pushed rarely.)"""
        own = self._own_joules() / max(1, len(result.update_ids))
        for uid, child in zip(result.update_ids, result.senders):
            loss, energy, samples = self._pending_meta.pop(uid, (result.mean_train_loss, 0.0, 1))
            self._child_loss[child] = (loss, max(1, samples))
            total = sum(n for _, n in self._child_loss.values())
            level = sum(v * n for v, n in self._child_loss.values()) / total
            joules = energy + own
            self._cycle_joules += joules
            decision = self.scheduler.observe(StepObservation(loss=level, joules=joules, seconds=0.0, samples=total))
            if decision.sync and self.transport.publishing:
                self.stats.pushes_postponed += 1  # the link is still sending: see DeviceAgent.step
            elif decision.sync:
                before = self._own_joules()
                size = self.push_up(decision.steps_since_sync)
                self.stats.push_reasons.append(decision.reason)
                cost = before + self._own_joules() + self.cfg.link_joules_per_mb * size / 1e6
                self.scheduler.on_synced(cost_joules=cost)
                log.info("pushed model delta to %s (%s)", self.cfg.parent, decision.reason)

    def push_up(self, absorbed_updates: int) -> int:
        """Stage `model - pushed` for the parent. To the parent this is one fresh update: its
        staleness is counted there, in the parent's versions (never compounded across tiers).
        The caller checkpoints (`commit`), which accounts for the staged push."""
        recent = self.stats.versions[-max(1, absorbed_updates):]
        size = self.uplink.send(
            self.model, version=self.version, num_samples=max(1, sum(self._child_samples.values())),
            local_steps=max(1, absorbed_updates),
            train_loss=float(np.mean([v["train_loss"] for v in recent])) if recent else 0.0,
            energy_j=self._cycle_joules, now=self.clock())
        self._cycle_joules = 0.0
        self.stats.pushes_up += 1
        self.stats.push_times.append(round(self.clock() - self.started, 3))
        self.stats.push_intervals.append(max(1, absorbed_updates))
        return size

    def flush_outbox(self) -> None:
        if self.uplink is not None:
            self.stats.bytes_out += self.uplink.flush(self.transport, self.clock())

    # -- lifecycle -------------------------------------------------------------------------
    def finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.stats.stop_reason = reason
        log.info("finishing: %s", reason)
        if self.transport.connected:
            self._last_telemetry = -float("inf")  # a last report: the final model's numbers, for monitors
            self.telemetry(self.clock())
            self._publish(self.topics.status(self.cfg.node_id), self.presence("finished"), retain=True)

    @property
    def role(self) -> str:
        return "edge" if self.cfg.parent else "cloud"

    def telemetry(self, now: float) -> None:
        if now - self._last_telemetry < self.cfg.telemetry_every_s or not self.transport.connected:
            return
        self._last_telemetry = now
        values = {"version": self.version, "accepted": self.stats.accepted, "duplicates": self.stats.duplicates,
                  "rejected": sum(self.stats.rejected.values()), "pending": self.buffer.pending,
                  "children_offline": len(self.children_seen & self.offline), "aggregations": self.stats.aggregations,
                  "pushes_up": self.stats.pushes_up, "role": self.role, "parent": self.cfg.parent or ""}
        if self.uplink is not None:
            st = self.stats
            values.update({"last_push_interval": st.push_intervals[-1] if st.push_intervals else 0,
                           "last_push_reason": st.push_reasons[-1][:200] if st.push_reasons else "",
                           "up_outbox": len(self.uplink.outbox), "up_acked": self.uplink.acked,
                           "up_rejected": self.uplink.rejected})
        for observer in self.observers:
            values.update(observer.telemetry())
        self._publish(self.topics.telemetry(self.cfg.node_id), encode_telemetry(values), qos=0)

    def run_once(self, timeout: float = 0.2) -> None:
        """Handle one batch of queued messages (group commit), then the timers."""
        self._on_connection_change()
        msg = self.transport.get(timeout)
        batch_start, handled = self.clock(), 0
        while msg is not None:
            self._handle_guarded(msg.topic, msg.payload)
            self._apply_ready(self.clock())  # every aggregation is exactly K updates, even in a burst
            handled += 1
            if handled >= self.cfg.commit_max_updates or self.clock() - batch_start >= self.cfg.commit_max_s:
                break
            msg = self.transport.get(0)
        now = self.clock()
        self._apply_ready(now)  # the buffer's timer, or children gone offline
        for child, update_id in self.reassembler.expire(now):
            # reported (it used to vanish without a trace); not acked: the sender re-sends the set
            self._reject(child, update_id, "incomplete",
                         f"chunk set incomplete after {self.cfg.chunk_timeout_s:g} s (or evicted); "
                         f"the sender's re-send starts it again", ack=False)
        self.commit()  # sends the acks gathered above
        self.flush_outbox()
        self.telemetry(now)
        if self.cfg.max_minutes is not None and now - self.started >= 60 * self.cfg.max_minutes:
            self.finish(f"time limit {self.cfg.max_minutes} min")

    def start(self) -> None:
        """Connect-time work: subscribe first (evaluation takes seconds, and a non-retained update
        published before we subscribe would be dropped by the broker), then let observers see the
        initial model (the untrained head's accuracy)."""
        self._on_connection_change()
        for observer in self.observers:
            observer.on_model(self.version, self.model, self.clock() - self.started)

    def run(self, should_stop: Callable[[], bool]) -> NodeStats:
        self.start()
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
        out = {
            "node": self.cfg.node_id, "parent": self.cfg.parent, "role": self.role, "job": self.cfg.job,
            "started_at": self.started,
            "bundle_id": self.manifest.bundle_id, "stop_reason": self.stats.stop_reason,
            "final_version": self.version, "aggregations": self.stats.aggregations,
            "versions": self.stats.versions,
            "updates_accepted": self.stats.accepted, "duplicates": self.stats.duplicates,
            "updates_rejected": dict(self.stats.rejected), "bytes_in": self.stats.bytes_in,
            "bytes_out": self.stats.bytes_out, "pushes_up": self.stats.pushes_up, "pushes_postponed": self.stats.pushes_postponed,
            "push_times": self.stats.push_times, "push_intervals": self.stats.push_intervals,
            "push_reasons": self.stats.push_reasons,
            "child_arrivals": {c: arr for c, arr in self.stats.child_arrivals.items()},
            "child_local_steps": intervals,
            "seconds": round(self.clock() - self.started, 3),
            "applied_ids": {c: list(ids) for c, ids in self.stats.applied_ids.items()},
        }
        if self.uplink is not None:
            out["ledger"] = self.uplink.ledger()
        for observer in self.observers:
            out.update(observer.summary())
        return out


def _parses(parse, topic: str) -> bool:
    try:
        parse(topic)
        return True
    except WireError:
        return False


# chunk errors of a set rather than of one chunk (see `_on_update_payload`)
_SET_ERRORS = frozenset({"chunk_mismatch", "chunk_conflict", "bad_checksum"})
_UPDATE_ID_IN_HEADER = re.compile(rb'"update_id"\s*:\s*"([0-9a-f]{32})"')


def _update_id_hint(payload: bytes) -> str:
    """The update_id of a payload that failed validation, if its header names exactly one: it
    lets us ack the rejection so the sender stops re-sending. Never trusted for anything else.

    A bounded regex scan of the header bytes, not a JSON parse: this runs on exactly the
    payloads that failed validation (a deeply nested header made json.loads raise
    RecursionError here, outside any handler, and killed the node)."""
    if len(payload) < 8:
        return ""
    n = int.from_bytes(payload[:8], "little")
    if n > 100_000 or n + 8 > len(payload):
        return ""
    found = {m.group(1) for m in _UPDATE_ID_IN_HEADER.finditer(payload, 8, 8 + n)}
    return found.pop().decode("ascii") if len(found) == 1 else ""
