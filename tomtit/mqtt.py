"""`Transport` on paho-mqtt 2.x: persistent session, last will, reconnect with backoff.

The paho network thread does only what cannot wait: it converts each message to `Inbound` and
enqueues it (or drops it there, as `Transport.shed` asks: an oversize or flooding request never
takes memory in the queue), and records connection state. Decoding, validation and all work
happen on the caller's thread. Works on MQTT 3.1.1 (the default: amqtt and many IoT brokers
speak only that) and 5.
"""
from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from tomtit.errors import TomtitError
from tomtit.transport import Inbound, Transport, Will

log = logging.getLogger("tomtit.mqtt")


class BrokerConfigError(TomtitError, ValueError):
    """A broker URL or connection option is malformed."""


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerUrl:
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise BrokerConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parsed.hostname:
        raise BrokerConfigError(f"broker URL {url!r} has no host")
    tls = parsed.scheme in ("mqtts", "ssl")
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise BrokerConfigError(f"broker URL {url!r} has a bad port") from None
    return BrokerUrl(parsed.hostname, port, tls)


@dataclass(frozen=True)
class MqttOptions:
    url: str  # mqtt://host:port or mqtts://host:port
    client_id: str  # stable across restarts: the broker keeps the persistent session under it
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None  # CA bundle for mqtts:// (system default when None)
    tls_cert: str | None = None  # client certificate, for brokers that require mutual TLS
    tls_key: str | None = None
    protocol: str = "3.1.1"  # "3.1.1" or "5"; 3.1.1 is what every broker we target speaks
    keepalive_s: int = 30  # how fast the broker notices a dead device and publishes its will
    persistent: bool = True  # broker queues QoS 1 messages for us while we are offline
    reconnect_min_s: int = 1  # backoff after a failed connect, doubling up to reconnect_max_s
    reconnect_max_s: int = 30
    # QoS 1 publishes on the wire at once; the rest wait in paho's queue, which it rescans on every
    # PUBACK (O(queue) each): a client publishing thousands at once should raise it.
    max_inflight: int = 20


_CONNACK_HINTS = {
    4: "bad user name or password (check --username/--password)",
    5: "not authorised (check credentials and the broker's ACL)",
    134: "bad user name or password (check --username/--password)",
    135: "not authorised (check credentials and the broker's ACL)",
}


class MqttTransport(Transport):
    def __init__(self, options: MqttOptions, will: Will | None = None):
        self.options = options
        self.url = parse_broker_url(options.url)
        self._will = will
        self._queue: queue.Queue[Inbound] = queue.Queue()
        self._filters: dict[str, int] = {}
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._last_error: str | None = None
        self._client = None
        self._unacked: list = []  # MQTTMessageInfo of QoS>0 publishes not yet PUBACKed
        self.session_present = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "MqttTransport":
        """Begin connecting in the background; returns at once (use wait_connected to block)."""
        import paho.mqtt.client as paho

        o = self.options
        v5 = o.protocol == "5"
        if o.protocol not in ("3.1.1", "5"):
            raise BrokerConfigError(f"protocol must be 3.1.1 or 5, not {o.protocol!r}")
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            clean_session=None if v5 else not o.persistent,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        )
        client.enable_logger(logging.getLogger("tomtit.mqtt.paho"))
        client.max_queued_messages_set(0)  # unbounded in memory; the outbox bounds what matters
        client.max_inflight_messages_set(o.max_inflight)
        client.reconnect_delay_set(o.reconnect_min_s, o.reconnect_max_s)
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if self.url.tls:
            client.tls_set(ca_certs=o.tls_ca, certfile=o.tls_cert, keyfile=o.tls_key,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        kwargs = {}
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 7 * 24 * 3600 if o.persistent else 0
            kwargs = {"clean_start": not o.persistent, "properties": props}
        self._client = client
        client.connect_async(self.url.host, self.url.port, keepalive=o.keepalive_s, **kwargs)
        client.loop_start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        # paho's network thread logs "Client is not connected" at ERROR while it winds down.
        client.disable_logger()
        try:
            client.disconnect()  # a clean DISCONNECT: the broker does not publish our will
        finally:
            client.loop_stop()
            self._connected.clear()

    # -- paho callbacks (network thread: convert, enqueue, record; nothing else) -----------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            value = getattr(reason_code, "value", None)
            hint = _CONNACK_HINTS.get(value, str(reason_code))
            msg = f"broker {self.url} refused the connection: {hint}"
            if msg != self._last_error:
                log.error(msg)
            self._last_error = msg
            return
        self.session_present = bool(getattr(flags, "session_present", False))
        self._last_error = None
        log.info("connected to %s (session present: %s)", self.url, self.session_present)
        with self._lock:
            filters = dict(self._filters)
        for f, qos in filters.items():  # harmless with a persistent session, needed without one
            client.subscribe(f, qos)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        was = self._connected.is_set()
        self._connected.clear()
        if was and self._client is not None:
            log.warning("lost connection to %s (%s); reconnecting with backoff", self.url, reason_code)

    def _on_message(self, client, userdata, message):
        props = message.properties if self.options.protocol == "5" else None  # v5 only
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if not self._admit(message.topic, message.payload):
            return  # shed (Transport.shed): too large, or a flood; counted, never queued
        self._queue.put(Inbound(message.topic, bytes(message.payload), bool(message.retain), int(message.qos),
                                response_topic=response_topic or None,
                                correlation_data=bytes(correlation) if correlation is not None else None))

    # -- Transport -------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        if self._client is None:
            raise ConnectionError("transport is not started")
        properties = None
        if self.options.protocol == "5" and (response_topic is not None or correlation_data is not None):
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
        # While disconnected paho queues the message and sends it after reconnecting; callers
        # that must not lose it keep their own copy (the outbox) until an end-to-end ack.
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0:
            self._unacked.append(info)
            if len(self._unacked) > 256:  # prune now and then, not on every publish (O(n^2) otherwise)
                self._unacked = [i for i in self._unacked if _pending(i)]

    @property
    def publishing(self) -> bool:
        self._unacked = [i for i in self._unacked if _pending(i)]
        return bool(self._unacked)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the broker has acknowledged every QoS>0 publish (e.g. before closing)."""
        deadline = time.monotonic() + timeout
        while any(_pending(i) for i in self._unacked):
            if time.monotonic() > deadline or not self.connected:
                return False
            time.sleep(0.01)
        self._unacked = []
        return True

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        with self._lock:
            self._filters[topic_filter] = qos
        if self._client is not None and self._connected.is_set():
            self._client.subscribe(topic_filter, qos)


def _pending(info) -> bool:
    """A QoS>0 publish still waiting for its PUBACK. paho's `is_published` raises for a message
    published while disconnected (its return code stays NO_CONN even after paho re-sends it on
    reconnect): such a message cannot be tracked, so it no longer counts as pending; the outbox
    re-sends what matters until the node's ack."""
    try:
        return not info.is_published()
    except (RuntimeError, ValueError):
        return False
