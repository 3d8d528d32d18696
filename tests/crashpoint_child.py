"""Child process of the crash-point test (tests/test_crashpoint.py): an edge node and a device
with their real write paths (node checkpoint, device state, outbox), in one process over an
in-memory broker, looping until SIGKILLed. At every start it first checks, from what is on
disk, that everything loads and that the ledger holds, prints one JSON line, then runs.

The ledger: before staging an update the device appends its id and delta to `audit.log`
(fsynced), and after staging it appends "staged". So at any restart:
- exactly once: the node's model equals the sum of the deltas of the update ids it has applied
  (`seen`), each counted once (K=1, no staleness discount, server_lr 1: the model is that sum);
- nothing acknowledged lost: an update that was staged and is no longer in the device's outbox
  was acknowledged, so the node must have applied it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import device_runtime.uplink as uplink_mod  # noqa: E402
from device_runtime.adapter import flatten  # noqa: E402
from device_runtime.agent import DeviceAgent, DeviceConfig  # noqa: E402
from device_runtime.scheduler import make_scheduler  # noqa: E402
from edge_broker.aggregation import make_strategy  # noqa: E402
from edge_broker.node import Node, NodeConfig  # noqa: E402
from fedkit import SIZE, CountingMeter, DummyBatches, QuadraticTrainer, synthetic_manifest  # noqa: E402
from tomtit.transport import MemoryBroker  # noqa: E402

JOB = "crash"


def main(root: Path) -> int:
    audit_path = root / "audit.log"
    manifest = synthetic_manifest()
    real_stage = uplink_mod.stage_update

    def audited_stage(msg, *args, **kw):
        delta = flatten(dict(msg.tensors), manifest.trainable)
        with open(audit_path, "a") as fh:
            fh.write(json.dumps({"uid": msg.update_id, "delta": delta.tolist()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        out = real_stage(msg, *args, **kw)
        with open(audit_path, "a") as fh:
            fh.write(json.dumps({"staged": msg.update_id}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return out

    uplink_mod.stage_update = audited_stage

    # A state file that fails to load is logged and the device starts from scratch (the right
    # thing on a board); here it would hide exactly what this test looks for, so it is collected.
    load_errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            load_errors.append(record.getMessage())

    collector = Collect(logging.WARNING)
    for name in ("device_runtime", "edge_broker", "tomtit"):
        logging.getLogger(name).addHandler(collector)

    broker = MemoryBroker()
    # K=1 and no staleness discount: the model is exactly the sum of what was applied
    buffer = make_strategy("fedbuff", k_updates=1, max_wait_s=1e9, staleness_exponent=0.0,
                           max_staleness=10**9)
    node = Node(NodeConfig(node_id="edge", job=JOB), manifest=manifest, initial_adapter=np.zeros(SIZE, np.float32),
                buffer=buffer, transport=broker.client("edge"), state_dir=root / "edge")
    agent = DeviceAgent(
        DeviceConfig(device_id="d1", parent="edge", job=JOB, codec="f32", wait_for_model_s=0.0, resend_after_s=0.05,
                     checkpoint_every=3),
        manifest=manifest, trainer=QuadraticTrainer(np.linspace(-1, 1, SIZE).astype(np.float32), lr=0.05),
        batches=DummyBatches(), num_samples=10, meter=CountingMeter(), scheduler=make_scheduler("fixed:2"),
        transport=broker.client("d1"), state_dir=root / "d1")

    # -- the checks, on what the restart loaded -------------------------------------------------
    deltas, staged = {}, set()
    if audit_path.exists():
        for line in audit_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line: killed mid-append, before that update was staged
            if "uid" in rec:
                deltas[rec["uid"]] = np.array(rec["delta"], np.float32)
            else:
                staged.add(rec["staged"])
    applied = list(node.seen)
    expected = np.zeros(SIZE, np.float32)
    for uid in applied:
        expected = expected + deltas[uid]  # float32, in the order the node applied them
    pending = set(agent.outbox.ids())
    acked = staged - pending
    report = {
        "applied": len(applied), "staged": len(staged), "pending": len(pending), "version": node.version,
        "model_matches_ledger": bool(np.allclose(node.model, expected, rtol=1e-5, atol=1e-6)),
        "applied_once": len(applied) == len(set(applied)) and node.version == len(applied),
        "acked_lost": sorted(acked - set(applied)),
        "unknown_applied": sorted(set(applied) - set(deltas)),
    }
    report["device_steps"] = agent.stats.steps  # resumed, not restarted: it only grows
    report["load_errors"] = list(load_errors)
    print(json.dumps(report), flush=True)
    for name in ("device_runtime", "edge_broker", "tomtit"):
        logging.getLogger(name).removeHandler(collector)  # what the run logs later is not about loading
    if len(sys.argv) > 2 and sys.argv[2] == "check":
        return 0

    agent._on_connection_change()
    node.run_once(timeout=0)
    while True:  # until SIGKILL
        agent.step()
        node.run_once(timeout=0)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
