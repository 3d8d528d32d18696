"""The federated device agent: train locally, decide autonomously when to sync, lose nothing.

    load bundle -> connect (persistent session, LWT) -> take the retained parent model -> loop:
        one training step -> loss, joules          (meter)
        decision = scheduler.observe(step)         (pure: no clock, no broker inside)
        if decision.sync: update -> outbox on disk -> publish; kept until the node's ack
        on a new parent model: merge it in, tell the scheduler

Model bookkeeping (all flat float32 buffers in the manifest's order):
  `reference` = what the parent holds of us: the last adopted parent model plus every delta we
  have sent since. An update carries `local - reference`, and after sending, `reference` advances
  by the *decoded* delta, so f16/int8 rounding error stays in `local - reference` and goes out
  with the next update (error feedback) instead of being lost.
  On a new parent model P: `local = P + (local - reference)`, `reference = P` — progress not yet
  sent survives the swap (the same rule an edge uses, `edge_broker.aggregation.merge_parent_model`).

Optimizer state (AdamW moments) is kept across parent models: the merged model is a small move
from the local one, and resetting Adam's moments would restart its bias correction and make the
first steps after every sync noisy. ORT's training API has no moment reset short of reloading the
checkpoint, which would also cost seconds on a board.

Served inference (optional, `device_runtime.serving`): requests that arrive with the other
messages are queued by the server, and `step` lets it run at most one inference batch before each
training step; the time and joules it takes are kept out of the step's, so the scheduler sees
training only. Without a server the agent behaves exactly as before.

Persistence (`--state-dir`): the local and reference adapters, the base version and counters are
written atomically at every sync, every `checkpoint_every` steps and on shutdown; a restarted
device resumes from them and re-sends whatever the outbox still holds.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_runtime.adapter import AdapterError
from device_runtime.energy import EnergyMeter, EnergyMeterError
from device_runtime.local_data import BatchStream
from device_runtime.scheduler import StepObservation, SyncScheduler
from device_runtime.serving import InferenceServer, ServedAdapter
from device_runtime.trainer import Trainer
from device_runtime.uplink import ParentModel, Uplink, UplinkConfig
from tomtit.fsutil import atomic_write_bytes
from tomtit.signing import Keyring, Signer
from tomtit.manifest import Manifest
from tomtit.outbox import Outbox
from tomtit.transport import Transport
from tomtit.wire import (
    Presence,
    Topics,
    WireError,
    decode_presence,
    encode_presence,
    encode_telemetry,
)

STATE_FILE = "device-state.safetensors"  # local adapter + reference + counters, one atomic file
log = logging.getLogger("tomtit.device")


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str  # unique in the job; names our up/ack topics and the broker session
    parent: str  # the node (edge) we sync with
    job: str = "default"  # run id: every topic lives under tomtit/{job}/
    codec: str = "f16"  # update encoding: f16 halves the bytes at ~2e-4 relative error
    chunk_bytes: int = 1_000_000  # split larger payloads (EMQX's default packet limit is 1 MB)
    max_model_bytes: int = 64 << 20  # refuse larger model messages before parsing them
    telemetry_every: int = 10  # steps between telemetry messages (QoS 0, cheap)
    checkpoint_every: int = 50  # steps between local state checkpoints
    resend_after_s: float = 30.0  # re-send an unacknowledged update after this (then backoff)
    link_joules_per_mb: float = 0.5  # radio energy per MB sent, added to the measured CPU cost of a sync
    wait_for_model_s: float = 10.0  # at start, wait this long for the parent's retained model
    max_steps: int | None = None  # stop after this many local steps (demos, tests)
    wait_for_parent: bool = False  # synchronous rounds (FedAvg/HierFAVG baselines): idle after a sync until the parent's next model
    board: str = ""  # emulated board profile (device_runtime.emulation); "" on the real hardware. Named in telemetry and summary
    link: str = ""  # emulated link profile, likewise
    timeline_points: int = 2000  # (time, step, joules, loss) samples kept for the run summary's plots


@dataclass
class DeviceStats:
    steps: int = 0
    syncs: int = 0
    models_adopted: int = 0
    joules: float = 0.0
    waited_s: float = 0.0  # synchronous rounds: time spent idle waiting for the parent's model
    postponed: int = 0  # sync decisions deferred while the link was still sending the previous message
    intervals: list[int] = field(default_factory=list)
    sync_times: list[float] = field(default_factory=list)  # clock() at each sync
    reasons: list[str] = field(default_factory=list)  # the scheduler's reason for each sync
    stop_reason: str = ""
    bytes_down: int = 0  # every payload received (models, acks, presence, inference requests)
    serve_joules: float = 0.0  # energy of served inference batches (kept out of the training steps')
    timeline: list[list[float]] = field(default_factory=list)  # [clock(), step, joules, loss] per telemetry point


class DeviceAgent:
    """The device as a state machine fed events (a step, a message), with its clock, energy
    meter and transport injected: `tomtit device run` gives wall time, a hardware meter and
    paho; the simulator a virtual clock, an emulated meter and its in-memory network. Nothing
    in here sleeps or reads the time except through `clock`."""

    def __init__(
        self,
        config: DeviceConfig,
        *,
        manifest: Manifest,
        trainer: Trainer,
        batches: BatchStream,
        num_samples: int,
        meter: EnergyMeter,
        scheduler: SyncScheduler,
        transport: Transport,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
        signer: Signer | None = None,
        keyring: Keyring | None = None,
        server: InferenceServer | None = None,
    ):
        """`signer` signs our updates; with a `keyring`, only models our parent signed are taken
        (tomtit.signing; both come from a credentials file). `server`: answer inference requests
        between steps (None: do not serve)."""
        self.cfg = config
        self.manifest = manifest
        self.trainer = trainer
        self.batches = batches
        self.num_samples = num_samples
        self.meter = meter
        self.scheduler = scheduler
        self.transport = transport
        self.clock = clock
        self.topics = Topics(config.job)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.uplink = Uplink(
            UplinkConfig(sender=config.device_id, parent=config.parent, job=config.job, codec=config.codec,
                         chunk_bytes=config.chunk_bytes, max_model_bytes=config.max_model_bytes,
                         wait_for_parent=config.wait_for_parent),
            manifest=manifest, outbox=Outbox(self.state_dir / "outbox", resend_after_s=config.resend_after_s),
            scheduler=scheduler, reference=trainer.get_adapter(),  # version 0 == the bundle's initial adapter
            signer=signer, keyring=keyring)
        self.stats = DeviceStats()
        self.server = server
        self.global_model: ParentModel | None = None  # the parent's model as last adopted, for serving
        self.parent_finished = False
        self._cycle_losses: list[float] = []
        self._cycle_joules = 0.0
        self._was_connected = False
        self._last_joules: float | None = None
        self.started_at = clock()
        self._resume()

    # Views kept for callers and tests: the uplink owns these.
    @property
    def outbox(self) -> Outbox:
        return self.uplink.outbox

    @property
    def reference(self) -> np.ndarray:
        return self.uplink.reference

    @property
    def base_version(self) -> int:
        return self.uplink.base_version

    # -- persistence -----------------------------------------------------------------------
    def _resume(self) -> None:
        try:
            saved = self._load_state()
        except (ValueError, KeyError, OSError, AdapterError) as e:
            log.error("cannot resume from %s (%s): starting from the bundle's adapter", self.state_dir, e)
            return
        if saved is None:
            if len(self.outbox):  # staged before the first state file was written: account for it
                self.stats.syncs = self.uplink.resume(self.reference, 0, set())
            return
        meta, local, reference = saved
        if meta.get("bundle_id") != self.manifest.bundle_id:
            log.warning("state in %s is for bundle %s, not %s: starting fresh",
                        self.state_dir, meta.get("bundle_id"), self.manifest.bundle_id)
            return
        for name, x in (("local", local), ("reference", reference)):
            if x.dtype != np.float32 or x.shape != (self.manifest.buffer_size,) or not np.isfinite(x).all():
                log.error("cannot resume from %s (%s is not a finite float32[%d]): starting from the bundle's "
                          "adapter", self.state_dir, name, self.manifest.buffer_size)
                return
        try:
            counters = {k: int(meta.get(k, 0)) for k in ("base_version", "steps", "syncs")}
            accounted = set(json.loads(meta["accounted"]))
        except (ValueError, TypeError, KeyError) as e:
            log.error("cannot resume from %s (bad counters: %s): starting from the bundle's adapter", self.state_dir, e)
            return
        # An update staged just before a crash, with the state not saved after it, is still sent:
        # the uplink accounts for it now, as a send would have.
        late = self.uplink.resume(reference, counters["base_version"], accounted)
        self.trainer.set_adapter(local)
        self.stats.steps = counters["steps"]
        self.stats.syncs = counters["syncs"] + late
        log.info("resumed at step %d, base version %d, %d update(s) awaiting ack",
                 self.stats.steps, self.base_version, len(self.outbox))

    def _load_state(self) -> tuple[dict, np.ndarray, np.ndarray] | None:
        path = self.state_dir / STATE_FILE
        if not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "np") as f:
                meta = dict(f.metadata() or {})
                local, reference = f.get_tensor("local"), f.get_tensor("reference")
        except SafetensorError as e:
            raise ValueError(str(e)) from None
        return meta, local, reference

    def save_state(self) -> None:
        """Local adapter, reference and counters in ONE file, replaced atomically.

        One file because they only make sense together: a crash between writing a new local
        adapter and its reference would make the next update re-send progress already sent.
        """
        from safetensors.numpy import save

        meta = {"bundle_id": self.manifest.bundle_id, "base_version": str(self.base_version),
                "steps": str(self.stats.steps), "syncs": str(self.stats.syncs), "saved_at": repr(self.clock()),
                "accounted": json.dumps(self.outbox.ids())}  # staged updates already in `reference`
        atomic_write_bytes(self.state_dir / STATE_FILE, save({
            "local": np.ascontiguousarray(self.trainer.get_adapter(), np.float32),
            "reference": np.ascontiguousarray(self.reference, np.float32)}, metadata=meta))

    # -- connection ------------------------------------------------------------------------
    def presence(self, state: str) -> bytes:
        return encode_presence(Presence(id=self.cfg.device_id, state=state, role="device",
                                        version=self.base_version, ts=self.clock()))

    def subscribe(self) -> None:
        self.uplink.subscribe(self.transport)
        self.transport.subscribe(self.topics.status(self.cfg.parent), qos=1)
        if self.server is not None:
            self.server.subscribe()

    def announce(self) -> None:
        self.transport.publish(self.topics.status(self.cfg.device_id), self.presence("online"), qos=1, retain=True)

    # -- inbound ---------------------------------------------------------------------------
    def drain_inbound(self, timeout: float = 0.0) -> None:
        """Handle what has arrived. Inference requests count against the server's per-drain cap:
        past it the drain stops and the rest (requests, and any model or ack queued behind them)
        waits in the transport for the next call, so a request flood cannot keep the step that
        follows from starting; nothing is dropped here (the transport sheds a flood on arrival)."""
        budget = self.server.max_offers_per_drain if self.server is not None else 0
        msg = self.transport.get(timeout)
        while msg is not None:
            if self.server is not None and msg.topic == self.server.request_topic:
                self.stats.bytes_down += len(msg.payload)
                self.server.offer(msg)  # queued, or answered with an error at once; never raises
                budget -= 1
                if budget <= 0:
                    return
            else:
                self._handle(msg.topic, msg.payload)
            msg = self.transport.get(0)

    def _handle(self, topic: str, payload: bytes) -> None:
        self.stats.bytes_down += len(payload)
        try:
            if topic == self.uplink.down_topic:
                self._on_model(payload)
            elif topic == self.uplink.ack_topic:
                self.uplink.on_acks(payload)
            elif topic == self.topics.status(self.cfg.parent):
                if payload and decode_presence(payload).state == "finished":
                    self.parent_finished = True
        except WireError as e:
            # A corrupt or foreign message is logged and dropped; it never stops training.
            log.error("ignored a message on %s: %s", topic, e)

    def _on_model(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        model = self.uplink.decode_model(payload)
        if not self.uplink.is_new(model):
            return  # an older or repeated retained model
        self.trainer.set_adapter(self.uplink.adopt(model, self.trainer.get_adapter()))
        self.global_model = model
        self.stats.models_adopted += 1
        log.info("adopted parent model v%d (from %s)", model.version, model.sender)

    # -- served inference ------------------------------------------------------------------
    def served_adapter(self, kind: str) -> ServedAdapter | None:
        """The adapter a request asks for (device_runtime.serving.AdapterSource)."""
        if kind == "local":
            return ServedAdapter(self.trainer.get_adapter(), self.base_version, self.stats.steps)
        if self.global_model is None:
            return None
        return ServedAdapter(self.global_model.params, self.global_model.version, self.stats.steps)

    def serve(self) -> None:
        """At most one inference batch; its joules are booked as serving, not as the next step's."""
        if self.server is None or not self.server.pending:
            return
        j0 = self._read_joules() if self._last_joules is None else self._last_joules
        if self.server.serve(self):
            self._last_joules = self._read_joules()
            self.stats.serve_joules += max(0.0, self._last_joules - j0)

    # -- outbound --------------------------------------------------------------------------
    def flush_outbox(self) -> None:
        self.uplink.flush(self.transport, self.clock())

    def sync(self, steps_in_cycle: int) -> int:
        """Send `local - reference` as an update; returns the payload size."""
        size = self.uplink.send(
            self.trainer.get_adapter(), version=self.stats.syncs + 1, num_samples=self.num_samples,
            local_steps=steps_in_cycle,
            train_loss=float(np.mean(self._cycle_losses)) if self._cycle_losses else 0.0,
            energy_j=self._cycle_joules, now=self.clock())
        self.stats.syncs += 1
        self.stats.intervals.append(steps_in_cycle)
        self.stats.sync_times.append(self.clock())
        self.save_state()
        self.flush_outbox()
        return size

    @property
    def energy_kind(self) -> str:
        """measured (a hardware meter) | emulated (a board profile) | estimated (a model of this one)."""
        if self.meter.name.startswith("emulated:"):
            return "emulated"
        return "estimated" if self.meter.estimated else "measured"

    def telemetry(self, decision, loss: float) -> None:
        s = self.stats
        point = [round(self.clock(), 3), s.steps, round(s.joules, 3), round(float(loss), 5)]
        s.timeline.append(point)
        if len(s.timeline) > self.cfg.timeline_points:
            del s.timeline[::2]  # halve the resolution, keep the whole run's span
        if not self.transport.connected:
            return
        values = {
            "step": s.steps, "loss": float(loss), "joules": float(s.joules),
            "energy_estimated": bool(self.meter.estimated), "meter": self.meter.name,
            "energy_kind": self.energy_kind, "board": self.cfg.board, "link": self.cfg.link,
            "parent": self.cfg.parent, "action": decision.action, "reason": decision.reason[:200],
            "steps_since_sync": int(decision.steps_since_sync), "base_version": self.base_version,
            "syncs": s.syncs, "outbox": len(self.outbox), "acked": self.uplink.acked,
            "rejected": self.uplink.rejected, "last_interval": s.intervals[-1] if s.intervals else 0,
            "last_reason": s.reasons[-1][:200] if s.reasons else "",
        }
        values.update({f"est_{k}": float(v) for k, v in decision.estimate.items()})
        self.transport.publish(self.topics.telemetry(self.cfg.device_id), encode_telemetry(values), qos=0)

    # -- main loop -------------------------------------------------------------------------
    def _read_joules(self) -> float:
        try:
            return self.meter.joules()
        except EnergyMeterError as e:
            log.warning("energy meter read failed (%s); counting this step as 0 J", e)
            return self._last_joules or 0.0

    @property
    def waiting_for_parent(self) -> bool:
        """Synchronous rounds: our update is out and the parent's next model is not in yet."""
        return self.uplink.waiting_for_parent

    def wait_for_model(self) -> None:
        deadline = self.clock() + self.cfg.wait_for_model_s
        while self.stats.models_adopted == 0 and self.clock() < deadline:
            self.drain_inbound(timeout=0.1)
            self.serve()

    def step(self) -> bool:
        """One training step and whatever the scheduler decides after it. Returns False, doing
        nothing, while a synchronous round waits for the parent's model."""
        self._on_connection_change()
        self.drain_inbound()
        self.serve()  # between two training steps: one inference batch at most
        if self.waiting_for_parent:
            self.flush_outbox()  # re-sends are still due while we wait
            return False
        ids, mask, labels = self.batches.next()
        j0 = self._read_joules() if self._last_joules is None else self._last_joules
        t0 = self.clock()
        loss = self.trainer.step(ids, mask, labels)
        seconds = self.clock() - t0
        j1 = self._read_joules()
        self._last_joules = j1
        joules = max(0.0, j1 - j0)
        self.stats.steps += 1
        self.stats.joules += joules
        self._cycle_losses.append(loss)
        self._cycle_joules += joules
        self.scheduler.set_battery_reserve(self.meter.reserve_fraction())
        decision = self.scheduler.observe(StepObservation(loss=loss, joules=joules, seconds=seconds, samples=len(labels)))
        synced = False
        if decision.sync and self.transport.publishing:
            # Our previous message is still on its way to the broker: a new update would only
            # queue behind it, and on a slow radio (an LTE-M update takes seconds, NB-IoT minutes)
            # a queue of updates arrives ever later until the parent refuses them as stale, wasting
            # the energy the link is expensive in. Postponing loses nothing: the cycle goes on and
            # the next sync carries everything trained meanwhile.
            self.stats.postponed += 1
            self.flush_outbox()
        elif decision.sync:
            s0, t_sync = self._read_joules(), self.clock()
            size = self.sync(decision.steps_since_sync)
            # A metered link (the emulated meter, a battery gauge) already counts the radio;
            # link_joules_per_mb adds it where the meter sees only the CPU.
            cost = max(0.0, self._read_joules() - s0) + self.cfg.link_joules_per_mb * size / 1e6
            self._last_joules = self._read_joules()
            self.scheduler.on_synced(cost_joules=cost, cost_seconds=self.clock() - t_sync)
            synced = True
            self.stats.reasons.append(decision.reason)
            log.info("sync #%d after %d steps (%s): %d bytes, loss %.4f",
                     self.stats.syncs, decision.steps_since_sync, decision.reason, size, loss)
            self._cycle_losses, self._cycle_joules = [], 0.0
        else:
            self.flush_outbox()
        # (not on a postponed sync: telemetry would only add to the link it waits for)
        if self.stats.steps % self.cfg.telemetry_every == 0 or synced:
            self.telemetry(decision, loss)
        if self.stats.steps % self.cfg.checkpoint_every == 0:
            self.save_state()
        return True

    def _on_connection_change(self) -> None:
        now = self.transport.connected
        if now and not self._was_connected:
            self.subscribe()
            self.announce()
            self.outbox.reset_timers()  # whatever was in flight may be lost: re-send promptly
        self._was_connected = now

    def run(self, should_stop: Callable[[], bool]) -> DeviceStats:
        self._on_connection_change()
        self.wait_for_model()
        try:
            while not should_stop():
                if self.parent_finished:
                    self.stats.stop_reason = "parent finished"
                    break
                if self.cfg.max_steps is not None and self.stats.steps >= self.cfg.max_steps:
                    self.stats.stop_reason = "max steps"
                    break
                if not self.step():
                    t0 = self.clock()
                    self.drain_inbound(timeout=0.1)  # a synchronous round: idle until the model comes
                    self.stats.waited_s += self.clock() - t0
            else:
                self.stats.stop_reason = "signal"
        finally:
            self.shutdown()
        return self.stats

    def summary(self) -> dict:
        s = self.stats
        return {
            "id": self.cfg.device_id, "parent": self.cfg.parent, "backend": self.trainer.backend,
            "stop_reason": s.stop_reason, "started_at": self.started_at,
            "steps": s.steps, "syncs": s.syncs, "acked": self.uplink.acked, "rejected": self.uplink.rejected,
            "outbox": len(self.outbox), "intervals": s.intervals[-500:], "reasons": s.reasons[-500:],
            "sync_times": s.sync_times[-500:],
            "joules": s.joules, "energy_estimated": self.meter.estimated, "energy_kind": self.energy_kind,
            "meter": self.meter.name, "board": self.cfg.board, "link": self.cfg.link, "timeline": s.timeline,
            "bytes_up": self.uplink.bytes_up, "bytes_down": s.bytes_down, "base_version": self.base_version,
            "waited_s": s.waited_s, "postponed": s.postponed, "ledger": self.uplink.ledger(),
            **({"serving": {**self.server.summary(), "joules": s.serve_joules}} if self.server is not None else {}),
        }

    def shutdown(self) -> None:
        self.save_state()
        if self.server is not None:
            self.server.close()  # queued requests are told, not left to time out
        if self.transport.connected:
            # Deliver what we can before leaving; the outbox keeps the rest for the next start.
            self.flush_outbox()
            self.drain_inbound(timeout=0.5)
            self.transport.publish(self.topics.status(self.cfg.device_id), self.presence("offline"), qos=1, retain=True)
            self.transport.flush(timeout=5.0)
