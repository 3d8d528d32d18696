"""Emulated boards: paced steps, metered energy, a radio that takes its airtime (no torch)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from device_runtime.emulation import BoardMeter, EmulatedBoard, LinkTransport, PacedTrainer, board_step_seconds
from device_runtime.trainer import Trainer
from tomtit.profiles import Board, Link, ProfileError, load_profiles, parse_mix, resolve_name
from tomtit.transport import MemoryBroker

PI = Board(name="pi-test", step_factor=4.0, busy_w=6.0, idle_w=2.0, source="test")


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s

    slept: list[float]


class StepTakes(Trainer):
    backend = "fake"

    def __init__(self, clock: FakeClock, seconds: list[float]) -> None:
        self.clock, self.seconds = clock, list(seconds)

    def step(self, input_ids, attention_mask, labels) -> float:
        self.clock.t += self.seconds.pop(0)
        return 1.5

    def get_adapter(self):
        return np.zeros(3, np.float32)

    def set_adapter(self, buffer) -> None:
        pass

    def set_learning_rate(self, lr: float) -> None:
        pass


def test_board_step_scales_the_reference_by_factor_and_tokens():
    assert board_step_seconds(PI, batch=8, max_length=32, reference_step_s=0.05) == pytest.approx(0.2)
    # twice the tokens per batch, twice the work
    assert board_step_seconds(PI, batch=16, max_length=32, reference_step_s=0.05) == pytest.approx(0.4)


def test_paced_step_sleeps_to_the_board_time_and_books_busy_watts():
    clock = FakeClock()
    clock.slept = []
    meter = BoardMeter(PI, clock=clock)
    trainer = PacedTrainer(StepTakes(clock, [0.05, 0.3]), step_s=0.2, meter=meter, clock=clock, sleep=clock.sleep)
    assert trainer.step(None, None, None) == 1.5
    assert clock.slept == [pytest.approx(0.15)]  # 0.05 s of real work, padded to the board's 0.2 s
    assert trainer.pace_misses == 0
    trainer.step(None, None, None)  # 0.3 s here: slower than the board, nothing to pad, a miss
    assert clock.slept == [pytest.approx(0.15)] and trainer.pace_misses == 1
    # busy: 2 steps x 0.2 s x 6 W; idle: the 0.1 s this machine was late, at 2 W
    assert meter.joules() == pytest.approx(2 * 0.2 * 6.0 + 0.1 * 2.0)
    clock.t += 10  # waiting, e.g. for a model
    assert meter.joules() == pytest.approx(2 * 0.2 * 6.0 + 10.1 * 2.0)
    assert meter.name == "emulated:pi-test" and meter.estimated


def test_slowdown_stretches_wall_time_but_books_board_time():
    clock = FakeClock()
    clock.slept = []
    meter = BoardMeter(PI, clock=clock, slowdown=3.0)
    trainer = PacedTrainer(StepTakes(clock, [0.1]), step_s=0.2, meter=meter, clock=clock, sleep=clock.sleep)
    trainer.step(None, None, None)
    assert clock.slept == [pytest.approx(0.5)]  # padded to 3 x 0.2 s of wall time
    assert meter.joules() == pytest.approx(0.2 * 6.0)  # 0.2 board seconds busy, no idle
    clock.t += 3.0  # 3 wall seconds = 1 board second idle
    assert meter.joules() == pytest.approx(0.2 * 6.0 + 1.0 * 2.0)
    radio = LinkTransport(MemoryBroker().client("d"), SLOW, meter, slowdown=3.0)
    assert radio.airtime(100_000) == pytest.approx(3 * (0.05 + 0.1))
    radio.close()


def test_meter_is_monotonic_even_if_the_clock_steps_back():
    clock = FakeClock()
    meter = BoardMeter(PI, clock=clock)
    clock.t += 5
    j = meter.joules()
    clock.t -= 1
    assert meter.joules() >= j


SLOW = Link(name="slow", up_mbps=8.0, down_mbps=8.0, j_per_mb_up=10.0, j_per_mb_down=4.0, latency_s=0.05, source="t")


def test_radio_delivers_after_airtime_in_order_and_meters_joules():
    broker = MemoryBroker()
    listener = broker.client("listener")
    listener.subscribe("t/#")
    meter = BoardMeter(PI)
    radio = LinkTransport(broker.client("dev"), SLOW, meter)
    t0 = time.monotonic()
    radio.publish("t/a", b"x" * 200_000)  # 0.05 + 0.2 s at 8 Mbit/s
    radio.publish("t/b", b"y" * 10)  # behind it on the same radio
    assert radio.publishing
    assert listener.get(0.1) is None  # not before its airtime
    first = listener.get(2)
    arrived = time.monotonic() - t0
    second = listener.get(2)
    assert (first.topic, second.topic) == ("t/a", "t/b")
    assert arrived >= 0.25 - 0.01
    assert radio.flush(2) and not radio.publishing
    assert meter.link_j == pytest.approx(10.0 * (200_010) / 1e6)
    radio.subscribe("t/down")
    broker.client("parent").publish("t/down", b"m" * 500_000)
    assert radio.get(1).topic == "t/down"
    assert meter.link_j == pytest.approx(10.0 * 200_010 / 1e6 + 4.0 * 0.5)
    assert (radio.bytes_up, radio.bytes_down) == (200_010, 500_000)
    radio.close()
    radio.close()  # idempotent


def test_radio_close_does_not_hang_on_a_long_queue():
    broker = MemoryBroker()
    radio = LinkTransport(broker.client("dev"), SLOW, BoardMeter(PI))
    radio.publish("t/a", b"x" * 10_000_000)  # 10 s of airtime
    assert not radio.flush(0.1)
    t0 = time.monotonic()
    radio.close()
    assert time.monotonic() - t0 < 2
    assert not radio._thread.is_alive()


def test_shipped_profiles_cover_the_boards_and_links_a_demo_offers():
    p = load_profiles()
    for name in ("pi4", "pi5", "jetson-nano", "orin-nano", "x86-minipc"):
        b = p.boards[name]
        assert b.step_factor > 0 and 0 < b.idle_w < b.busy_w and b.source
    for name in ("ethernet", "wifi", "lte-m", "nb-iot"):
        assert p.links[name].up_mbps > 0 and p.links[name].source
    assert resolve_name("orin", p.boards, "boards") == "orin-nano"
    assert parse_mix("pi4:2,orin:1", p.boards, "boards") == ("pi4", "pi4", "orin-nano")
    with pytest.raises(ProfileError, match="ambiguous"):
        resolve_name("pi", p.boards, "boards")
    with pytest.raises(ProfileError, match="known: "):
        resolve_name("cray", p.boards, "boards")


def test_emulated_board_bundles_the_wrappers_around_one_meter():
    p = load_profiles()
    eb = EmulatedBoard.create(p.boards["pi4"], p.links["wifi"], batch=8, max_length=32)
    assert eb.step_s == pytest.approx(5.0 * 0.065)
    assert eb.pace(StepTakes(FakeClock(), [0.0])).meter is eb.meter


@pytest.mark.parametrize("argv, message", [
    (["--link", "wifi"], "give --board too"),
    (["--board", "cray"], "unknown profile 'cray'"),
    (["--board", "pi4", "--link", "pigeon"], "unknown profile 'pigeon'"),
    (["--board", "pi4", "--energy", "rapl"], "contradicts"),
    (["--board", "pi4", "--reference-step", "nan"], "reference-step"),
    (["--board", "pi4", "--slowdown", "0.5"], "--slowdown must be"),
    (["--slowdown", "2"], "give --board too"),
])
def test_device_run_refuses_bad_emulation_flags_before_the_broker(tiny_bundle, tiny_data, argv, message, capsys):
    from tomtit.cli import main

    rc = main(["device", "run", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--id", "d0",
               "--parent", "e0", "--broker", "mqtt://127.0.0.1:1", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
