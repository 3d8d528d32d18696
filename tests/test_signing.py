"""End-to-end signatures: a forged model or update is refused even when the broker delivers it."""
from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime.agent import DeviceAgent, DeviceConfig
from edge_broker.aggregation import make_strategy
from edge_broker.node import Node, NodeConfig
from fedkit import SIZE, CountingMeter, DummyBatches, QuadraticTrainer, synthetic_manifest, update_bytes
from device_runtime.scheduler import make_scheduler
from tomtit.signing import Keyring, Signer, split_envelope
from tomtit.transport import MemoryBroker
from device_runtime.adapter import unflatten
from tomtit.wire import ModelMessage, Topics, WireError, decode_acks, decode_error, encode_message

JOB = "t"
T = Topics(JOB)


def signer(name: str) -> Signer:
    return Signer(name, Ed25519PrivateKey.generate())


def test_sign_and_verify_round_trip_and_every_forgery_fails():
    alice, mallory = signer("d01"), signer("d01")  # mallory claims alice's id with another key
    ring = Keyring({"d01": alice.public_key()})
    msg = b"safetensors bytes" * 100
    env = alice.sign(msg)
    assert ring.verify(env, expect_signer="d01") == msg
    cases = {
        "unsigned": msg,
        "other key": mallory.sign(msg),
        "flipped message bit": env[:-1] + bytes([env[-1] ^ 1]),
        "flipped signature bit": env[:20] + bytes([env[20] ^ 1]) + env[21:],
        "truncated": env[:30],
        "unknown signer": signer("d02").sign(msg),
    }
    for name, payload in cases.items():
        with pytest.raises(WireError) as e:
            ring.verify(payload, expect_signer=None if name == "unknown signer" else "d01")
        assert e.value.reason == "signature", name
    with pytest.raises(WireError, match="came from"):
        ring.verify(env, expect_signer="d02")  # alice's valid signature on another's topic
    assert split_envelope(env)[0] == "d01"


def _node(tmp_path, broker, keys):
    return Node(NodeConfig(node_id="edge", job=JOB), manifest=synthetic_manifest(),
                initial_adapter=np.zeros(SIZE, np.float32),
                buffer=make_strategy("fedbuff", k_updates=1, max_wait_s=1e9), transport=broker.client("edge"),
                state_dir=tmp_path / "edge", signer=keys["edge"], keyring=Keyring({"d1": keys["d1"].public_key()}))


def test_a_node_takes_only_updates_its_child_signed(tmp_path):
    keys = {"edge": signer("edge"), "d1": signer("d1")}
    broker = MemoryBroker()
    node = _node(tmp_path, broker, keys)
    node.run_once(timeout=0)
    c = broker.client("d1")
    c.subscribe(T.ack("edge", "d1"))
    c.subscribe(T.errors("edge"))
    m = synthetic_manifest()
    forged_uid, plain = update_bytes(np.full(SIZE, 0.5, np.float32), sender="d1", manifest=m, job=JOB)
    c.publish(T.up("edge", "d1"), plain)  # unsigned
    c.publish(T.up("edge", "d1"), signer("d1").sign(plain))  # signed with a key that is not d1's
    node.run_once(timeout=0)
    assert node.version == 0 and node.stats.rejected["signature"] == 2
    got = [x for x in iter(lambda: c.get(0), None)]
    assert [decode_error(x.payload).reason for x in got if "/errors/" in x.topic] == ["signature", "signature"]
    assert not [x for x in got if "/ack/" in x.topic]  # never acked
    uid, good = update_bytes(np.full(SIZE, 0.5, np.float32), sender="d1", manifest=m, job=JOB)
    c.publish(T.up("edge", "d1"), keys["d1"].sign(good))
    node.run_once(timeout=0)
    assert node.version == 1
    np.testing.assert_allclose(node.model, 0.5)
    edge_ring = Keyring({"edge": keys["edge"].public_key()})  # the node signs its acks too
    assert [(a.update_id, a.status) for x in iter(lambda: c.get(0), None) if "/ack/" in x.topic
            for a in decode_acks(edge_ring.verify(x.payload, expect_signer="edge"))] == [(uid, "applied")]


def test_a_device_adopts_only_models_its_parent_signed_and_signs_its_updates(tmp_path):
    keys = {"edge": signer("edge"), "d1": signer("d1")}
    broker = MemoryBroker()
    node = _node(tmp_path, broker, keys)
    node.run_once(timeout=0)
    meter = CountingMeter()
    agent = DeviceAgent(
        DeviceConfig(device_id="d1", parent="edge", job=JOB, codec="f32", wait_for_model_s=0.0,
                     resend_after_s=1e9),
        manifest=synthetic_manifest(), trainer=QuadraticTrainer(np.full(SIZE, 1.0, np.float32)),
        batches=DummyBatches(), num_samples=10, meter=meter, scheduler=make_scheduler("fixed:3"),
        transport=broker.client("d1"), state_dir=tmp_path / "d1",
        signer=keys["d1"], keyring=Keyring({"edge": keys["edge"].public_key()}))
    agent._on_connection_change()
    for _ in range(6):
        agent.step()
        node.run_once(timeout=0)
    assert agent.stats.models_adopted >= 1 and node.stats.accepted == 2 and not node.stats.rejected
    agent.drain_inbound()  # the genuine models already delivered
    adopted, base = agent.stats.models_adopted, agent.base_version
    # a forged model on the parent's topic (right topic, the parent's id, another key) is refused
    forged = encode_message(ModelMessage(
        kind="model", sender="edge", job=JOB, bundle_id=synthetic_manifest().bundle_id, base_version=0,
        version=99, num_samples=0, local_steps=0, train_loss=0.0, energy_j=0.0, is_delta=False, created_at=1.0,
        tensors=unflatten(np.full(SIZE, 7.0, np.float32), synthetic_manifest().trainable)))
    broker.client("mallory").publish(T.down("edge"), signer("edge").sign(forged), retain=True)
    for _ in range(3):
        agent.step()
    assert agent.stats.models_adopted == adopted and agent.base_version == base
    assert np.abs(agent.trainer.get_adapter()).max() < 2.0  # no 7.0 from the forged model


def test_a_device_drops_an_update_only_on_an_ack_its_parent_signed(tmp_path):
    """An ack makes a device delete the update from its outbox: a forged "applied" (from a
    compromised broker or bridge) would lose it for good, so acks are signed and checked."""
    from tomtit.wire import Ack, encode_acks

    keys = {"edge": signer("edge"), "d1": signer("d1")}
    broker = MemoryBroker()
    agent = DeviceAgent(
        DeviceConfig(device_id="d1", parent="edge", job=JOB, codec="f32", wait_for_model_s=0.0,
                     resend_after_s=1e9),
        manifest=synthetic_manifest(), trainer=QuadraticTrainer(np.full(SIZE, 1.0, np.float32)),
        batches=DummyBatches(), num_samples=10, meter=CountingMeter(), scheduler=make_scheduler("fixed:2"),
        transport=broker.client("d1"), state_dir=tmp_path / "d1",
        signer=keys["d1"], keyring=Keyring({"edge": keys["edge"].public_key()}))
    agent._on_connection_change()
    for _ in range(2):
        agent.step()
    (uid,) = agent.outbox.ids()  # sent; no node is running, so nothing acked it
    fake = encode_acks([Ack(uid, "applied", "", 1), Ack("f" * 32, "applied", "", 1)])
    mallory = broker.client("mallory")
    for forged in (fake, signer("edge").sign(fake), keys["d1"].sign(fake)):  # unsigned, wrong key, wrong signer
        mallory.publish(T.ack("edge", "d1"), forged)
        agent.drain_inbound()
    assert agent.outbox.ids() == [uid] and agent.uplink.acked == 0
    mallory.publish(T.ack("edge", "d1"), keys["edge"].sign(fake))  # what the real parent sends
    agent.drain_inbound()
    assert agent.outbox.ids() == [] and agent.uplink.acked == 1


def test_an_edge_merges_only_models_its_parent_signed(tmp_path):
    """The edge's side of the same promise: a model on the cloud's down topic signed with a key that
    is not the cloud's (a compromised broker or bridge) never reaches the edge's model."""
    keys = {"cloud": signer("cloud"), "edge": signer("edge"), "d1": signer("d1")}
    broker = MemoryBroker()
    m = synthetic_manifest()
    edge = Node(NodeConfig(node_id="edge", parent="cloud", job=JOB), manifest=m,
                initial_adapter=np.zeros(SIZE, np.float32),
                buffer=make_strategy("fedbuff", k_updates=1, max_wait_s=1e9), transport=broker.client("edge"),
                state_dir=tmp_path / "edge", signer=keys["edge"], scheduler=make_scheduler("fixed:1000"),
                keyring=Keyring({"cloud": keys["cloud"].public_key(), "d1": keys["d1"].public_key()}))
    edge.start()
    edge.run_once(timeout=0)

    def model(value: float, version: int) -> bytes:
        return encode_message(ModelMessage(
            kind="model", sender="cloud", job=JOB, bundle_id=m.bundle_id, base_version=0, version=version,
            num_samples=0, local_steps=0, train_loss=0.0, energy_j=0.0, is_delta=False, created_at=1.0,
            tensors=unflatten(np.full(SIZE, value, np.float32), m.trainable)))

    mallory = broker.client("mallory")
    for forged in (model(7.0, 5), signer("cloud").sign(model(7.0, 6)), keys["d1"].sign(model(7.0, 7))):
        mallory.publish(T.down("cloud"), forged, retain=True)
        edge.run_once(timeout=0)
    assert edge.version == 0 and not np.any(edge.model)
    mallory.publish(T.down("cloud"), keys["cloud"].sign(model(0.5, 8)), retain=True)
    edge.run_once(timeout=0)
    assert edge.version == 1
    np.testing.assert_allclose(edge.model, 0.5)
