"""bench/scale.py, bounded for CI: a real deployment from `deploy init` (TLS, passwords, ACLs,
signatures) on Mosquitto, 2 edges, 20 synthetic devices. Every update a device publishes must be
applied by its edge and acknowledged, and the row must carry every figure the full run reports.
More updates per edge than the staleness bound: a bench bug once had devices refused as stale."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_deploy import mosquitto_binary

pytestmark = pytest.mark.mosquitto
ROOT = Path(__file__).resolve().parents[1]


def test_scale_bench_applies_and_acks_every_update(tiny_bundle):
    mosquitto_binary()  # skips off CI without mosquitto, fails in CI
    out = subprocess.run([sys.executable, "bench/scale.py", "--bundle", str(tiny_bundle), "--devices", "12,20",
                          "--edges", "2", "--interval", "2", "--duration", "8", "--workers", "2", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["devices"] for r in rows] == [12, 20]
    for r in rows:
        # each device publishes at a random phase in its first interval, then every 2 s: 4 per device in
        # 8 s, so an edge of 10 devices applies 40: more than the default staleness bound of 20 versions
        # (synthetic devices never move their base version; the bench must still get every one applied)
        assert r["published"] == 4 * r["devices"], r
        assert r["applied"] == r["published"] and r["unacked_at_end"] == 0 and r["not_applied"] == {}, r
        assert 0 < r["p50_ms"] <= r["p99_ms"] < 5000, r
        assert r["edge_cpu_ms_per_update"] > 0 and r["broker_cpu_pct"] >= 0, r
        assert r["work_dir"] is None  # the deployment's secrets are not left behind
    assert "one edge process served 10 devices" in out.stdout
