"""`tomtit monitor`: the fold of presence and telemetry into the fleet's state, its rows, the rich
view and the plain lines; then the real thing, in a real terminal (tmux) against a live
federation on Mosquitto, and its plain output through a pipe.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, run_tomtit, spawn_tomtit, wait_for
from edge_broker.brokers import free_port
from tomtit.monitor.plain import PlainSink, row_line, snapshot
from tomtit.monitor.rows import DASH, Session, row, rows, sparkline
from tomtit.monitor.runner import subscribe, watch
from tomtit.monitor.state import FleetState
from tomtit.transport import MemoryBroker
from tomtit.wire import Presence, Topics, encode_presence, encode_telemetry

JOB = "mon"
T = Topics(JOB)
NOW = 1_700_000_000.0


def status(ident: str, state: str = "online", role: str = "device", version: int = 0) -> tuple[str, bytes]:
    return T.status(ident), encode_presence(Presence(id=ident, state=state, role=role, version=version, ts=NOW))


def device_telemetry(ident: str, **over) -> tuple[str, bytes]:
    """Every key the spec lists for a device, with values a test can recognise."""
    values = dict(step=120, loss=0.8123, joules=12.34, energy_estimated=True, meter="emulated:pi4",
                  energy_kind="emulated", board="pi4", link="lte-m", parent="edge0", action="continue",
                  reason="gain 0.01 < cost", steps_since_sync=3, base_version=5, syncs=4, outbox=1, acked=4,
                  rejected=0, last_interval=7, last_reason="marginal gain below energy cost", est_gain=0.01)
    values.update(over)
    return T.telemetry(ident), encode_telemetry({k: v for k, v in values.items() if v is not None})


def node_telemetry(ident: str, role: str, parent: str, **over) -> tuple[str, bytes]:
    values = dict(role=role, parent=parent, version=9, accepted=30, duplicates=1, rejected=2, pending=1,
                  children_offline=0, aggregations=9, pushes_up=3, last_push_interval=4,
                  last_push_reason="tau reached", up_outbox=0, up_acked=3, up_rejected=0)
    values.update(over)
    return T.telemetry(ident), encode_telemetry({k: v for k, v in values.items() if v is not None})


def fleet(*messages: tuple[str, bytes], now: float = NOW) -> FleetState:
    state = FleetState(JOB)
    for topic, payload in messages:
        state.apply(topic, payload, now)
    return state


def full_fleet() -> FleetState:
    """cloud -> edge0 -> dev00, dev01; dev02 names a parent nobody has heard of."""
    return fleet(
        status("cloud", role="node", version=9), node_telemetry("cloud", "cloud", "", accuracy=0.5),
        status("edge0", role="node", version=7), node_telemetry("edge0", "edge", "cloud", version=7),
        status("dev00", version=5), device_telemetry("dev00"),
        status("dev01", state="finished"), device_telemetry("dev01", loss=1.5, base_version=6, parent="edge0"),
        status("dev02", state="offline"), device_telemetry("dev02", parent="edge9"),
    )


# -- the fold ----------------------------------------------------------------------------------
def test_tree_follows_the_parents_telemetry_names():
    clouds, orphans = full_fleet().tree()
    assert [c.member.id for c in clouds] == ["cloud"]
    assert [e.member.id for e in clouds[0].children] == ["edge0"]
    assert [d.member.id for d in clouds[0].children[0].children] == ["dev00", "dev01"]
    assert [o.member.id for o in orphans] == ["dev02"]  # its parent edge9 is unknown


def test_unattached_subtree_keeps_its_children():
    # an edge without role/parent (an old node) still gathers the devices that name it
    state = fleet(status("edge0", role="node"), (T.telemetry("edge0"), encode_telemetry({"version": 3})),
                  status("dev00"), device_telemetry("dev00"))
    clouds, orphans = state.tree()
    assert clouds == []
    assert [o.member.id for o in orphans] == ["edge0"]
    assert [d.member.id for d in orphans[0].children] == ["dev00"]
    assert [(r.id, r.depth, r.group) for r in rows(state, NOW)] == [("edge0", 0, "unattached"),
                                                                    ("dev00", 1, "unattached")]


def test_a_cycle_of_parents_is_shown_not_lost():
    state = fleet(device_telemetry("a", parent="b"), device_telemetry("b", parent="a"))
    _, orphans = state.tree()
    placed = [o.member.id for o in orphans] + [c.member.id for o in orphans for c in o.children]
    assert sorted(placed) == ["a", "b"]


def test_device_row_shows_every_spec_field():
    r = row(full_fleet().members["dev00"], NOW + 3)
    assert (r.kind, r.parent, r.state, r.version, r.loss) == ("device", "edge0", "online", "5", "0.812")
    assert (r.joules, r.energy) == ("12.3", "emulated:pi4/lte-m")
    assert (r.since_sync, r.last_interval) == ("3", "7")
    assert r.last_reason == "marginal gain below energy cost"
    assert r.updates == "out 1 acked 4 rej 0"
    assert r.age == "3s"


def test_node_rows_show_their_tier_counters():
    state = full_fleet()
    cloud, edge = row(state.members["cloud"], NOW), row(state.members["edge0"], NOW)
    assert (cloud.kind, cloud.parent, cloud.version) == ("cloud", DASH, "9")
    assert cloud.updates == "pending 1 accepted 30 rej 2"
    assert (edge.kind, edge.parent, edge.version, edge.last_interval, edge.last_reason) == \
        ("edge", "cloud", "7", "4", "tau reached")
    assert edge.updates == "pending 1 up: out 0 acked 3 rej 0"


def test_old_publishers_without_the_new_keys_show_dashes():
    # what a device agent sent before the spec's new keys: no parent, energy_kind, counters...
    old = {"step": 10, "loss": 1.25, "joules": 2.0, "energy_estimated": True, "meter": "model:rpi4",
           "action": "continue", "reason": "r", "steps_since_sync": 10, "base_version": 1, "syncs": 0, "outbox": 0}
    state = fleet(status("dev00"), (T.telemetry("dev00"), encode_telemetry(old)),
                  status("edge0", role="node", version=2), (T.telemetry("edge0"), encode_telemetry(
                      {"version": 2, "accepted": 3, "duplicates": 0, "rejected": 0, "pending": 1,
                       "children_offline": 0, "aggregations": 2, "pushes_up": 0})))
    dev, node = row(state.members["dev00"], NOW), row(state.members["edge0"], NOW)
    assert (dev.kind, dev.parent, dev.loss, dev.joules) == ("device", DASH, "1.250", "2.0")
    assert dev.energy == "estimated"  # energy_estimated still says that much
    assert (dev.last_interval, dev.last_reason) == (DASH, DASH)
    assert dev.updates == f"out 0 acked {DASH} rej {DASH}"
    assert (node.kind, node.parent, node.version) == ("node", DASH, "2")
    assert node.updates == "pending 1 accepted 3 rej 0"
    assert node.last_interval == DASH
    # the plain line carries the dashes too, and nothing crashed on the way
    assert f"parent {DASH}" in row_line(dev, NOW)
    # wrong types are unknown too, not a crash
    state.apply(*device_telemetry("dev01", loss="high", base_version=True, parent=7), NOW)
    bad = row(state.members["dev01"], NOW)
    assert (bad.loss, bad.version, bad.parent) == (DASH, DASH, DASH)


def test_a_member_known_only_by_presence():
    r = row(fleet(status("dev05", state="offline", version=3)).members["dev05"], NOW)
    assert (r.kind, r.state, r.version, r.loss, r.joules, r.energy, r.updates) == \
        ("device", "offline", "3", DASH, DASH, DASH, f"out {DASH} acked {DASH} rej {DASH}")


@pytest.mark.parametrize("topic,payload", [
    (T.telemetry("dev00"), b"not json"),
    (T.telemetry("dev00"), b'{"loss": {"nested": 1}}'),
    (T.telemetry("dev00"), b"[1, 2]"),
    (T.telemetry("dev00"), b""),
    (T.status("dev00"), b'{"id": "dev00", "state": "dancing", "role": "device", "version": 0, "ts": 0}'),
    (T.status("dev00"), encode_presence(Presence(id="dev01", state="online", role="device", version=0, ts=0))),
    (T.status("dev00"), b"\xff\xfe"),
    ("tomtit/mon/status/a/b", b"{}"),
    ("tomtit/other/telemetry/dev00", b"{}"),
])
def test_malformed_messages_are_counted_and_change_nothing(topic, payload):
    state = fleet(status("dev00"), device_telemetry("dev00"))
    before = row(state.members["dev00"], NOW)
    assert state.apply(topic, payload, NOW + 1) is None
    assert (state.messages, state.malformed) == (3, 1)
    assert state.last_malformed.startswith(topic)
    assert row(state.members["dev00"], NOW) == before
    assert set(state.members) == {"dev00"}


def test_an_empty_retained_status_clears_presence():
    state = fleet(status("dev00"), device_telemetry("dev00"), status("gone"))
    state.apply(T.status("dev00"), b"", NOW)
    state.apply(T.status("gone"), b"", NOW)
    assert state.malformed == 0
    assert state.members["dev00"].presence is None and row(state.members["dev00"], NOW).state == DASH
    assert "gone" not in state.members  # nothing else was known about it


def test_no_sync_yet_is_a_dash_not_zero():
    state = fleet(device_telemetry("dev00", last_interval=0, last_reason=""),
                  node_telemetry("edge0", "edge", "cloud", last_push_interval=0, last_push_reason=""))
    assert row(state.members["dev00"], NOW).last_sync == DASH
    assert row(state.members["edge0"], NOW).last_sync == DASH
    assert row(full_fleet().members["edge0"], NOW).last_sync == "4 (tau reached)"


def test_later_telemetry_replaces_the_earlier_whole():
    state = fleet(device_telemetry("dev00"), device_telemetry("dev00", last_reason=None, loss=0.5))
    r = row(state.members["dev00"], NOW)
    assert (r.loss, r.last_reason) == ("0.500", DASH)


def test_accuracy_history_is_one_point_per_model():
    accs = [(1, 0.27), (1, 0.27), (2, 0.5), (2, 0.5), (3, 0.91), (4, 0.125), (5, 1.0)]
    state = fleet(*[node_telemetry("cloud", "cloud", "", version=v, accuracy=a) for v, a in accs])
    points = state.members["cloud"].accuracy
    assert [(p.version, p.accuracy) for p in points] == [(1, 0.27), (2, 0.5), (3, 0.91), (4, 0.125), (5, 1.0)]
    # eighths of [0, 1]: 0.27 -> 2 (▃), 0.5 -> 4 (▅), 0.91 -> 7 (█), 0.125 -> 1 (▂), 1.0 clamps to 7
    assert sparkline([p.accuracy for p in points]) == "▃▅█▂█"


def test_sparkline_scale_clamping_and_width():
    assert sparkline([]) == ""
    assert sparkline([-0.5, 0.0, 0.124, 0.126, 0.99, 1.5]) == "▁▁▁▂██"
    assert sparkline([0.1 * i for i in range(10)], width=3) == "▆▇█"  # the last three: 0.7, 0.8, 0.9
    assert sparkline([5.0, 7.5, 10.0], lo=5.0, hi=10.0) == "▁▅█"


def test_publishers_strings_cannot_drive_the_terminal():
    esc = "\x1b[2J\x1b[31m"
    state = fleet(device_telemetry("dev00", last_reason=f"tau{esc}", board=f"pi4{esc}", parent=f"e{esc}"))
    state.apply(f"tomtit/mon/telemetry/a{esc}b", b"{}", NOW)  # the `+` level matches any characters
    r = row(state.members["dev00"], NOW)
    shown = " ".join([r.last_reason, r.energy, r.parent, row_line(r, NOW), state.last_malformed])
    assert "\x1b" not in shown and "\x07" not in shown
    assert (r.last_reason, r.energy, r.parent) == ("tau?[2J?[31m", "emulated:pi4?[2J?[31m/lte-m", "e?[2J?[31m")


def test_reason_is_truncated_to_one_short_line():
    state = fleet(device_telemetry("dev00", last_reason="a very long\nreason that the scheduler wrote out in full"))
    r = row(state.members["dev00"], NOW).last_reason
    assert len(r) == 32 and r.endswith("…") and "\n" not in r and r.startswith("a very long reason")


# -- the renderers -----------------------------------------------------------------------------
def _table_rows(text: str) -> dict[str, list[str]]:
    """id -> cells, from the rich table's text (cells split on its column rule)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) >= 10:
            ident = cells[0].lstrip("└ ").strip()
            out[ident] = cells
    return out


def test_rich_view_renders_rows_numbers_and_sparkline():
    from rich.console import Console

    from tomtit.monitor.view import render

    state = full_fleet()
    for v, a in [(10, 0.6), (11, 0.91)]:
        state.apply(*node_telemetry("cloud", "cloud", "", version=v, accuracy=a), NOW)
    console = Console(record=True, width=180, color_system=None)
    console.print(render(Session("mqtt://broker:1883", JOB, NOW - 65, "connected"), state, NOW + 2))
    text = console.export_text()
    assert "broker mqtt://broker:1883" in text and "job mon" in text and "link connected" in text
    assert "messages 12" in text and "malformed 0" in text and "up 00:01:07" in text
    assert "cloud accuracy ▅▅█ 0.910  (3 models)" in text  # 0.5, 0.6, 0.91
    cells = _table_rows(text)
    assert list(cells) == ["cloud", "edge0", "dev00", "dev01", "unattached", "dev02"]
    assert cells["dev00"][1:] == ["device", "online", "5", "0.812", "12.3", "emulated:pi4/lte-m", "3",
                                  "7 (marginal gain below energy cost)", "out 1 acked 4 rej 0", "2s"]
    assert cells["dev01"][2:5] == ["finished", "6", "1.500"]
    assert cells["edge0"][1:4] == ["edge", "online", "7"]
    assert cells["edge0"][9] == "pending 1 up: out 0 acked 3 rej 0"
    assert cells["cloud"][9] == "pending 1 accepted 30 rej 2"
    # the tree: edge0 one level under the cloud, devices two; dev02 under "unattached"
    lines = text.splitlines()
    assert any(re.match(r"^  └ edge0\b", ln) for ln in lines)
    assert any(re.match(r"^    └ dev00\b", ln) for ln in lines)
    assert text.index("unattached") < text.index("dev02") and text.index("dev01") < text.index("unattached")
    assert cells["dev02"][2] == "offline"
    assert "last malformed" not in text
    state.apply(T.telemetry("dev00"), b"{oops", NOW)  # which topic sent garbage, and why, shows
    console.print(render(Session("mqtt://broker:1883", JOB, NOW - 65, "connected"), state, NOW + 2))
    text = console.export_text()
    assert "malformed 1" in text and "last malformed: tomtit/mon/telemetry/dev00: " in text


def test_plain_snapshot_and_change_lines():
    state = full_fleet()
    session = Session("mqtt://b:1", JOB, NOW - 5, "connected")
    lines = snapshot(session, state, NOW + 1)
    clock = time.strftime("%H:%M:%S", time.localtime(NOW + 1))
    assert lines[0] == f"{clock} monitor broker mqtt://b:1 job mon link connected messages 10 malformed 0 " \
                       f"members 5 up 00:00:06"
    assert lines[1] == f"{clock} cloud accuracy ▅ 0.500 (1 models)"
    assert f"{clock} dev00 device online v5 loss 0.812 energy 12.3 J emulated:pi4/lte-m since-sync 3 " \
           f"last 7 (marginal gain below energy cost) out 1 acked 4 rej 0 age 1s parent edge0" in lines
    assert [ln.split()[1] for ln in lines[2:]] == ["cloud", "edge0", "dev00", "dev01", "dev02"]

    out = io.StringIO()
    sink = PlainSink(out)
    sink.tick(session, state, NOW + 1)
    assert len(out.getvalue().splitlines()) == 7  # header, accuracy, five members
    sink.tick(session, state, NOW + 30)  # only ages moved: nothing to say
    assert len(out.getvalue().splitlines()) == 7
    state.apply(*device_telemetry("dev01", loss=0.25), NOW + 31)
    sink.tick(session, state, NOW + 32)
    new = out.getvalue().splitlines()[7:]
    assert len(new) == 1 and " dev01 device finished v5 loss 0.250 " in new[0]


def test_watch_folds_a_transport_and_ticks_until_stopped():
    broker = MemoryBroker()
    publisher = broker.client("fleet")
    publisher.publish(*status("dev00"), retain=True)  # retained: there before the monitor
    monitor = broker.client("monitor")
    subscribe(monitor, JOB)
    publisher.publish(*device_telemetry("dev00"))
    publisher.publish(T.telemetry("dev01"), b"garbage")
    publisher.publish(T.up("edge0", "dev00"), b"an update: not ours to read")
    ticks = []

    class Sink:
        def tick(self, session, state, now):
            ticks.append((session.link, state.messages))

    clock = iter(NOW + 0.1 * i for i in range(10_000))
    state = FleetState(JOB)
    session = watch(monitor, state, Sink(), broker="memory", should_stop=lambda: len(ticks) >= 3, tick_s=0.05,
                    clock=lambda: next(clock))
    assert (state.messages, state.malformed) == (3, 1)  # the update topic was never subscribed
    assert row(state.members["dev00"], NOW).loss == "0.812"
    assert session.link == "connected" and ticks[0] == ("connected", 0) and ticks[-1][1] == 3


def test_plain_mode_ends_cleanly_on_sigterm_while_the_broker_is_unreachable():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tomtit", "monitor", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                             "--job", JOB, "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=str(ROOT))
    try:
        first = proc.stdout.readline()  # the header, at once, before any message
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert re.fullmatch(r"\d\d:\d\d:\d\d monitor broker mqtt://127\.0\.0\.1:\d+ job mon link connecting messages 0 "
                        r"malformed 0 members 0 up 00:00:00\n", first)
    assert "Traceback" not in err


def test_once_fails_plainly_without_a_broker():
    r = run_tomtit(["monitor", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--job", JOB, "--once", "--wait", "1"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tomtit monitor: error: no connection to mqtt://127.0.0.1:" in r.stderr


def test_the_dashboard_without_rich_says_how_to_get_it(monkeypatch, capsys):
    import importlib.util

    from tomtit.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rich" else real(name, *a))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["monitor", "--broker", "mqtt://127.0.0.1:1", "--job", JOB]) == 2
    assert "pip install 'tomtit[monitor]' (or give --plain)" in capsys.readouterr().err


# -- the real thing ----------------------------------------------------------------------------
def _tmux_binary() -> str:
    found = shutil.which("tmux")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed (CI installs it: apt-get install tmux)")
        pytest.skip("tmux is not installed")
    return found


class Tmux:
    """One tmux server of our own (its own socket), one session running one command."""

    def __init__(self, binary: str):
        self.base = [binary, "-L", f"tomtit-test-{uuid.uuid4().hex[:8]}", "-f", "/dev/null"]
        # The server hands its environment to the pane; COLUMNS/LINES (set in this process by
        # some import under pytest) would override the pane's real size for rich.
        self.env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=True, timeout=10,
                              env=self.env).stdout

    def start(self, command: list[str], *, width: int, height: int) -> None:
        # The command as separate arguments: tmux execs it without a shell, so the pane's process
        # is the monitor itself and Ctrl-C reaches it alone. remain-on-exit in the same call,
        # before the command can end: the pane stays, to read the exit status and last screen from.
        self("new-session", "-d", "-s", "mon", "-x", str(width), "-y", str(height), *command,
             ";", "set-option", "-w", "-t", "mon", "remain-on-exit", "on")

    def screen(self, history: int = 0) -> str:
        return self("capture-pane", "-p", "-t", "mon", "-S", str(-history))

    def dead_status(self) -> str | None:
        """None while the command runs; then "exit N", or "signal S" if a signal killed it."""
        dead, status, signal_, pid = (self("display", "-p", "-t", "mon", "#{pane_dead}|#{pane_dead_status}|"
                                           "#{pane_dead_signal}|#{pane_pid}").strip().split("|"))
        if dead != "1":
            return None
        if status or signal_:
            return f"exit {status}" if status else f"signal {signal_}"
        # tmux 3.3a sometimes marks the pane dead (its pty closed) but never reaps the process:
        # it stays a zombie and pane_dead_status stays empty. The kernel still has its status.
        return _zombie_status(int(pid))

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


def _zombie_status(pid: int) -> str | None:
    """A zombie's exit status from /proc/PID/stat (field 52, waitpid's encoding), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "(comm) ": field 3 (state) onwards
    if fields[0] != "Z":
        return None
    code = int(fields[52 - 3])
    return f"signal {code & 0x7F}" if code & 0x7F else f"exit {code >> 8 & 0xFF}"


def _fleet_rows(screen: str) -> dict[str, list[str]]:
    return {k: v for k, v in _table_rows(screen).items() if k in ("cloud", "edge0", "dev00", "dev01")}


def _numbers_in(cells: list[str], device: bool) -> bool:
    """online, a version, and for a device a loss and joules."""
    ok = cells[2] == "online" and cells[3].isdigit()
    if device:
        ok = ok and re.fullmatch(r"\d+\.\d{3}", cells[4]) is not None and re.fullmatch(r"[\d,]+\.\d", cells[5])
    return bool(ok)


@pytest.mark.mosquitto
def test_dashboard_in_a_real_terminal_and_plain_lines_against_a_live_federation(
        tmp_path, mosquitto, tiny_bundle, tiny_data):
    tmux = Tmux(_tmux_binary())
    job = "montest"
    common = ["--bundle", str(tiny_bundle), "--broker", mosquitto.url, "--job", job]
    logs = {n: tmp_path / f"{n}.log" for n in ("cloud", "edge0", "dev00", "dev01")}
    procs = {
        "cloud": spawn_tomtit(["node", "run", "--id", "cloud", *common, "--k", "1", "--max-minutes", "4",
                               "--device-scheduler", "fixed:20", "--edge-scheduler", "fixed:2",
                               "--eval-data", str(tiny_data), "--state-dir", str(tmp_path / "s-cloud")],
                              logs["cloud"]),
        "edge0": spawn_tomtit(["node", "run", "--id", "edge0", "--parent", "cloud", *common, "--k", "1",
                               "--state-dir", str(tmp_path / "s-edge0")], logs["edge0"]),
    }
    # one emulated Pi 4 on Wi-Fi (steps paced to the board's), one estimated from a power model
    energy = {"dev00": ["--board", "pi4", "--link", "wifi"], "dev01": ["--energy", "model:rpi4"]}
    for d in ("dev00", "dev01"):
        procs[d] = spawn_tomtit(["device", "run", "--id", d, "--parent", "edge0", *common, "--data", str(tiny_data),
                                 "--lr", "1e-2", *energy[d],
                                 # the tiny model trains ~100 steps/s: enough to outlast the test, not the cloud's limit
                                 "--max-steps", "100000",
                                 "--state-dir", str(tmp_path / f"s-{d}")], logs[d])
    monitor = [sys.executable, "-m", "tomtit", "monitor", "--broker", mosquitto.url, "--job", job]
    screen, screen_file = "", tmp_path / "screen.txt"
    try:
        tmux.start(["env", f"PYTHONPATH={ROOT}", "HF_HUB_OFFLINE=1", *monitor], width=200, height=50)
        t0 = time.monotonic()

        def fleet_shown() -> bool:
            nonlocal screen
            screen = tmux.screen()
            screen_file.write_text(screen)  # shown by wait_for on a timeout
            rows_ = _fleet_rows(screen)
            return (len(rows_) == 4 and all(_numbers_in(rows_[d], True) for d in ("dev00", "dev01"))
                    and all(_numbers_in(rows_[n], False) for n in ("cloud", "edge0"))
                    and all(rows_[d][8] != DASH for d in ("dev00", "dev01"))  # each has synced once
                    and re.search(r"cloud accuracy [▁▂▃▄▅▆▇█]{2,} ", screen) is not None)  # 2+ models

        wait_for(fleet_shown, 180, "the dashboard's rows for cloud, edge0, dev00 and dev01, each device's "
                 "first sync and two accuracy points", {**logs, "screen": screen_file})
        print(f"\n--- dashboard after {time.monotonic() - t0:.0f} s:\n{screen}")
        assert "Traceback" not in screen
        assert f"job {job}" in screen and "link connected" in screen and "malformed 0" in screen
        cells = _fleet_rows(screen)
        for d in ("dev00", "dev01"):
            assert cells[d][1] == "device"
            assert float(cells[d][5].replace(",", "")) > 0  # joules; a loss may well be 0.000 by now
            assert re.fullmatch(r"\d+ \(fixed tau=20\)", cells[d][8]), cells[d]  # the run's device scheduler
            assert re.fullmatch(r"out \d+ acked \d+ rej \d+", cells[d][9]), cells[d]
        assert (cells["dev00"][6], cells["dev01"][6]) == ("emulated:pi4/wifi", "estimated")
        assert (cells["cloud"][1], cells["edge0"][1]) == ("cloud", "edge")
        assert re.fullmatch(r"pending \d+ accepted \d+ rej \d+", cells["cloud"][9]), cells["cloud"]
        assert re.fullmatch(r"pending \d+ up: out \d+ acked \d+ rej \d+", cells["edge0"][9]), cells["edge0"]
        # the tree from the telemetry's role and parent: cloud, edge0 under it, both devices under edge0
        tree = [ln.split("│")[0].rstrip() for ln in screen.splitlines() if "│" in ln]
        assert tree == ["cloud", "  └ edge0", "    └ dev00", "    └ dev01"], tree
        assert "unattached" not in screen

        # The same federation through a pipe: plain lines, one snapshot, a second monitor at once.
        r = subprocess.run([*monitor, "--once", "--wait", "5"], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"), cwd=str(ROOT))
        assert r.returncode == 0, r.stderr
        print(f"--- tomtit monitor --once --wait 5:\n{r.stdout}")
        lines = r.stdout.splitlines()
        plain = {ln.split()[1]: ln for ln in lines if ln.split()[2:3] != ["accuracy"]}
        assert re.match(r"\d\d:\d\d:\d\d monitor broker mqtt://\S+ job montest link connected messages \d+ "
                        r"malformed 0 members 4 up 00:00:0[5-6]$", plain["monitor"])
        assert list(plain) == ["monitor", "cloud", "edge0", "dev00", "dev01"]  # tree order
        for d, meter in (("dev00", "emulated:pi4/wifi"), ("dev01", "estimated")):
            m = re.fullmatch(rf"\d\d:\d\d:\d\d {d} device online v\d+ loss \d+\.\d{{3}} energy ([\d,]+\.\d) J "
                             rf"{meter} since-sync \d+ last \d+ \(fixed tau=20\) out \d+ acked \d+ rej \d+ age \d+s "
                             rf"parent edge0", plain[d])
            assert m, plain[d]
            assert float(m.group(1).replace(",", "")) > 0
        cloud_line = (r"\S+ cloud cloud online v\d+ loss — energy — since-sync — last — "
                      r"pending \d+ accepted \d+ rej \d+ age \d+s parent —")
        edge_line = (r"\S+ edge0 edge online v\d+ loss — energy — since-sync — last \d+ \(fixed tau=2\) "
                     r"pending \d+ up: out \d+ acked \d+ rej \d+ age \d+s parent cloud")
        assert re.fullmatch(cloud_line, plain["cloud"]), plain["cloud"]
        assert re.fullmatch(edge_line, plain["edge0"]), plain["edge0"]
        # the cloud evaluates from the untrained head on: at least one point
        assert re.search(r"^\d\d:\d\d:\d\d cloud accuracy [▁▂▃▄▅▆▇█]+ \d\.\d{3} \(\d+ models\)$", r.stdout, re.M)

        # Ctrl-C: the monitor ends by itself, exit code 0, no traceback, the last frame kept.
        tmux("send-keys", "-t", "mon", "C-c")
        wait_for(lambda: tmux.dead_status() is not None, 15, "the monitor to exit on Ctrl-C", logs)
        final = tmux.screen(history=100)  # "Pane is dead" scrolls the top line into the history
        assert tmux.dead_status() == "exit 0", f"{tmux.dead_status()}\n{final}"
        assert "Traceback" not in final and "dev00" in final
    finally:
        tmux.kill()
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

