"""A virtual-time MQTT network: the simulator's transport.

Each participant gets a `SimTransport` (the same `Transport` interface paho implements), a link
profile and a clock. A publish at the sender's virtual time reaches each subscriber after
    sender latency + bytes / sender up-rate (queued behind earlier uploads on that link)
    + receiver latency + bytes / receiver down-rate (queued behind earlier downloads),
and costs each radio its joules per MB. Retained messages are kept like a broker keeps them.
One simplification, stated: a model (retained `down` topic) queued for a busy downlink is
replaced by a newer one on the same topic before it starts (a slow radio fetches the latest
model, not every version in between); updates and acks are never dropped.

Delivery is an event: the engine pops due deliveries in time order and hands each to its
receiver's queue, so nothing depends on this machine's speed.
"""
from __future__ import annotations

import heapq
import itertools
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable

from tomtit.sim.config import Link
from tomtit.transport import Inbound, Transport, Will, topic_matches


@dataclass
class Endpoint:
    name: str
    tier: str  # device | edge | cloud
    link: Link
    clock: Callable[[], float]
    on_link_joules: Callable[[float], None] = lambda j: None
    up_free_at: float = 0.0
    down_free_at: float = 0.0
    acked_free_at: float = 0.0  # when the last QoS>0 message will have left (what `publishing` reports)
    filters: dict[str, int] = field(default_factory=dict)
    queue: deque = field(default_factory=deque)
    online: bool = True
    will: Will | None = None


@dataclass(order=True)
class Delivery:
    t: float
    seq: int
    receiver: str = field(compare=False)
    topic: str = field(compare=False)
    payload: bytes = field(compare=False)
    retained: bool = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class SimNetwork:
    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.retained: dict[str, bytes] = {}
        self._heap: list[Delivery] = []
        self._seq = itertools.count()
        self._pending_model: dict[tuple[str, str], Delivery] = {}  # (receiver, topic) -> not yet started
        self.bytes = defaultdict(int)  # (tier, "up"|"down") -> bytes

    def attach(self, ep: Endpoint) -> "SimTransport":
        self.endpoints[ep.name] = ep
        return SimTransport(self, ep)

    # -- routing ---------------------------------------------------------------------------
    def publish(self, sender: Endpoint, topic: str, payload: bytes, retain: bool, qos: int = 1) -> None:
        now = sender.clock()
        n = len(payload)
        start = max(now, sender.up_free_at)
        sender.up_free_at = start + sender.link.up_s(n)
        if qos > 0:
            # like paho's unacknowledged publishes: telemetry (QoS 0) takes airtime but is not waited for
            sender.acked_free_at = sender.up_free_at + sender.link.latency_s
        sender.on_link_joules(sender.link.j_per_mb_up * n / 1e6)
        self.bytes[(sender.tier, "up")] += n
        at_broker = sender.up_free_at + sender.link.latency_s
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for ep in self.endpoints.values():
            if ep.online and any(topic_matches(f, topic) for f in ep.filters):
                self._schedule(ep, topic, payload, at_broker, retained=False, supersede=retain)

    def _schedule(self, ep: Endpoint, topic: str, payload: bytes, at_broker: float, *, retained: bool,
                  supersede: bool) -> None:
        key = (ep.name, topic)
        old = self._pending_model.get(key) if supersede else None
        n = len(payload)
        if old is not None and not old.cancelled and old.t - ep.link.down_s(len(old.payload)) > at_broker:
            # not started yet: the newer model takes its place on the link (same size, same slot)
            old.cancelled = True
            start = old.t - ep.link.down_s(len(old.payload)) - ep.link.latency_s
            t = start + ep.link.down_s(n) + ep.link.latency_s
            ep.down_free_at = max(ep.down_free_at, t - ep.link.latency_s)
        else:
            start = max(at_broker, ep.down_free_at)
            ep.down_free_at = start + ep.link.down_s(n)
            t = ep.down_free_at + ep.link.latency_s
        d = Delivery(t, next(self._seq), ep.name, topic, payload, retained)
        if supersede:
            self._pending_model[key] = d
        heapq.heappush(self._heap, d)

    def subscribe(self, ep: Endpoint, topic_filter: str, qos: int) -> None:
        ep.filters[topic_filter] = qos
        for topic, payload in list(self.retained.items()):
            if topic_matches(topic_filter, topic):
                self._schedule(ep, topic, payload, ep.clock() + ep.link.latency_s, retained=True, supersede=True)

    def drop(self, ep: Endpoint, send_will: bool) -> None:
        ep.online = False
        ep.filters.clear()
        ep.queue.clear()
        if send_will and ep.will is not None:
            self.publish(ep, ep.will.topic, ep.will.payload, ep.will.retain, ep.will.qos)

    # -- the engine's side -----------------------------------------------------------------
    def next_time(self) -> float | None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].t if self._heap else None

    def pop(self) -> Delivery | None:
        """The next delivery, handed to its receiver's queue (None if the receiver left)."""
        if self.next_time() is None:
            return None
        d = heapq.heappop(self._heap)
        ep = self.endpoints[d.receiver]
        if self._pending_model.get((d.receiver, d.topic)) is d:
            del self._pending_model[(d.receiver, d.topic)]
        if not ep.online:
            return None
        n = len(d.payload)
        ep.on_link_joules(ep.link.j_per_mb_down * n / 1e6)
        self.bytes[(ep.tier, "down")] += n
        ep.queue.append(Inbound(d.topic, d.payload, retain=d.retained, qos=1))
        return d


class SimTransport(Transport):
    def __init__(self, net: SimNetwork, ep: Endpoint) -> None:
        self.net, self.ep = net, ep

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        # the virtual network models MQTT 3.1.1: MQTT 5 properties are dropped
        if not self.ep.online:
            raise ConnectionError(f"{self.ep.name} is offline")
        self.net.publish(self.ep, topic, bytes(payload), retain, qos)

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.net.subscribe(self.ep, topic_filter, qos)

    def get(self, timeout: float | None = None) -> Inbound | None:
        # Virtual time: only what has been delivered by now is here; never blocks.
        return self.ep.queue.popleft() if self.ep.queue else None

    @property
    def connected(self) -> bool:
        return self.ep.online

    @property
    def publishing(self) -> bool:
        return self.ep.acked_free_at > self.ep.clock()  # a QoS 1 message has not reached the broker yet

    def flush(self, timeout: float = 5.0) -> bool:
        return True

    def close(self) -> None:
        if self.ep.online:
            self.net.drop(self.ep, send_will=False)

    def crash(self) -> None:
        """Vanish without a clean disconnect: the broker publishes the last will."""
        if self.ep.online:
            self.net.drop(self.ep, send_will=True)
