"""`tomtit demo --topology field`: the demo as a secured field deployment on one machine: one
Mosquitto per edge bridged to the cloud's, TLS, passwords, ACLs and signed messages, devices
talking only to their edge's broker."""
from __future__ import annotations

import json

import pytest

from conftest import run_tomtit

pytestmark = pytest.mark.mosquitto


def test_the_demo_runs_as_a_field_deployment(tmp_path, tiny_model, tiny_data):
    from test_deploy import mosquitto_binary

    mosquitto_binary()  # fails in CI, skips elsewhere, when Debian's mosquitto is missing
    out = tmp_path / "demo"
    r = run_tomtit(["demo", "--topology", "field", "--model", str(tiny_model), "--data", str(tiny_data),
                    "--devices", "2", "--edges", "1", "--max-len", "16", "--max-minutes", "0.75",
                    "--target-accuracy", "0.99", "--out", str(out), "--json"], timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "field topology: 2 Mosquitto brokers" in r.stderr  # --json: progress on stderr...
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(r.stdout) == summary  # ...and stdout is the summary alone
    assert summary["cloud"]["updates_accepted"] >= 1  # the edge's pushes crossed the bridge
    assert summary["edges"]["edge0"]["pushes_up"] >= 1
    assert all(d["syncs"] >= 1 for d in summary["devices"].values())
    # the default demo: emulated boards on emulated links, named and metered as such
    assert [(d["board"], d["link"], d["energy_kind"]) for d in summary["devices"].values()] == [
        ("pi4", "wifi", "emulated"), ("pi4", "lte-m", "emulated")]
    # ...and it ends with a report, the final adapter as PEFT, and held-out texts classified with it
    assert (out / "report.html").is_file() and (out / "sync_intervals.png").is_file()
    assert (out / "final-adapter-peft" / "adapter_config.json").is_file()
    assert summary["inference"] and all(row["predicted"] for row in summary["inference"])
    import tomllib

    def broker_of(ident: str) -> str:
        return tomllib.loads((out / "deployment" / "credentials" / f"{ident}.toml").read_text())["mqtt"]["broker"]

    # TLS everywhere; the devices and their edge on the edge's own broker, the cloud on another
    assert broker_of("dev00").startswith("mqtts://127.0.0.1:")
    assert broker_of("dev00") == broker_of("dev01") == broker_of("edge0") != broker_of("cloud")
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "signature" not in logs  # everything signed and verified, nothing refused
    assert "lost connection" not in (out / "logs" / "dev00.log").read_text()
