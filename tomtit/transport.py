"""The one small transport interface both tiers talk through, and its in-memory twin.

Agents and nodes see only `Transport`: publish, subscribe, a queue of `Inbound` messages, close.
`tomtit.mqtt.MqttTransport` implements it on paho-mqtt; `MemoryBroker` / `MemoryTransport` here
implement it in process for unit tests and the simulator, with MQTT's retained-message and
topic-filter semantics (`+` one level, `#` the rest).
"""
from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Inbound:
    """A received message, converted from the client library's type at the boundary."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 0
    # MQTT 5 request/response properties (None on 3.1.1, where the payload has to carry them)
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Transport(ABC):
    """Publish/subscribe with a thread-safe inbound queue. Context manager: `with t: ...`."""

    @abstractmethod
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        """`response_topic` / `correlation_data`: MQTT 5 properties, sent only where the
        connection speaks MQTT 5 (elsewhere dropped: the payload must carry what matters)."""

    @abstractmethod
    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None: ...

    _queue: "queue.Queue[Inbound]"  # filled by the implementation's receive path, through `_admit`
    _shed_rule: "_ShedRule | None" = None

    def get(self, timeout: float | None = None) -> Inbound | None:
        """Next inbound message, or None after `timeout` seconds (0 = do not wait)."""
        try:
            msg = self._queue.get_nowait() if timeout == 0 else self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if self._shed_rule is not None:
            self._shed_rule.taken(msg.topic)
        return msg

    def shed(self, topic_filter: str, *, max_bytes: int, max_pending: int) -> None:
        """Drop messages on `topic_filter` as they arrive, before they are queued: any larger than
        `max_bytes`, and any beyond `max_pending` of them already waiting. For traffic anyone may
        send and nobody loses by a drop (QoS 0 inference requests; a client retries on its
        timeout), never for models or acks: the inbound queue is otherwise unbounded, and a flood
        would hold its payloads in memory. Drops are counted in `shed_counts`. One rule."""
        self._shed_rule = _ShedRule(topic_filter, max_bytes, max_pending)

    @property
    def shed_counts(self) -> dict[str, int]:
        """Messages dropped on arrival by `shed`, by reason ("too_large", "flood")."""
        return dict(self._shed_rule.dropped) if self._shed_rule is not None else {}

    def _admit(self, topic: str, payload: bytes) -> bool:
        """Called by the receive path (any thread) before queueing: False to drop the message."""
        return self._shed_rule is None or self._shed_rule.admit(topic, len(payload))

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until published messages have left this process (True) or timeout (False)."""
        return True

    @property
    def publishing(self) -> bool:
        """A QoS>0 message is still on its way to the broker (not yet PUBACKed): the link is busy.
        Senders postpone a new update meanwhile instead of queueing it behind the last one."""
        return False

    @abstractmethod
    def close(self) -> None:
        """Disconnect cleanly (no last will). Idempotent."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ShedRule:
    """`Transport.shed`'s bookkeeping: the matching messages waiting in the queue, and the drops.
    admit() runs on the receive thread, taken() on the reader's: both under one lock."""

    def __init__(self, topic_filter: str, max_bytes: int, max_pending: int) -> None:
        if max_bytes < 1 or max_pending < 1:
            raise ValueError("shed limits must be positive")
        self.topic_filter, self.max_bytes, self.max_pending = topic_filter, max_bytes, max_pending
        self.pending = 0
        self.dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, topic: str, size: int) -> bool:
        if not topic_matches(self.topic_filter, topic):
            return True
        with self._lock:
            reason = "too_large" if size > self.max_bytes else "flood" if self.pending >= self.max_pending else ""
            if reason:
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
                return False
            self.pending += 1
            return True

    def taken(self, topic: str) -> None:
        if topic_matches(self.topic_filter, topic):
            with self._lock:
                self.pending = max(0, self.pending - 1)


def topic_matches(topic_filter: str, topic: str) -> bool:
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts) or (f != "+" and f != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


@dataclass
class MemoryBroker:
    """A process-local broker: retained messages, wildcard subscriptions, last wills."""

    retained: dict[str, bytes] = field(default_factory=dict)
    _clients: list["MemoryTransport"] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    published: int = 0

    def client(self, client_id: str, will: Will | None = None) -> "MemoryTransport":
        t = MemoryTransport(self, client_id, will)
        with self._lock:
            self._clients.append(t)
        return t

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool, response_topic: str | None = None,
               correlation_data: bytes | None = None) -> None:
        with self._lock:
            self.published += 1
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)  # MQTT: an empty retained payload clears it
            clients = list(self._clients)
        for c in clients:
            c._deliver(topic, payload, qos, retain=False, response_topic=response_topic,
                       correlation_data=correlation_data)

    def _drop(self, client: "MemoryTransport", *, send_will: bool) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        if send_will and client.will is not None:
            self._route(client.will.topic, client.will.payload, client.will.qos, client.will.retain)


class MemoryTransport(Transport):
    def __init__(self, broker: MemoryBroker, client_id: str, will: Will | None = None):
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self._filters: dict[str, int] = {}
        self._queue: queue.Queue[Inbound] = queue.Queue()
        self._open = True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        """Carries MQTT 5's request/response properties, as a broker does between v5 clients."""
        if not self._open:
            raise ConnectionError(f"{self.client_id} is closed")
        self.broker._route(topic, bytes(payload), qos, retain, response_topic, correlation_data)

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self._filters[topic_filter] = qos
        for topic, payload in list(self.broker.retained.items()):
            if topic_matches(topic_filter, topic) and self._admit(topic, payload):
                self._queue.put(Inbound(topic, payload, retain=True, qos=qos))

    def _deliver(self, topic: str, payload: bytes, qos: int, retain: bool, response_topic: str | None = None,
                 correlation_data: bytes | None = None) -> None:
        for f, sub_qos in self._filters.items():
            if topic_matches(f, topic):
                if not self._admit(topic, payload):
                    return
                self._queue.put(Inbound(topic, payload, retain=retain, qos=min(qos, sub_qos),
                                        response_topic=response_topic, correlation_data=correlation_data))
                return

    @property
    def connected(self) -> bool:
        return self._open

    def crash(self) -> None:
        """Vanish without a clean disconnect: the broker publishes the last will."""
        if self._open:
            self._open = False
            self.broker._drop(self, send_will=True)

    def close(self) -> None:
        if self._open:
            self._open = False
            self.broker._drop(self, send_will=False)
