"""A deployment from `tomtit deploy init`, run for real: Mosquitto with the generated TLS, password
and ACL config; a cloud, an edge and a device started with nothing but `--credentials` (and the
bundle and data). Their updates and models are signed end to end. Then the broker is assumed
compromised: a forged model (right topic, the edge's own login, a key that is not the edge's)
and an unsigned update (the device's own login) are delivered, and both are refused for their
signature while the federation goes on."""
from __future__ import annotations

import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import spawn_tomtit, wait_for
from test_deploy import deploy, read_creds, run_broker

JOB = "default"
pytestmark = pytest.mark.mosquitto


def _client(port: int, creds: dict, ca):
    from tomtit.mqtt import MqttOptions, MqttTransport

    t = MqttTransport(MqttOptions(url=f"mqtts://127.0.0.1:{port}", client_id=f"probe-{creds['identity']['id']}",
                                  username=creds["mqtt"]["username"], password=creds["mqtt"]["password"],
                                  tls_ca=str(ca), persistent=False)).start()
    assert t.wait_connected(10)
    return t


def test_a_signed_federation_runs_on_credentials_alone_and_refuses_forgeries(tmp_path, tiny_bundle, tiny_data):
    from edge_broker.brokers import free_port
    from tomtit.manifest import load_manifest
    from device_runtime.adapter import unflatten
    from tomtit.signing import Signer
    from tomtit.wire import ModelMessage, Topics, encode_message

    port = free_port()
    dep = tmp_path / "dep"
    rc, _, err = deploy("--out", str(dep), "--devices", "1", "--edges", "1", "--host", "127.0.0.1",
                        "--port", str(port))
    assert rc == 0, err
    creds = {i: dep / "credentials" / f"{i}.toml" for i in ("cloud", "e0", "d00")}
    logs = {i: tmp_path / f"{i}.log" for i in creds}
    common = ["--bundle", str(tiny_bundle), "--state-dir"]
    procs = {}
    with run_broker(dep / "brokers" / "cloud" / "mosquitto.conf", port, tmp_path / "broker.log"):
        try:
            procs["cloud"] = spawn_tomtit(["node", "run", "--credentials", str(creds["cloud"]), *common,
                                           str(tmp_path / "s-cloud"), "--k", "1", "--device-scheduler", "fixed:4",
                                           "--edge-scheduler", "fixed:1"], logs["cloud"])
            procs["e0"] = spawn_tomtit(["node", "run", "--credentials", str(creds["e0"]), *common,
                                        str(tmp_path / "s-e0")], logs["e0"])
            procs["d00"] = spawn_tomtit(["device", "run", "--credentials", str(creds["d00"]), *common,
                                         str(tmp_path / "s-d00"), "--data", str(tiny_data), "--lr", "1e-2"],
                                        logs["d00"])
            # signed end to end: the edge applies the device's updates and the cloud the edge's pushes
            wait_for(lambda: "aggregated" in logs["cloud"].read_text() and "merged parent model" in logs["e0"].read_text(),
                  120, "signed updates reaching the cloud", logs.values())
            assert "signature" not in logs["e0"].read_text() + logs["cloud"].read_text()

            t = Topics(JOB)
            ca = dep / "ca" / "ca.crt"
            m = load_manifest(tiny_bundle)
            forged = encode_message(ModelMessage(
                kind="model", sender="e0", job=JOB, bundle_id=m.bundle_id, base_version=0, version=10**6,
                num_samples=0, local_steps=0, train_loss=0.0, energy_j=0.0, is_delta=False, created_at=time.time(),
                tensors=unflatten(np.full(m.buffer_size, 3.0, np.float32), m.trainable)))
            # the edge's own login (a compromised broker or ACL), a key that is not the edge's
            edge_login = _client(port, read_creds(dep, "e0"), ca)
            edge_login.publish(t.down("e0"), Signer("e0", Ed25519PrivateKey.generate()).sign(forged), retain=False)
            # the device's own login, an update without a signature
            from fedkit import update_bytes

            _, unsigned = update_bytes(np.zeros(m.buffer_size, np.float32), sender="d00", manifest=m, job=JOB)
            dev_login = _client(port, read_creds(dep, "d00"), ca)
            dev_login.publish(t.up("e0", "d00"), unsigned)
            wait_for(lambda: "bad signature from 'e0'" in logs["d00"].read_text()
                  and "signature" in logs["e0"].read_text(), 60, "both forgeries refused", logs.values())
            n = logs["cloud"].read_text().count("aggregated")
            wait_for(lambda: logs["cloud"].read_text().count("aggregated") > n, 60, "the federation going on",
                  logs.values())
            assert "v1000000" not in logs["d00"].read_text()
            for p in procs.values():
                assert p.poll() is None, "a process died"
            for c in (edge_login, dev_login):
                c.close()
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
            for p in procs.values():
                try:
                    p.wait(20)
                except Exception:
                    p.kill()
