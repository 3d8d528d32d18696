"""Power loss, approximated by SIGKILL at random instants in the write paths: an edge node and a
device (tests/crashpoint_child.py) are killed 60 times mid-run and restarted on the same state.
After every restart the state must load and the ledger must hold: the node's model is exactly
the sum of the updates it applied, each once, and no update the device saw acknowledged is
missing from the node. (SIGKILL loses what was not written; the directory fsync after each
rename, which only a real power cut tests, is checked in test_fsutil.py.)"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).with_name("crashpoint_child.py")
KILLS = 60


def _start(root: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(CHILD), str(root), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=str(ROOT), text=True)


def _report(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, f"the child printed no report: {proc.stderr.read() if proc.poll() is not None else ''}"
    return json.loads(line)


def test_sigkill_at_random_instants_never_breaks_the_state_or_the_ledger(tmp_path):
    rng = random.Random(1234)
    reports = []
    for _ in range(KILLS):
        proc = _start(tmp_path)
        reports.append(_report(proc))
        time.sleep(rng.uniform(0.02, 0.4))  # mid-run: nearly all of the loop is writing state
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    final = _start(tmp_path, "check")
    reports.append(_report(final))
    assert final.wait(30) == 0
    for i, r in enumerate(reports):
        assert r["model_matches_ledger"], (i, r)
        assert r["applied_once"], (i, r)
        assert r["acked_lost"] == [] and r["unknown_applied"] == [], (i, r)
        assert r["load_errors"] == [], (i, r)  # every restart resumed from its state files
    steps = [r["device_steps"] for r in reports]
    assert steps == sorted(steps) and steps[-1] > 0, steps  # a device that restarted from scratch would drop
    applied = [r["applied"] for r in reports]
    assert applied == sorted(applied)  # the ledger only grows: nothing applied is ever forgotten
    assert applied[-1] >= 3 * KILLS, applied[-1]  # the run made progress between kills
