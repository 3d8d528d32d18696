"""An emulated board: this machine's CPU plays a Raspberry Pi, a Jetson or a mini-PC in real time.

`tomtit device run --board pi4 --link lte-m` (and `tomtit demo --profiles ...`) wrap the real
trainer, transport and meter of a device so that, seen from the federation, it behaves like that
board on that link:

- every real training step is padded with sleep to the board's step time
  (`step_factor x reference step`, `tomtit/profiles.toml`); a step this machine cannot finish in
  time is counted as a pace miss (the board would have been faster than its emulation);
- every message the device sends waits for the link's airtime (latency + bytes / rate), in order,
  on a sender thread, while training goes on, as a radio would; `publishing` stays true meanwhile,
  so the agent postpones a sync instead of queueing updates behind a slow radio;
- energy is the profile's busy watts x step time + idle watts x the rest of the wall time + the
  link's joules per MB sent and received, labelled `emulated:BOARD` (and `estimated`): a model
  of another machine, never passed off as a measurement.

`slowdown` F stretches all of it: a step takes F x the board's time here, airtime F x the link's,
and the meter converts wall time back to board time (idle = idle watts x wall / F). It is how a
shared machine plays boards faster than it is: the demo runs 4 devices and 3 nodes on 2 cores,
where one MiniLM step takes ~0.3 s, slower than an Orin's 0.13 s; at F = 3 every board is
emulated faithfully, only the clock runs 3x slower. A step that still does not fit is counted as a
pace miss (`pace_misses` in the summary), so an unfaithful emulation never passes silently.

Downloads are charged their joules but not delayed: a model arrives while the board trains, and
the one thing the delay would change, when the device adopts it, is small next to a sync cycle.
Standard library and the device runtime only: no torch, like everything a board imports.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from device_runtime.energy import EmulatedMeter
from device_runtime.trainer import Trainer
from tomtit.profiles import Board, Link
from tomtit.transport import Inbound, Transport

log = logging.getLogger("tomtit.device")

# One portable MiniLM-L6 step, batch 8 x 32 tokens, on the reference x86 core (profiles.toml:
# every board's step_factor is relative to it). Work scales about linearly with tokens per batch.
REFERENCE_STEP_S = 0.065
REFERENCE_TOKENS = 8 * 32


def board_step_seconds(board: Board, batch: int, max_length: int, reference_step_s: float = REFERENCE_STEP_S) -> float:
    """The board's time for one step of `batch` x `max_length` tokens."""
    return board.step_factor * reference_step_s * (batch * max_length) / REFERENCE_TOKENS


class BoardMeter(EmulatedMeter):
    """Busy joules per paced step, link joules per byte, and idle watts for all other wall time.

    Idle is `idle_w x (elapsed - busy seconds)`: the emulated board is powered all the time and
    busy only in steps. Kept monotonic even if a clock reading goes backwards by a hair.
    """

    def __init__(self, board: Board, clock: Callable[[], float] = time.monotonic, slowdown: float = 1.0) -> None:
        super().__init__(board.name, busy_watts=board.busy_w, idle_watts=board.idle_w)
        self.clock = clock
        self.slowdown = slowdown  # wall seconds per board second
        self.started = clock()
        self.busy_s = 0.0  # board seconds

    def add_busy(self, seconds: float) -> None:
        super().add_busy(seconds)
        self.busy_s += max(0.0, seconds)

    def joules(self) -> float:
        idle_s = max(0.0, (self.clock() - self.started) / self.slowdown - self.busy_s)
        self.idle_j = max(self.idle_j, self.idle_watts * idle_s)
        return self.busy_j + self.idle_j + self.link_j


class PacedTrainer(Trainer):
    """The real trainer, each step padded to the board's step time (x slowdown, in wall seconds) and
    booked as the board's busy energy."""

    def __init__(self, inner: Trainer, step_s: float, meter: BoardMeter,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.inner, self.step_s, self.meter, self.clock, self.sleep = inner, step_s, meter, clock, sleep
        self.wall_step_s = step_s * meter.slowdown
        self.backend = f"{inner.backend}, paced as {meter.name.split(':', 1)[-1]}"
        self.pace_misses = 0  # steps this machine could not finish within the board's step time
        self.steps = 0

    def step(self, input_ids, attention_mask, labels) -> float:
        t0 = self.clock()
        loss = self.inner.step(input_ids, attention_mask, labels)
        spent = self.clock() - t0
        if spent < self.wall_step_s:
            self.sleep(self.wall_step_s - spent)
        else:
            self.pace_misses += 1
        self.steps += 1
        self.meter.add_busy(self.step_s)
        return loss

    def get_adapter(self) -> np.ndarray:
        return self.inner.get_adapter()

    def set_adapter(self, buffer: np.ndarray) -> None:
        self.inner.set_adapter(buffer)

    def set_learning_rate(self, lr: float) -> None:
        self.inner.set_learning_rate(lr)


@dataclass
class _Queued:
    due: float
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


class LinkTransport(Transport):
    """The device's transport behind an emulated radio: sends leave after their airtime, in order."""

    def __init__(self, inner: Transport, link: Link, meter: EmulatedMeter,
                 clock: Callable[[], float] = time.monotonic, slowdown: float = 1.0) -> None:
        self.inner, self.link, self.meter, self.clock, self.slowdown = inner, link, meter, clock, slowdown
        self._queue: collections.deque[_Queued] = collections.deque()
        self._cv = threading.Condition()
        self._link_free_at = 0.0
        self._closed = False
        self.bytes_up = self.bytes_down = 0
        self._thread = threading.Thread(target=self._send_loop, name="emulated-link", daemon=True)
        self._thread.start()

    def airtime(self, nbytes: int) -> float:
        """Wall seconds the radio is busy with a message of `nbytes`."""
        return (self.link.latency_s + self.link.up_s(nbytes)) * self.slowdown

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None) -> None:
        self.meter.add_link(self.link.j_per_mb_up * len(payload) / 1e6)
        self.bytes_up += len(payload)
        with self._cv:
            due = max(self.clock(), self._link_free_at) + self.airtime(len(payload))
            self._link_free_at = due
            self._queue.append(_Queued(due, topic, payload, qos, retain, response_topic, correlation_data))
            self._cv.notify()

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._queue or self._queue[0].due > self.clock()):
                    wait = self._queue[0].due - self.clock() if self._queue else None
                    self._cv.wait(timeout=wait)
                if self._closed:
                    return
                item = self._queue[0]
            # Handed over outside the lock (the broker client may block), removed only after, so
            # `publishing` stays true until the inner transport has the message.
            try:
                self.inner.publish(item.topic, item.payload, qos=item.qos, retain=item.retain,
                                   response_topic=item.response_topic, correlation_data=item.correlation_data)
            except Exception as e:  # noqa: BLE001 - a lost send is what a radio does; the outbox re-sends updates
                log.warning("emulated link: could not hand %s to the broker client (%s); dropped", item.topic, e)
            with self._cv:
                self._queue.popleft()
                self._cv.notify_all()

    def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos=qos)

    def get(self, timeout: float | None = None) -> Inbound | None:
        msg = self.inner.get(timeout)
        if msg is not None:
            self.meter.add_link(self.link.j_per_mb_down * len(msg.payload) / 1e6)
            self.bytes_down += len(msg.payload)
        return msg

    @property
    def connected(self) -> bool:
        return self.inner.connected

    @property
    def publishing(self) -> bool:
        with self._cv:
            queued = bool(self._queue)
        return queued or self.inner.publishing

    def flush(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue and time.monotonic() < deadline:
                self._cv.wait(timeout=max(0.0, deadline - time.monotonic()))
            if self._queue:
                return False
        return self.inner.flush(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        # Whatever is still on the air is dropped here; updates among it stay in the outbox on
        # disk and are re-sent at the next start.
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        self.inner.close()


@dataclass
class EmulatedBoard:
    """The three wrappers of one emulated device, sharing one meter."""

    board: Board
    link: Link
    step_s: float
    meter: BoardMeter

    @classmethod
    def create(cls, board: Board, link: Link, *, batch: int, max_length: int,
               reference_step_s: float = REFERENCE_STEP_S, slowdown: float = 1.0) -> "EmulatedBoard":
        if not 1.0 <= slowdown <= 1000.0:
            raise ValueError(f"slowdown must be in [1, 1000], not {slowdown}")
        return cls(board, link, board_step_seconds(board, batch, max_length, reference_step_s),
                   BoardMeter(board, slowdown=slowdown))

    @property
    def slowdown(self) -> float:
        return self.meter.slowdown

    def pace(self, trainer: Trainer) -> PacedTrainer:
        return PacedTrainer(trainer, self.step_s, self.meter)

    def radio(self, transport: Transport) -> LinkTransport:
        return LinkTransport(transport, self.link, self.meter, slowdown=self.slowdown)
