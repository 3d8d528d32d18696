"""The monitor's loop: messages from a transport into the fleet state, a renderer ticked on time.

Single-threaded on purpose: the paho thread only enqueues (tomtit.mqtt), and this loop both folds
and draws, so the state is never read while it changes.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from tomtit.monitor.rows import Session
from tomtit.monitor.state import FleetState
from tomtit.transport import Transport
from tomtit.wire import Topics

MAX_BURST = 1000  # messages folded between two looks at the clock: a burst must not freeze the screen


class Sink(Protocol):
    def tick(self, session: Session, state: FleetState, now: float) -> None: ...


def subscribe(transport: Transport, job: str) -> None:
    """Read-only, and only what the deployment's monitor ACL grants: presence and telemetry."""
    topics = Topics(job)
    transport.subscribe(topics.status_filter(), qos=1)  # retained: the whole fleet at once on connect
    transport.subscribe(topics.telemetry_filter(), qos=0)  # published at QoS 0; more would not help


def link(transport: Transport, last_error: Callable[[], str | None] = lambda: None) -> str:
    if transport.connected:
        return "connected"
    return last_error() or "connecting"


def watch(transport: Transport, state: FleetState, sink: Sink, *, broker: str, should_stop: Callable[[], bool],
          tick_s: float, duration_s: float | None = None, clock: Callable[[], float] = time.time,
          last_error: Callable[[], str | None] = lambda: None) -> Session:
    """Fold messages until `should_stop()` or `duration_s` has passed, ticking `sink` every
    `tick_s` seconds and once more at the end. `last_error` says why the broker refused us (the
    MQTT transport knows; the in-memory one never is refused). Returns the last session facts
    (for the caller's final words: e.g. never connected)."""
    started = clock()
    until = None if duration_s is None else started + duration_s
    next_tick = started  # draw at once: the header shows before the first message arrives
    while not should_stop():
        now = clock()
        if until is not None and now >= until:
            break
        if now >= next_tick:
            sink.tick(Session(broker, state.job, started, link(transport, last_error)), state, now)
            next_tick = now + tick_s
        wait = max(0.0, min(next_tick, until if until is not None else next_tick) - now)
        msg, folded = transport.get(min(wait, 0.2)), 0  # 0.2 s: a stop request is noticed this fast
        while msg is not None:
            state.apply(msg.topic, msg.payload, clock())
            folded += 1
            if folded >= MAX_BURST:
                break
            msg = transport.get(0)
    session = Session(broker, state.job, started, link(transport, last_error))
    sink.tick(session, state, clock())
    return session
