"""One real device process against a scripted parent over a real Mosquitto (no persistence).

The parent goes offline for a while, the device is SIGKILLed and restarted, and the broker is
restarted (losing every queue): still every update the device made reaches the parent, and each
update_id is applied exactly once.
"""
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import spawn_tomtit
from device_runtime.adapter import load_adapter, unflatten
from tomtit.manifest import load_manifest
from tomtit.mqtt import MqttOptions, MqttTransport
from tomtit.wire import (Ack, ModelMessage, Reassembler, Topics, decode_message, encode_ack, encode_message,
                         is_chunk)

pytestmark = pytest.mark.mosquitto
JOB = "itest"
T = Topics(JOB)


class ScriptedParent:
    """Publishes a retained model, collects updates, acks them; can go offline and come back."""

    def __init__(self, url: str, bundle: Path):
        self.url = url
        self.manifest = load_manifest(bundle)
        self.model = load_adapter(bundle / "adapter_init.safetensors", self.manifest)
        self.applied: list[str] = []
        self.duplicates = 0
        self.deltas: list[np.ndarray] = []
        self.reassembler = Reassembler(timeout_s=60, max_total_bytes=1 << 26)
        self._stop = threading.Event()
        self._thread = None
        self.transport = None

    def online(self):
        self.transport = MqttTransport(MqttOptions(url=self.url, client_id="scripted-parent")).start()
        assert self.transport.wait_connected(10)
        self.transport.subscribe(T.up_filter("edge"))
        self.transport.publish(T.down("edge"), encode_message(ModelMessage(
            kind="model", sender="edge", job=JOB, bundle_id=self.manifest.bundle_id, base_version=0, version=1,
            num_samples=0, local_steps=0, train_loss=0.0, energy_j=0.0, is_delta=False, created_at=time.time(),
            tensors=unflatten(self.model, self.manifest.trainable))), retain=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def offline(self):
        self._stop.set()
        self._thread.join()
        self.transport.close()  # clean disconnect: the broker keeps our session and queues for it

    def _loop(self):
        while not self._stop.is_set():
            msg = self.transport.get(0.1)
            if msg is None:
                continue
            payload = msg.payload
            if is_chunk(payload):
                payload = self.reassembler.add(payload, time.time())
                if payload is None:
                    continue
            _, child = T.parse_up(msg.topic)
            up = decode_message(payload, expected=self.manifest.trainable, bundle_id=self.manifest.bundle_id,
                                max_bytes=1 << 26, expect_kind="update", expect_sender=child, expect_job=JOB)
            if up.update_id in self.applied:
                self.duplicates += 1
                status = "duplicate"
            else:
                self.applied.append(up.update_id)
                self.deltas.append(np.concatenate([np.ravel(v) for v in up.tensors.values()]))
                status = "applied"
            self.transport.publish(T.ack("edge", child), encode_ack(Ack(update_id=up.update_id, status=status)))


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_device_loses_nothing_through_parent_outage_kill_and_broker_restart(tmp_path, mosquitto, tiny_bundle, tiny_data):
    state = tmp_path / "state"
    device_args = ["device", "run", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--broker", mosquitto.url,
                   "--parent", "edge", "--id", "dev1", "--job", JOB, "--scheduler", "fixed:40", "--lr", "1e-2",
                   "--resend-after", "2", "--state-dir", str(state), "--energy", "model:rpi4"]
    parent = ScriptedParent(mosquitto.url, tiny_bundle)
    parent.online()
    log = tmp_path / "device.log"
    dev = spawn_tomtit(device_args, log)
    try:
        wait_until(lambda: len(parent.applied) >= 3, 120, "first updates")
        # 1. The parent goes away; the device keeps training and sending (the broker queues).
        parent.offline()
        n_before = len(parent.applied)
        time.sleep(2)
        # 2. The device is killed hard while updates wait for acks, then restarted.
        dev.send_signal(signal.SIGKILL)
        dev.wait(10)
        pending = sorted(p.stem for p in (state / "outbox").glob("*.msg"))
        assert pending, "expected unacknowledged updates in the outbox at the kill"
        parent.online()
        dev = spawn_tomtit(device_args, log)
        wait_until(lambda: set(pending) <= set(parent.applied), 60, "re-sent updates after the restart")
        # 3. The broker restarts without persistence: every queue and session is gone.
        n_mid = len(parent.applied)
        mosquitto.restart()
        wait_until(lambda: len(parent.applied) >= n_mid + 3, 120, "updates after the broker restart")
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(30) == 0
        time.sleep(1)  # last acks in flight
    finally:
        if dev.poll() is None:
            dev.kill()
        parent._stop.set()
    text = log.read_text()
    assert "resumed at step" in text
    from safetensors import safe_open
    with safe_open(str(state / "device-state.safetensors"), "np") as f:
        saved = {k: int(v) for k, v in f.metadata().items() if k in ("syncs", "steps")}
    left = {p.stem for p in (state / "outbox").glob("*.msg")}
    applied = parent.applied
    assert len(applied) == len(set(applied)), "an update was applied twice"
    # Nothing lost: every update the device ever made was applied or is still in its outbox.
    assert len(set(applied) | left) == saved["syncs"]
    assert n_before >= 3 and len(applied) > n_mid
    for d in parent.deltas:
        assert np.all(np.isfinite(d))
