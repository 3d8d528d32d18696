"""`tomtit simulate`: scenario validation, the virtual network's timing and energy, and a tiny
end-to-end comparison on the tiny model that must give the same summary twice."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tomtit.sim.config import Link, ScenarioError, load_profiles, load_scenario, scenario_from_dict
from tomtit.sim.network import Endpoint, SimNetwork
from tomtit.sim.engine import VirtualClock

PROFILES = load_profiles()


@pytest.mark.parametrize("name", ["mixed", "skewed", "costly-links", "equal", "churn", "many", "tiny"])
def test_every_shipped_scenario_loads(name):
    sc = load_scenario(name, PROFILES)
    assert sc.devices >= 1 and sc.name == name


def test_many_has_at_least_50_devices_and_costly_links_has_costly_links():
    assert load_scenario("many", PROFILES).devices >= 50
    sc = load_scenario("costly-links", PROFILES)
    links = {sc.link_of(i, PROFILES).name for i in range(sc.devices)}
    assert {"nb-iot", "wifi"} <= links


@pytest.mark.parametrize("raw,field", [
    ({"devicez": 4}, "devicez"),
    ({"devices": 4, "edges": 5}, "edges"),
    ({"alpha": 0}, "alpha"),
    ({"alpha": "x"}, "alpha"),
    ({"devices": 2.5}, "devices"),
    ({"boards": "pi9:2"}, "pi9"),
    ({"links": "wifi:0"}, "wifi"),
    ({"target_fraction": 1.5}, "target_fraction"),
    ({"events": [{"t": 1, "kind": "explode", "device": "d00"}]}, "kind"),
    ({"events": [{"t": 1, "kind": "leave", "device": "d99"}]}, "device"),
    ({"events": [{"t": 1, "kind": "battery", "device": "d00", "value": 3}]}, "value"),
    ({"events": [{"t": 1, "kind": "link", "device": "d00", "value": "carrier-pigeon"}]}, "value"),
    ({"events": [{"t": 1, "kind": "leave", "device": "d00", "when": 3}]}, "when"),
])
def test_a_bad_scenario_gets_one_error_naming_the_field(raw, field):
    with pytest.raises(ScenarioError, match=field):
        scenario_from_dict(raw, "bad").check(PROFILES)


def test_a_bad_scenario_file_is_reported_by_the_cli(tmp_path):
    from tomtit.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("devices = 4\nedges = 2\nwat = 1\n")
    assert main(["simulate", "--scenario", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert main(["simulate", "--scenario", "no-such-scenario", "--out", str(tmp_path / "o")]) == 2


def test_network_time_and_radio_energy_follow_the_link_profiles():
    link_a = Link("a", up_mbps=1.0, down_mbps=2.0, j_per_mb_up=10.0, j_per_mb_down=4.0, latency_s=0.5, source="")
    link_b = Link("b", up_mbps=8.0, down_mbps=4.0, j_per_mb_up=1.0, j_per_mb_down=2.0, latency_s=0.1, source="")
    net = SimNetwork()
    ca, cb = VirtualClock(10.0), VirtualClock(0.0)
    spent = {"a": 0.0, "b": 0.0}
    ta = net.attach(Endpoint("a", "device", link_a, ca, on_link_joules=lambda j: spent.__setitem__("a", spent["a"] + j)))
    tb = net.attach(Endpoint("b", "edge", link_b, cb, on_link_joules=lambda j: spent.__setitem__("b", spent["b"] + j)))
    tb.subscribe("x/#")
    payload = b"\0" * 250_000  # 2 Mbit
    ta.publish("x/1", payload)
    ta.publish("x/2", payload)  # queued behind the first on a's uplink
    # first: 10 + 2 s up + 0.5 latency + 0.5 s down (2 Mbit at 4) + 0.1 latency
    assert net.next_time() == pytest.approx(10 + 2 + 0.5 + 0.5 + 0.1)
    d1 = net.pop()
    d2 = net.pop()
    assert d1.topic == "x/1" and d2.topic == "x/2"
    assert d2.t == pytest.approx(10 + 4 + 0.5 + 0.5 + 0.1)  # up link busy until 14; b's downlink free by then
    assert spent["a"] == pytest.approx(2 * 10.0 * 0.25) and spent["b"] == pytest.approx(2 * 2.0 * 0.25)
    assert tb.get().topic == "x/1" and tb.get().topic == "x/2" and tb.get() is None


def test_a_newer_model_replaces_one_still_queued_for_a_slow_downlink():
    slow = Link("slow", up_mbps=1.0, down_mbps=0.1, j_per_mb_up=0.0, j_per_mb_down=1.0, latency_s=0.0, source="")
    fast = Link("fast", up_mbps=1000.0, down_mbps=1000.0, j_per_mb_up=0.0, j_per_mb_down=0.0, latency_s=0.0, source="")
    net = SimNetwork()
    edge_clock = VirtualClock(0.0)
    edge = net.attach(Endpoint("e", "edge", fast, edge_clock))
    dev = net.attach(Endpoint("d", "device", slow, VirtualClock(0.0)))
    dev.subscribe("down")
    for v in range(3):  # three models, 1 s apart; each takes 8 s on the slow downlink
        edge_clock.t = float(v)
        edge.publish("down", bytes([v]) * 100_000, retain=True)
    got = []
    while net.next_time() is not None:
        got.append(net.pop().payload[0])
    assert got == [0, 2]  # v0 was already on the air; v1 was replaced by v2 before it started


@pytest.mark.slow
def test_tiny_simulation_writes_its_folder_and_is_deterministic(tmp_path, tiny_bundle, tiny_data):
    from tomtit.sim.runner import simulate

    sc = load_scenario("tiny", PROFILES)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        simulate([sc], bundle=str(tiny_bundle), data=str(tiny_data), out=out, seeds=1, workers=1,
                 methods=("hierfavg", "async-fixed", "ours"))
        outs.append(out)
    for f in ("summary.json", "report.md", "tiny/accuracy_vs_time.png", "tiny/accuracy_vs_energy.png",
              "tiny/sync_intervals.png", "tiny/bytes_per_tier.png", "tiny/report.md"):
        assert (outs[0] / f).is_file(), f

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("wall_s",)}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    a, b = (strip(json.loads((o / "summary.json").read_text())) for o in outs)
    assert a == b
    s = a["scenarios"]["tiny"]
    assert set(s["methods"]) == {"hierfavg", "async-fixed", "ours"}
    assert s["grid"]["hierfavg"] and s["grid"]["ours"] == ["ours (marginal, untuned)"]
    for m in s["methods"].values():
        r = m["per_seed"][0]
        assert r["real_steps"] > 0 and r["bytes"]["device_up"] > 0
    ours = next(r for r in s["runs"] if r["method"] == "ours")
    assert all(d["joules"] > 0 for d in ours["devices"])
    assert s["target"]["target_accuracy"] == pytest.approx(round(0.9 * a["central"]["best_accuracy"], 4))
    hier = next(r for r in s["runs"] if r["method"] == "hierfavg")
    assert sum(d["idle_j"] for d in hier["devices"]) > 0  # synchronous rounds wait, and waiting costs idle power
    assert sum(d["idle_j"] for d in ours["devices"]) == pytest.approx(0, abs=5.0)  # asynchronous: only the start

    # `tomtit report` on a real simulate output: a self-contained page embedding every plot
    from tomtit.cli import main

    assert main(["report", str(outs[0])]) == 0
    page = (outs[0] / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(outs[0].glob("tiny/*.png"))) == 4



def test_paced_evaluation_scores_a_held_model_at_its_own_publish_time():
    import numpy as np

    from edge_broker.observers import EvaluateAndStop
    from tomtit.sim.engine import _PacedEvaluation

    scored = []

    def evaluator(model):
        scored.append(float(model[0]))
        return float(model[0]), 0.0  # the "accuracy" is written in the model

    energy = [0.0]
    inner = EvaluateAndStop(evaluator, target_accuracy=0.9)
    paced = _PacedEvaluation(inner, every_s=0.5, device_energy=lambda: energy[0])

    def publish(version, acc, t, joules):
        energy[0] = joules
        return paced.on_model(version, np.array([acc]), t)

    assert publish(0, 0.1, 0.0, 0.0) is None and paced.due() is None  # scored at once
    assert publish(1, 0.5, 0.1, 10.0) is None  # within 0.5 s of the last score: held
    assert publish(2, 0.95, 0.3, 30.0) is None  # replaces the held one
    assert paced.due() == pytest.approx(0.5)
    energy[0] = 99.0  # the flush comes later; the score keeps the publish-time energy
    assert paced.flush() == "target accuracy 0.9 reached"
    assert scored == [0.1, 0.95]  # version 1 was never scored
    assert [h["t"] for h in inner.history] == [0.0, 0.3]
    assert [h["version"] for h in inner.history] == [0, 2]
    assert paced.energy_at == [0.0, 30.0]
    assert paced.due() is None and paced.flush() is None
    # the next model 0.5 s after the last *scored* publish time is scored at once
    assert publish(3, 0.2, 0.8, 40.0) is None and len(inner.history) == 3 and paced.due() is None


def test_a_poisoned_device_and_the_aggregation_strategy_reach_the_real_nodes(tiny_bundle, tiny_data):
    """The testbed for poisoning studies: a `poison` event makes a device send factor x its true
    update (well-formed messages, valid sender); `strategy` picks the edges' aggregation."""
    import dataclasses

    from tomtit.sim.config import Event
    from tomtit.sim.engine import run_setting
    from tomtit.sim.methods import grids
    from tomtit.sim.runner import build_world, device_shards

    base = dataclasses.replace(load_scenario("tiny", PROFILES), devices=6, edges=1, events=(), max_device_steps=150)
    world = build_world(str(tiny_bundle), str(tiny_data), test_fraction=base.test_fraction,
                        eval_examples=base.eval_examples)
    setting = grids(6, 1)["async-fixed"][0]

    def run(**changes):
        sc = dataclasses.replace(base, **changes).check(PROFILES)
        return run_setting(world, sc, PROFILES, setting, 0, device_shards(world, sc, 0), None)

    clean = run()
    scaled = run(events=(Event(t=0.0, kind="poison", device="d00", value="scale:1e6"),))
    assert not clean["rejected"]
    assert scaled["rejected"]["e0"]["norm"] >= 1  # 1e6 x a real step breaks the node's norm bound
    trimmed = run(strategy="trimmed")  # buffers 5 updates per aggregation where fedbuff takes 3
    assert trimmed["syncs"] == clean["syncs"]
    agg = lambda r: r["edges"][0]["aggregations"]  # noqa: E731
    assert agg(trimmed) <= trimmed["syncs"] // 5 < clean["syncs"] // 3 <= agg(clean) + 1
    # clip_norm reaches the edges' buffers: clipped to 1e-9, no update moves the global model
    scored: list[np.ndarray] = []
    evaluate = world.evaluator

    def recording_evaluator(adapter):
        scored.append(np.array(adapter, copy=True))
        return evaluate(adapter)

    world.evaluator = recording_evaluator
    initial = world.base_trainer.get_adapter()
    clipped = run(clip_norm=1e-9)
    assert clipped["syncs"] > 0 and clipped["global_versions"] > 1 and len(scored) > 1
    assert max(float(np.abs(a - initial).max()) for a in scored) < 1e-6
    scored.clear()
    run()  # the same run unclipped moves the model
    assert max(float(np.abs(a - initial).max()) for a in scored) > 1e-3
    for bad in (0.0, -1.0, "2", True):
        with pytest.raises(ScenarioError, match="clip_norm"):
            dataclasses.replace(base, clip_norm=bad).check(PROFILES)
    with pytest.raises(ScenarioError, match="strategy"):
        dataclasses.replace(base, strategy="fedavg").check(PROFILES)
    with pytest.raises(ScenarioError, match="poison"):
        dataclasses.replace(base, events=(Event(t=0.0, kind="poison", device="d00", value="double"),)).check(PROFILES)
