"""Faults in a field topology, end to end on real Mosquitto brokers with the generated secured
config: the edge runs its own broker, bridged to the cloud's (through a TCP relay the test can
cut). In one run: the edge-cloud link is cut and restored, the edge's broker restarts (with
persistence), and a device is SIGKILLed for good (its last will tells the edge) while the
others finish. Then the ledgers every process writes are compared end to end: per device and
for the edge, no acknowledged update missing at its parent and none applied twice."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import spawn_tomtit, wait_for
from test_deploy import deploy, mosquitto_binary

pytestmark = pytest.mark.mosquitto
DEVICES = ("d00", "d01", "d02")


class Relay:
    """A TCP relay for the bridge: `cut()` drops every connection and refuses new ones until
    `restore()`, as a broken uplink between a site and the cloud does."""

    def __init__(self, target_port: int):
        from edge_broker.brokers import free_port

        self.port, self.target = free_port(), target_port
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen()
        self._server = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def cut(self) -> None:
        self._server.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass


def _start_broker(conf: Path, port: int, log: Path) -> subprocess.Popen:
    from edge_broker.brokers import wait_for_port

    with log.open("ab") as fh:
        proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=fh, stderr=subprocess.STDOUT)
    assert wait_for_port("127.0.0.1", port, 10), log.read_text()[-1500:]
    return proc


def _count(path: Path, text: str) -> int:
    return path.read_text().count(text) if path.exists() else 0


def _exactly_once(sender_ledger: dict, applied_at_parent: list[str]) -> dict:
    """Compare what a sender saw acknowledged with what its parent applied."""
    acked = set(sender_ledger["applied"]) | set(sender_ledger["duplicate"])
    applied = set(applied_at_parent)
    return {
        "staged": len(sender_ledger["staged"]), "acked": len(acked), "applied": len(applied_at_parent),
        "applied_twice": len(applied_at_parent) - len(applied),
        "acked_but_lost": len(acked - applied),
        "applied_never_sent": len(applied - set(sender_ledger["staged"])),
        # applied but the ack had not arrived when the sender stopped: only pending ones may be
        "applied_unacked_not_pending": len(applied - acked - set(sender_ledger["pending"])),
    }


def test_bridge_cut_broker_restart_and_a_lost_device_lose_nothing_and_apply_nothing_twice(
        tmp_path, tiny_bundle, tiny_data):
    from edge_broker.brokers import free_port

    mosquitto_binary()
    cloud_port, edge_port = free_port(), free_port()
    topo = tmp_path / "topology.toml"
    topo.write_text(f'[cloud]\nhost = "127.0.0.1"\nport = {cloud_port}\n\n'
                    f'[[edges]]\nid = "e0"\ndevices = {json.dumps(list(DEVICES))}\nhost = "127.0.0.1"\n'
                    f'port = {edge_port}\n')
    dep = tmp_path / "dep"
    rc, _, err = deploy("--out", str(dep), "--topology", str(topo))
    assert rc == 0, err
    relay = Relay(cloud_port)
    edge_conf = dep / "brokers" / "e0" / "mosquitto.conf"
    text = edge_conf.read_text()
    assert f"address 127.0.0.1:{cloud_port}" in text
    edge_conf.write_text(text.replace(f"address 127.0.0.1:{cloud_port}", f"address 127.0.0.1:{relay.port}"))

    logs = {n: tmp_path / f"{n}.log" for n in ("cloud", "e0", *DEVICES)}
    summaries = {n: tmp_path / f"{n}.json" for n in logs}
    cred = lambda n: str(dep / "credentials" / f"{n}.toml")  # noqa: E731
    common = lambda n: ["--credentials", cred(n), "--bundle", str(tiny_bundle),  # noqa: E731
                        "--state-dir", str(tmp_path / f"s-{n}"), "--summary", str(summaries[n])]
    brokers = {"cloud": _start_broker(dep / "brokers" / "cloud" / "mosquitto.conf", cloud_port,
                                      tmp_path / "broker-cloud.log"),
               "e0": _start_broker(edge_conf, edge_port, tmp_path / "broker-e0.log")}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["cloud"] = spawn_tomtit(["node", "run", *common("cloud"), "--k", "1", "--max-minutes", "2",
                                       "--device-scheduler", "fixed:4", "--edge-scheduler", "fixed:2"], logs["cloud"])
        procs["e0"] = spawn_tomtit(["node", "run", *common("e0"), "--k", "1"], logs["e0"])
        for d in DEVICES:
            procs[d] = spawn_tomtit(["device", "run", *common(d), "--data", str(tiny_data), "--lr", "1e-2",
                                     "--resend-after", "3"], logs[d])
        wait_for(lambda: _count(logs["cloud"], "aggregated") >= 2, 120, "the edge's pushes at the cloud", logs)

        # 1. cut the edge's link to the cloud: the edge goes on with its devices; pushes wait
        relay.cut()
        edge_before = _count(logs["e0"], "aggregated")
        time.sleep(6)
        assert _count(logs["e0"], "aggregated") > edge_before, "the edge stopped while cut off"
        cloud_at_restore = _count(logs["cloud"], "aggregated")
        relay.restore()
        wait_for(lambda: _count(logs["cloud"], "aggregated") > cloud_at_restore, 60,
              "pushes reaching the cloud after the link came back", logs)

        # 2. restart the edge's broker (persistence on): sessions and queued messages survive
        brokers["e0"].send_signal(signal.SIGTERM)
        brokers["e0"].wait(10)
        time.sleep(1)
        edge_before = _count(logs["e0"], "aggregated")
        brokers["e0"] = _start_broker(edge_conf, edge_port, tmp_path / "broker-e0.log")
        wait_for(lambda: _count(logs["e0"], "aggregated") > edge_before + 2, 60,
              "the edge aggregating after its broker restarted", logs)

        # 3. a device goes away for good
        procs["d02"].send_signal(signal.SIGKILL)
        procs["d02"].wait(10)

        # the run ends by itself (the cloud's time limit), and "finished" reaches everyone
        assert procs["cloud"].wait(180) == 0, logs["cloud"].read_text()[-2000:]
        for n in ("e0", "d00", "d01"):
            assert procs[n].wait(90) == 0, f"{n}: " + logs[n].read_text()[-2000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for b in brokers.values():
            b.terminate()
            b.wait(10)
        relay.cut()

    s = {n: json.loads(summaries[n].read_text()) for n in ("cloud", "e0", "d00", "d01")}
    report = {d: _exactly_once(s[d]["ledger"], s["e0"]["applied_ids"].get(d, [])) for d in ("d00", "d01")}
    report["e0"] = _exactly_once(s["e0"]["ledger"], s["cloud"]["applied_ids"].get("e0", []))
    d02_applied = s["e0"]["applied_ids"].get("d02", [])
    print(json.dumps(report))
    for who, r in report.items():
        assert r["applied_twice"] == 0 and r["acked_but_lost"] == 0 and r["applied_never_sent"] == 0, (who, r)
        assert r["applied_unacked_not_pending"] == 0, (who, r)
        assert r["acked"] >= 3, (who, r)
    assert d02_applied and len(d02_applied) == len(set(d02_applied))  # it took part, each update once
    assert s["cloud"]["stop_reason"].startswith("time limit")
    assert s["d00"]["stop_reason"] == "parent finished"
