"""The discrete-event simulation: the real device agent, node core, schedulers and aggregation,
driven in virtual time.

What is real: every training step (the bundle's portable step on this CPU, each simulated device
with its own adapter and Adam state on ONE shared ORT session), every message (encoded, sent,
validated, decoded), every aggregation, every scheduler decision, every evaluation of a global
model (the cloud's `EvaluateAndStop` observer on held-out data).
What is virtual: time and energy. A step takes its board's step time; a message takes its bytes
over the links (`tomtit.sim.network`); energy = busy W x step time + idle W x waiting time +
link J/MB x bytes (`EmulatedMeter`). So results do not depend on this machine's load.

Events, in virtual-time order: a device finishes a step (and runs whatever its scheduler
decides), a message arrives (a node handles it at once: edges and the cloud are servers), a
node's buffer timer fires, a scenario event (leave, join, battery, link).
"""
from __future__ import annotations

import heapq
import itertools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.agent import DeviceAgent, DeviceConfig
from device_runtime.energy import EmulatedMeter
from device_runtime.local_data import BatchStream, EncodedData
from device_runtime.scheduler import make_scheduler
from device_runtime.trainer import PortableBackend, Trainer, TrainerConfig
from edge_broker.aggregation import make_strategy
from edge_broker.node import Node, NodeConfig
from edge_broker.observers import EvaluateAndStop, Evaluator, ModelObserver
from tomtit.sim.config import Board, Link, Profiles, Scenario, poison_factor
from tomtit.sim.network import Endpoint, SimNetwork
from tomtit.transport import Will
from tomtit.wire import Presence, Topics, encode_presence

JOB = "sim"


@dataclass(frozen=True)
class Setting:
    """One way to run the federation: a method and its knobs."""

    method: str  # fedavg | hierfavg | adaptive | async-fixed | ours
    label: str  # human name with its knobs
    flat: bool  # devices talk to the cloud directly (no edges)
    synchronous: bool  # rounds: senders wait for the parent's next model; nodes wait for all children
    device_scheduler: str
    edge_scheduler: str | None = None  # hierarchical only


class VirtualClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class _PacedEvaluation(ModelObserver):
    """The cloud's `EvaluateAndStop`, scoring at most one global model per `every_s` virtual s.

    A model that comes sooner is held (a newer one replaces it) and scored when its turn comes,
    stamped with its *own* publish time and the device energy spent by then, so a method is never
    credited later than it earned, only with a resolution of `every_s`. The same rule for every
    method. The run loop asks `due()` when to come back and calls `flush()` then.
    """

    def __init__(self, inner: EvaluateAndStop, every_s: float, device_energy) -> None:
        self.inner, self.every_s, self.device_energy = inner, every_s, device_energy
        self.energy_at: list[float] = []  # device joules when each scored model was published
        self._last_t: float | None = None
        self._held: tuple[int, np.ndarray, float, float] | None = None

    def on_model(self, version: int, model: np.ndarray, elapsed_s: float) -> str | None:
        energy = self.device_energy()
        if self._last_t is None or elapsed_s - self._last_t >= self.every_s:
            self._held = None
            return self._score(version, model, elapsed_s, energy)
        self._held = (version, model.copy(), elapsed_s, energy)
        return None

    def due(self) -> float | None:
        return None if self._held is None or self._last_t is None else self._last_t + self.every_s

    def flush(self) -> str | None:
        if self._held is None:
            return None
        held, self._held = self._held, None
        return self._score(*held)

    def _score(self, version: int, model: np.ndarray, t: float, energy: float) -> str | None:
        before = len(self.inner.history)
        reason = self.inner.on_model(version, model, t)
        if len(self.inner.history) > before:
            self.energy_at.append(round(energy, 3))
            self._last_t = max(t, self._last_t or 0.0)
        return reason

    def telemetry(self) -> dict[str, Any]:
        return self.inner.telemetry()

    def summary(self) -> dict[str, Any]:
        return self.inner.summary()


class _SimTrainer(Trainer):
    """A real trainer whose step takes the board's virtual time and busy energy."""

    backend = "portable (simulated board)"

    def __init__(self, inner: PortableBackend, clock: VirtualClock, meter: EmulatedMeter, step_s: float,
                 counter: list[int]) -> None:
        self.inner, self.clock, self.meter, self.step_s, self.counter = inner, clock, meter, step_s, counter

    def step(self, input_ids, attention_mask, labels) -> float:
        loss = self.inner.step(input_ids, attention_mask, labels)
        self.clock.t += self.step_s
        self.meter.add_busy(self.step_s)
        self.counter[0] += 1
        return loss

    def get_adapter(self) -> np.ndarray:
        return self.inner.get_adapter()

    def set_adapter(self, buffer: np.ndarray) -> None:
        self.inner.set_adapter(buffer)

    def set_learning_rate(self, lr: float) -> None:
        self.inner.set_learning_rate(lr)


@dataclass
class World:
    """What every run of one worker shares: the bundle, one ORT session, the encoded data."""

    bundle: Any
    base_trainer: PortableBackend  # owns the shared session
    data: EncodedData
    label_ids: np.ndarray
    test_idx: np.ndarray  # held out, fixed across seeds and scenarios
    train_idx: np.ndarray
    evaluator: Evaluator

    def trainer(self, lr: float) -> PortableBackend:
        return PortableBackend(self.bundle, TrainerConfig(threads=1, learning_rate=lr, memory="fast"),
                               share_session_of=self.base_trainer)

    def subset(self, idx: np.ndarray) -> EncodedData:
        return EncodedData(self.data.input_ids[idx], self.data.attention_mask[idx], self.data.labels[idx])


@dataclass
class _Device:
    i: int
    name: str
    board: Board
    endpoint: Endpoint
    clock: VirtualClock
    meter: EmulatedMeter
    agent: DeviceAgent | None = None
    gone: bool = False
    idle_since: float | None = None  # waiting (synchronous round) since
    step_scheduled: bool = False
    poison: float | None = None  # a poisoned device sends this factor x its true update


def run_setting(world: World, sc: Scenario, profiles: Profiles, setting: Setting, seed: int, shards: list[np.ndarray],
                target: float | None, *, trace: bool = False) -> dict[str, Any]:
    """One simulated run until the cloud reaches `target` (or a budget runs out)."""
    tmp = Path(tempfile.mkdtemp(prefix="tomtit-sim-", dir=_state_root()))
    try:
        return _Run(world, sc, profiles, setting, seed, shards, target, tmp, trace).go()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _state_root() -> str | None:
    shm = Path("/dev/shm")  # outboxes and checkpoints fsync: on tmpfs that costs nothing
    return str(shm) if shm.is_dir() else None


class _Run:
    def __init__(self, world: World, sc: Scenario, profiles: Profiles, setting: Setting, seed: int,
                 shards: list[np.ndarray], target: float | None, tmp: Path, trace: bool) -> None:
        self.w, self.sc, self.p, self.s, self.seed, self.tmp = world, sc, profiles, setting, seed, tmp
        self.trace = trace
        self.net = SimNetwork()
        self.topics = Topics(JOB)
        self.events: list[tuple[float, int, str, str, Any]] = []
        self.seq = itertools.count()
        self.real_steps = [0]
        self.shards = shards
        self.nodes: dict[str, tuple[Node, VirtualClock, EmulatedMeter | None, Board | None]] = {}
        self.parent_of: dict[str, str] = {}
        n_edges = 0 if setting.flat else sc.edges
        # Devices with a join event start absent. A synchronous node waits for the children that
        # are there (a deployment's expected count), not for one that has not joined yet.
        joiners = {ev.device for ev in sc.events if ev.kind == "join"}
        present = [i for i, d in enumerate(sc.device_ids()) if d not in joiners]
        children = {"cloud": sc.edges if not setting.flat else len(present)}
        self.target = target
        self.now = 0.0  # the virtual time of the event being handled
        self.observer = EvaluateAndStop(world.evaluator, target)
        self.paced = _PacedEvaluation(self.observer, sc.eval_every_s, self._device_energy)
        self._eval_due: float | None = None  # the pending "eval" event's time
        self.devices: dict[str, _Device] = {}
        self._timers: dict[str, float] = {}  # node -> the deadline its pending timer event is for
        self._add_node("cloud", None, children["cloud"], profiles.links[sc.edge_link], observer=self.paced)
        for e in range(n_edges):
            kids = max(1, sum(1 for i in present if sc.edge_of(i) == e))
            self._add_node(f"e{e}", "cloud", kids, profiles.links[sc.edge_link])

        for i, name in enumerate(sc.device_ids()):
            board, link = sc.board_of(i, profiles), sc.link_of(i, profiles)
            clock = VirtualClock()
            meter = EmulatedMeter(board.name, busy_watts=board.busy_w, idle_watts=board.idle_w)
            ep = Endpoint(name, "device", link, clock, on_link_joules=meter.add_link)
            dev = _Device(i, name, board, ep, clock, meter)
            self.devices[name] = dev
            self.parent_of[name] = "cloud" if setting.flat else f"e{sc.edge_of(i)}"
            if name in joiners:
                dev.gone = True  # absent until its join event
            else:
                self._start_device(dev, 0.0)
        for ev in sc.events:
            self._push(ev.t, "event", ev.device, ev)

    # -- building --------------------------------------------------------------------------
    def _add_node(self, name: str, parent: str | None, children: int, link: Link, observer=None) -> None:
        s = self.s
        clock = VirtualClock()
        board = self.p.boards.get("edge-server")
        meter = EmulatedMeter("edge-server", busy_watts=board.busy_w, idle_watts=board.idle_w) if parent else None
        ep = Endpoint(name, "cloud" if parent is None else "edge", link, clock,
                      on_link_joules=meter.add_link if meter else (lambda j: None))
        will = Will(self.topics.status(name), encode_presence(Presence(id=name, state="offline", role="node",
                                                                       version=0, ts=0.0)))
        ep.will = will
        transport = self.net.attach(ep)
        if s.synchronous:
            # rounds: wait for every child; a child that left (last will) lowers K (Node.effective_ready)
            buffer = make_strategy("fedavg", expected_children=children, max_wait_s=1e9, max_staleness=2)
        else:
            # the scenario's strategy where devices' updates are aggregated (poisoning enters there);
            # a cloud over edges keeps fedbuff (a robust statistic over 2-5 edges protects little)
            devices_below = parent is not None or s.flat
            clip = {"clip_norm": self.sc.clip_norm} if devices_below and self.sc.clip_norm is not None else {}
            buffer = make_strategy(self.sc.strategy if devices_below else "fedbuff", expected_children=children, **clip)
        scheduler = make_scheduler(s.edge_scheduler) if parent else None
        node = Node(NodeConfig(node_id=name, parent=parent, job=JOB, resend_after_s=1e9, link_joules_per_mb=0.0,
                               wait_for_parent=s.synchronous, telemetry_every_s=1e9),
                    manifest=self.w.bundle.manifest, initial_adapter=self.w.base_trainer.get_adapter(),
                    buffer=buffer, transport=transport, state_dir=self.tmp / name, scheduler=scheduler,
                    observers=(observer,) if observer else (), meter=meter, clock=clock)
        self.nodes[name] = (node, clock, meter, board if parent else None)
        node.start()
        self._after_node(name)

    def _start_device(self, dev: _Device, t: float) -> None:
        sc, s = self.sc, self.s
        dev.clock.t = t
        dev.gone = False
        dev.endpoint.online = True
        dev.endpoint.will = Will(self.topics.status(dev.name), encode_presence(
            Presence(id=dev.name, state="offline", role="device", version=0, ts=0.0)))
        transport = self.net.attach(dev.endpoint)
        shard = self.shards[dev.i]
        trainer = _SimTrainer(self.w.trainer(sc.lr), dev.clock, dev.meter,
                              sc.reference_step_s * dev.board.step_factor, self.real_steps)
        dev.agent = DeviceAgent(
            DeviceConfig(device_id=dev.name, parent=self.parent_of[dev.name], job=JOB, codec="f16",
                         resend_after_s=1e9, link_joules_per_mb=0.0, wait_for_model_s=0.0,
                         checkpoint_every=10**9, wait_for_parent=s.synchronous),
            manifest=self.w.bundle.manifest, trainer=trainer,
            batches=BatchStream(self.w.subset(shard), sc.batch, seed=self.seed * 1000 + dev.i),
            num_samples=len(shard), meter=dev.meter, scheduler=make_scheduler(s.device_scheduler),
            transport=transport, state_dir=self.tmp / dev.name, clock=dev.clock)
        if dev.poison is not None:
            self._poison(dev)
        dev.agent._on_connection_change()  # subscribe: the retained model arrives after the link's delay
        dev.idle_since = t  # idle until the first model is in
        dev.step_scheduled = False

    @staticmethod
    def _poison(dev: "_Device") -> None:
        """A device with valid credentials that sends factor x its true update (an attack on the
        aggregation, not on the wire: every message is well-formed)."""
        uplink = dev.agent.uplink
        send = type(uplink).send.__get__(uplink)

        def poisoned_send(local, **kw):
            ref = uplink.reference.copy()
            true = np.asarray(local, np.float32) - ref
            size = send(ref + np.float32(dev.poison) * true, **kw)
            uplink.reference = ref + true  # its own bookkeeping stays honest: it attacks every update alike
            return size

        uplink.send = poisoned_send

    def _push(self, t: float, kind: str, who: str, data: Any = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, who, data))

    # -- the loop --------------------------------------------------------------------------
    def go(self) -> dict[str, Any]:
        sc = self.sc
        cloud = self.nodes["cloud"][0]
        stop_reason = ""
        now = 0.0
        while True:
            t_net = self.net.next_time()
            t_ev = self.events[0][0] if self.events else None
            if t_net is None and t_ev is None:
                stop_reason = "nothing left to do"
                break
            now = min(t for t in (t_net, t_ev) if t is not None)
            if now > sc.max_virtual_s:
                stop_reason = f"virtual time budget {sc.max_virtual_s:g} s"
                now = sc.max_virtual_s
                break
            if self.real_steps[0] >= sc.max_device_steps:
                stop_reason = f"compute budget {sc.max_device_steps} steps"
                break
            if t_net is not None and (t_ev is None or t_net <= t_ev):
                d = self.net.pop()
                if d is not None:
                    self._on_delivery(d.receiver, d.t)
            else:
                t, _, kind, who, data = heapq.heappop(self.events)
                if kind == "step":
                    self._on_step(who, t)
                elif kind == "timer":
                    self._run_node(who, t)
                elif kind == "eval":
                    self.now = t
                    if self._eval_due is not None and t >= self._eval_due:
                        self._eval_due = None
                        reason = self.paced.flush()
                        if reason:
                            stop_reason = reason
                            break
                        self._schedule_eval()
                else:
                    self._on_event(data, t)
            if cloud.finished:
                stop_reason = cloud.stats.stop_reason
                break
        if not self._reached():
            self.paced.flush()  # a model held for its turn is scored: it was published in time
        return self._result(now, stop_reason)

    def _schedule_eval(self) -> None:
        due = self.paced.due()
        if due is not None and self._eval_due != due:
            self._eval_due = due
            self._push(due, "eval", "cloud")

    def _device_energy(self) -> float:
        """Device joules by now, counting the idle time of devices waiting right now."""
        total = 0.0
        for d in self.devices.values():
            total += d.meter.joules()
            if d.idle_since is not None and not d.gone:
                total += max(0.0, self.now - d.idle_since) * d.meter.idle_watts
        return total

    def _reached(self) -> dict | None:
        """The first scored model at the target, if any (its publish time is the time to target)."""
        if self.target is None:
            return None
        return next((h for h in self.observer.history if h["accuracy"] >= self.target), None)

    def _on_delivery(self, who: str, t: float) -> None:
        if who in self.nodes:
            self._run_node(who, t)
            return
        dev = self.devices[who]
        if dev.gone or dev.step_scheduled:
            return  # a device reads its messages between steps
        # idle (waiting for a model): wake up and look
        self._idle_until(dev, t)
        dev.clock.t = t
        self._push(t, "step", who)
        dev.step_scheduled = True

    def _idle_until(self, dev: _Device, t: float) -> None:
        if dev.idle_since is not None:
            dev.meter.add_idle(t - dev.idle_since)
            dev.agent.stats.waited_s += t - dev.idle_since
            dev.idle_since = None

    def _on_step(self, who: str, t: float) -> None:
        dev = self.devices[who]
        dev.step_scheduled = False
        if dev.gone:
            return
        dev.clock.t = max(dev.clock.t, t)
        agent = dev.agent
        if agent.stats.models_adopted == 0:
            agent.drain_inbound()
            if agent.stats.models_adopted == 0:
                dev.idle_since = dev.clock.t  # no model yet: wait for the retained one
                return
        if agent.step():
            self._push(dev.clock.t, "step", who)
            dev.step_scheduled = True
        else:
            dev.idle_since = dev.clock.t  # a synchronous round: wait for the parent's model

    def _run_node(self, name: str, t: float) -> None:
        node, clock, meter, board = self.nodes[name]
        clock.t = max(clock.t, t)
        before = node.stats.accepted
        self.now = clock.t
        node.run_once(timeout=0)
        if name == "cloud":
            self._schedule_eval()
        if meter is not None and board is not None:
            meter.add_busy(board.agg_s_per_update * (node.stats.accepted - before))
        self._after_node(name)

    def _after_node(self, name: str) -> None:
        node = self.nodes[name][0]
        t = node.next_timer()
        if t is not None and self._timers.get(name) != t:  # one pending timer per deadline
            self._timers[name] = t
            self._push(t, "timer", name)

    def _on_event(self, ev, t: float) -> None:
        dev = self.devices[ev.device]
        if ev.kind == "leave":
            if not dev.gone and dev.agent is not None:
                self._idle_until(dev, t)
                dev.clock.t = max(dev.clock.t, t)
                dev.agent.transport.crash()  # the broker publishes its last will: the edge stops waiting for it
                dev.gone = True
        elif ev.kind == "join":
            if dev.gone:
                self._start_device(dev, t)
        elif ev.kind == "battery":
            dev.meter.reserve = float(ev.value)
        elif ev.kind == "link":
            dev.endpoint.link = self.p.links[str(ev.value)]
        elif ev.kind == "poison":
            dev.poison = poison_factor(ev.value)
            if dev.agent is not None:
                self._poison(dev)

    # -- results ---------------------------------------------------------------------------
    def _result(self, t_end: float, stop_reason: str) -> dict[str, Any]:
        hist = self.observer.history
        first = self._reached()
        reached = first is not None
        devices = []
        for dev in self.devices.values():
            if dev.idle_since is not None and not dev.gone and dev.agent is not None:
                self._idle_until(dev, max(t_end, dev.idle_since))
            a = dev.agent
            st = a.stats if a else None
            devices.append({
                "id": dev.name, "board": dev.board.name, "link": dev.endpoint.link.name,
                "edge": self.parent_of[dev.name], "steps": st.steps if st else 0, "syncs": st.syncs if st else 0,
                "intervals": list(st.intervals) if st else [], "sync_times": [round(x, 3) for x in st.sync_times] if st else [],
                "reasons": list(st.reasons) if (st and self.trace) else [],
                "mean_interval": float(np.mean(st.intervals)) if st and st.intervals else None,
                "joules": round(dev.meter.joules(), 3), "busy_j": round(dev.meter.busy_j, 3),
                "idle_j": round(dev.meter.idle_j, 3), "link_j": round(dev.meter.link_j, 3),
                "waited_s": round(st.waited_s, 3) if st else 0.0, "postponed": st.postponed if st else 0,
            })
        edges = [{"id": n, "pushes": node.stats.pushes_up, "push_times": node.stats.push_times,
                  "aggregations": node.stats.aggregations, "joules": round(m.joules(), 3) if m else 0.0,
                  "rejected": dict(node.stats.rejected)}
                 for n, (node, _, m, _) in self.nodes.items() if n != "cloud"]
        rejected = {n: dict(node.stats.rejected) for n, (node, _, _, _) in self.nodes.items() if node.stats.rejected}
        nb = self.net.bytes
        return {
            "method": self.s.method, "setting": self.s.label, "seed": self.seed, "reached": reached,
            "time_to_target_s": first["t"] if first else None,
            # to the target: when the first model at the target was published; else the whole run
            "device_energy_j": (self.paced.energy_at[hist.index(first)] if first
                                else round(sum(d["joules"] for d in devices), 3)),
            "end_s": round(t_end, 3), "stop_reason": stop_reason,
            "final_accuracy": hist[-1]["accuracy"] if hist else None,
            "best_accuracy": max((h["accuracy"] for h in hist), default=None),
            "accuracy": [{"t": h["t"], "version": h["version"], "accuracy": round(h["accuracy"], 4), "device_j": e}
                         for h, e in zip(hist, self.paced.energy_at)],
            "bytes": {"device_up": nb[("device", "up")], "device_down": nb[("device", "down")],
                      "edge_up": nb[("edge", "up")], "edge_down": nb[("edge", "down")],
                      "cloud_up": nb[("cloud", "up")], "cloud_down": nb[("cloud", "down")]},
            "syncs": sum(d["syncs"] for d in devices), "real_steps": self.real_steps[0],
            "global_versions": self.nodes["cloud"][0].version, "devices": devices, "edges": edges,
            "rejected": rejected,  # node -> reason -> count (e.g. stale pushes a baseline wasted)
        }
