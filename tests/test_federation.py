"""End to end over a real Mosquitto: cloud + 2 edges + 4 devices, each its own process, two of
the devices on the portable training backend and two on ORT's training API.

A real pre-trained BERT (MiniLM-L6's first two layers, for speed) fine-tunes on BBC News split
non-IID over the devices. Mid-run one edge is SIGKILLed and restarted from its checkpoint, and a
rogue client publishes garbage to the cloud. The cloud's held-out accuracy must rise well above
the untrained head's, the edges must push upward at moments of their own, and the run finishes.
"""
import json
import signal
import time

import pytest

from conftest import run_tomtit, spawn_tomtit
from tomtit.mqtt import MqttOptions, MqttTransport
from tomtit.wire import Topics

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
JOB = "fed"


def _summary(path):
    return json.loads(path.read_text()) if path.is_file() else None


def test_hierarchical_federation_end_to_end(tmp_path, mosquitto, small_bbc_bundle):
    split = tmp_path / "split"
    r = run_tomtit(["data", "split", "--data", "bbc-news", "--devices", "4", "--alpha", "0.5", "--seed", "1",
                    "--test-fraction", "0.2", "--out", str(split)])
    assert r.returncode == 0, r.stderr
    common = ["--bundle", str(small_bbc_bundle), "--broker", mosquitto.url, "--job", JOB]
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = {}
    cloud_summary = tmp_path / "cloud.json"
    # The schedulers reach edges and devices through the run configuration the cloud publishes.
    procs["cloud"] = spawn_tomtit(["node", "run", "--id", "cloud", *common, "--strategy", "fedbuff", "--k", "2",
                                   "--device-scheduler", "marginal:tau_min=5,tau_max=25",
                                   "--edge-scheduler", "marginal:tau_min=2,tau_max=6", "--eval-data", str(split / "test.jsonl"), "--target-accuracy", "0.75",
                                   "--max-minutes", "6", "--state-dir", str(tmp_path / "s-cloud"),
                                   "--summary", str(cloud_summary)], logs / "cloud.log")
    edge_args = {}
    for e in ("edge1", "edge2"):
        edge_args[e] = ["node", "run", "--id", e, "--parent", "cloud", *common, "--strategy", "fedbuff", "--k", "2",
                        "--max-wait", "20",
                        "--state-dir", str(tmp_path / f"s-{e}"), "--summary", str(tmp_path / f"{e}.json")]
        procs[e] = spawn_tomtit(edge_args[e], logs / f"{e}.log")
    for i in range(4):
        edge = "edge1" if i < 2 else "edge2"
        procs[f"dev{i}"] = spawn_tomtit(
            ["device", "run", "--id", f"dev{i}", "--parent", edge, *common, "--data", str(split / f"device-0{i}.jsonl"),
             "--lr", "2e-3", "--energy", "model:rpi4",
             # half the devices train on the portable step graph, half on ORT's training API
             "--backend", "portable" if i % 2 == 0 else "ort-training",
             "--state-dir", str(tmp_path / f"s-dev{i}"), "--summary", str(tmp_path / f"dev{i}.json")],
            logs / f"dev{i}.log")
    try:
        # Wait for the first aggregations in edge1's log, then SIGKILL it and bring it back.
        deadline = time.monotonic() + 240
        while ("aggregated" not in (logs / "edge1.log").read_text()
               or "untrained head" not in (logs / "cloud.log").read_text()):
            assert time.monotonic() < deadline, "edge1 never aggregated"
            assert procs["cloud"].poll() is None, (logs / "cloud.log").read_text()[-3000:]
            time.sleep(0.5)
        # A rogue client publishes garbage where an edge's updates go: rejected, model untouched.
        rogue = MqttTransport(MqttOptions(url=mosquitto.url, client_id="rogue")).start()
        assert rogue.wait_connected(10)
        rogue.publish(Topics(JOB).up("cloud", "rogue"), b"\x00\x01 not a safetensors message")
        rogue.flush()
        rogue.close()
        time.sleep(3)
        procs["edge1"].send_signal(signal.SIGKILL)
        procs["edge1"].wait(10)
        procs["edge1"] = spawn_tomtit(edge_args["edge1"], logs / "edge1.log")
        # The run ends by itself: the cloud stops (target or time), then "finished" propagates.
        assert procs["cloud"].wait(timeout=420) == 0
        for name, p in procs.items():
            assert p.wait(timeout=60) == 0, f"{name} exited {p.returncode}: " + (logs / f"{name}.log").read_text()[-2000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    cloud = _summary(cloud_summary)
    untrained = cloud["accuracy"][0]["accuracy"]
    best = max(a["accuracy"] for a in cloud["accuracy"])
    print(f"cloud: untrained {untrained:.3f} -> best {best:.3f}, {cloud['final_version']} versions, "
          f"stop: {cloud['stop_reason']}")
    assert untrained < 0.4
    assert best >= untrained + 0.3, cloud["accuracy"]
    assert cloud["updates_rejected"].get("not_safetensors", 0) >= 1
    arrivals = cloud["child_arrivals"]
    assert set(arrivals) >= {"edge1", "edge2"}
    t1 = [t for t, _ in arrivals["edge1"]]
    t2 = [t for t, _ in arrivals["edge2"]]
    assert t1 != t2 and len(t1) >= 2 and len(t2) >= 2  # each edge chose its own moments
    assert "resumed from checkpoint" in (logs / "edge1.log").read_text()
    assert "run configuration from the cloud: edge scheduler marginal:tau_min=2,tau_max=6" in (logs / "edge2.log").read_text()
    assert "tau in [5, 25]" in (logs / "dev0.log").read_text()  # the device scheduler the cloud published
    for i in range(4):
        dev = _summary(tmp_path / f"dev{i}.json")
        assert dev["stop_reason"] == "parent finished" and dev["syncs"] >= 1
        assert dev["backend"] == ("portable" if i % 2 == 0 else "ort-training")
