"""The aggregating node over the in-memory broker: validation, exactly-once, checkpoints, edges."""
import json

import numpy as np
import pytest

from device_runtime.adapter import flatten, unflatten
from device_runtime.scheduler import make_scheduler
from edge_broker.aggregation import make_strategy
from edge_broker.node import Node, NodeConfig
from fedkit import SIZE, SPECS, CountingMeter, synthetic_manifest, update_bytes
from tomtit.transport import MemoryBroker
from tomtit.wire import (ModelMessage, Presence, Topics, decode_acks, decode_error, decode_message,
                         encode_message, encode_presence)

JOB = "t"
T = Topics(JOB)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_node(tmp_path, broker, *, node_id="cloud", parent=None, strategy="fedavg", children=2, clock=None,
              initial=None, scheduler=None, manifest=None, **cfg):
    m = manifest or synthetic_manifest()
    buf = make_strategy(strategy, expected_children=children)
    node = Node(NodeConfig(node_id=node_id, parent=parent, job=JOB, **cfg), manifest=m,
                initial_adapter=np.zeros(m.buffer_size, np.float32) if initial is None else initial, buffer=buf,
                transport=broker.client(node_id), state_dir=tmp_path / node_id,
                scheduler=scheduler, clock=clock or Clock())
    node.run_once(timeout=0)
    return node, m


def child(broker, node="cloud", name="c1"):
    c = broker.client(name)
    c.subscribe(T.ack(node, name))
    c.subscribe(T.errors(node))
    c.subscribe(T.down(node))
    return c


def drain(transport):
    out = []
    while (m := transport.get(0)) is not None:
        out.append(m)
    return out


def acks(msgs):
    return [a for m in msgs if "/ack/" in m.topic for a in decode_acks(m.payload)]


def errors(msgs):
    return [decode_error(m.payload) for m in msgs if "/errors/" in m.topic]


def test_fedavg_of_two_children_is_published_and_acked(tmp_path):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker)
    c1, c2 = child(broker, name="c1"), child(broker, name="c2")
    d1 = np.arange(SIZE, dtype=np.float32) / 10
    d2 = -np.ones(SIZE, np.float32)
    u1, p1 = update_bytes(d1, sender="c1", manifest=m, num_samples=30, job=JOB)
    u2, p2 = update_bytes(d2, sender="c2", manifest=m, num_samples=10, job=JOB)
    c1.publish(T.up("cloud", "c1"), p1)
    node.run_once(timeout=0)
    assert node.version == 0  # fedavg waits for both children
    c2.publish(T.up("cloud", "c2"), p2)
    node.run_once(timeout=0)
    expected = np.average(np.stack([d1, d2]), axis=0, weights=[30, 10])
    np.testing.assert_allclose(node.model, expected, rtol=1e-6)
    assert node.version == 1
    got1, got2 = acks(drain(c1)), acks(drain(c2))
    assert [(a.update_id, a.status) for a in got1] == [(u1, "applied")]
    assert [(a.update_id, a.status) for a in got2] == [(u2, "applied")]
    retained = decode_message(broker.retained[T.down("cloud")], expected=SPECS, bundle_id=m.bundle_id,
                              max_bytes=1 << 20)
    assert retained.version == 1 and retained.kind == "model"
    np.testing.assert_allclose(flatten(dict(retained.tensors), SPECS), expected, rtol=1e-6)


def _nan_payload(m):
    marker = np.zeros(SIZE, np.float32)
    marker[0] = 12345.678
    uid, p = update_bytes(marker, sender="c1", manifest=m, job=JOB)
    needle = np.float32(12345.678).tobytes()
    assert p.count(needle) == 1
    return uid, p.replace(needle, np.float32(np.nan).tobytes())


def _with_meta(payload: bytes, **changes: str) -> bytes:
    """The same update with metadata values replaced (as a hostile sender could write them)."""
    from safetensors.numpy import load, save

    n = int.from_bytes(payload[:8], "little")
    meta = json.loads(payload[8:8 + n])["__metadata__"]
    return save(load(payload), metadata={**meta, **changes})


def _nested_header_payload(uid: str) -> bytes:
    """~10 KB of nested JSON in a safetensors header that names an update id: the parser refuses
    it, and the node's ack helper used to die on it with RecursionError."""
    header = ('{"__metadata__":{"update_id":"%s"},"x":' % uid + "[" * 5000 + "]" * 5000 + "}").encode()
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize("case,reason", [
    ("nested_header", "not_safetensors"),
    ("not_delta", "not_delta"),
    ("huge_num_samples", "bad_metadata"),
    ("huge_loss", "bad_metadata"),
    ("future_base", "future_base"),
    ("wrong_shape", "wrong_shape"),
    ("nan", "not_finite"),
    ("other_bundle", "wrong_bundle"),
    ("sender_mismatch", "wrong_sender"),
    ("too_big_norm", "norm"),
    ("too_much_local_work", "local_steps"),
    ("garbage", "not_safetensors"),
    ("stale", "stale"),
])
def test_bad_update_is_rejected_with_reason_and_model_unchanged(tmp_path, case, reason):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1)
    c1 = child(broker)
    before = node.model.copy()
    ok = np.full(SIZE, 0.01, np.float32)
    uid = ""
    if case == "nested_header":
        uid = "ab" * 16
        payload = _nested_header_payload(uid)
    elif case == "not_delta":  # full values added as a delta would double the model
        uid, payload = update_bytes(ok, sender="c1", manifest=m, job=JOB, is_delta=False)
    elif case == "huge_num_samples":  # 19 digits: legal as int64, but a node's sum would not be
        uid, payload = update_bytes(ok, sender="c1", manifest=m, job=JOB)
        payload = _with_meta(payload, num_samples="9" * 19)
    elif case == "huge_loss":  # two of these averaged to inf in an edge's push
        uid, payload = update_bytes(ok, sender="c1", manifest=m, job=JOB)
        payload = _with_meta(payload, train_loss="1e308")
    elif case == "future_base":  # would sit in the seen-ids set (and every checkpoint) for ever
        uid, payload = update_bytes(ok, sender="c1", manifest=m, job=JOB, base_version=10**15)
    elif case == "wrong_shape":
        from safetensors.numpy import save
        uid, good = update_bytes(ok, sender="c1", manifest=m, job=JOB)
        meta = json.loads(good[8: 8 + int.from_bytes(good[:8], "little")])["__metadata__"]
        tensors = {s.name: np.zeros(s.shape, np.float32) for s in SPECS}
        tensors[SPECS[0].name] = np.zeros((3, 2), np.float32)
        payload = save(tensors, metadata=meta)
    elif case == "nan":
        uid, payload = _nan_payload(m)
    elif case == "other_bundle":
        uid, payload = update_bytes(ok, sender="c1", manifest=synthetic_manifest("ffffffffffffffff"), job=JOB)
    elif case == "sender_mismatch":
        uid, payload = update_bytes(ok, sender="c9", manifest=m, job=JOB)
    elif case == "too_big_norm":
        uid, payload = update_bytes(np.full(SIZE, 1e3, np.float32), sender="c1", manifest=m, job=JOB)
    elif case == "too_much_local_work":
        uid, payload = update_bytes(ok, sender="c1", manifest=m, job=JOB, local_steps=1001)
    elif case == "garbage":
        payload = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    elif case == "stale":
        node.version = 50  # the node moved on long ago
        uid, payload = update_bytes(ok, sender="c1", manifest=m, job=JOB, base_version=1)
    c1.publish(T.up("cloud", "c1"), payload)
    node.run_once(timeout=0)
    msgs = drain(c1)
    errs = errors(msgs)
    assert [e.reason for e in errs] == [reason]
    if uid:
        assert [(a.update_id, a.status, a.reason) for a in acks(msgs)] == [(uid, "rejected", reason)]
    np.testing.assert_array_equal(node.model, before)
    assert node.stats.rejected[reason] == 1 and node.stats.accepted == 0
    assert not node.seen


def test_a_chunk_set_left_incomplete_or_refused_is_reported_to_its_sender(tmp_path):
    from tomtit.manifest import TensorSpec
    from tomtit.wire import split_payload

    broker = MemoryBroker()
    clock = Clock()
    big = synthetic_manifest(specs=(TensorSpec("w", (40, 25)),))
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1, manifest=big, clock=clock,
                        chunk_timeout_s=10.0)
    c1 = child(broker)
    uid, p = update_bytes(np.full(m.buffer_size, 0.01, np.float32), sender="c1", manifest=m, job=JOB)
    chunks = split_payload(p, update_id=uid, limit=1024)
    for ch in chunks[:-1]:  # the last chunk never comes
        c1.publish(T.up("cloud", "c1"), ch)
    node.run_once(timeout=0)
    assert acks(drain(c1)) == []
    clock.t += 11
    node.run_once(timeout=0)
    msgs = drain(c1)
    # reported by update id; not acked, so the sender keeps the update and re-sends the set
    assert [(e.reason, e.update_id, e.sender) for e in errors(msgs)] == [("incomplete", uid, "c1")]
    assert acks(msgs) == [] and node.stats.rejected["incomplete"] == 1
    for ch in chunks:  # the re-send
        c1.publish(T.up("cloud", "c1"), ch)
    node.run_once(timeout=0)
    assert [(a.update_id, a.status) for a in acks(drain(c1))] == [(uid, "applied")]
    applied = node.model.copy()
    # a chunk that disagrees with its set: reported, not acked (a clean re-send would succeed)
    uid2, p2 = update_bytes(np.full(m.buffer_size, 0.02, np.float32), sender="c1", manifest=m, job=JOB)
    good = split_payload(p2, update_id=uid2, limit=1024)
    other = split_payload(p2 + b"\0", update_id=uid2, limit=1024)  # same id, other size and sha256
    c1.publish(T.up("cloud", "c1"), good[0])
    c1.publish(T.up("cloud", "c1"), other[1])
    node.run_once(timeout=0)
    msgs = drain(c1)
    assert [(e.reason, e.update_id) for e in errors(msgs)] == [("chunk_mismatch", uid2)] and acks(msgs) == []
    # a chunk bad in itself (index beyond its total) would be bad again: the sender is told
    bad = _with_meta(good[2], index="99")
    c1.publish(T.up("cloud", "c1"), bad)
    node.run_once(timeout=0)
    assert [(a.update_id, a.status, a.reason) for a in acks(drain(c1))] == [(uid2, "rejected", "bad_chunk")]
    np.testing.assert_array_equal(node.model, applied)


def test_an_edge_push_stays_legal_with_children_at_the_wire_limits(tmp_path):
    """Legal extremes from children (num_samples and train_loss at their bounds) used to make the
    edge's own push illegal (a sum too large, a mean of inf) and kill the edge."""
    from tomtit.wire import MAX_ABS_LOSS, MAX_NUM_SAMPLES

    broker = MemoryBroker()
    edge, m = make_node(tmp_path, broker, node_id="e0", parent="cloud", strategy="fedbuff", children=2,
                        scheduler=make_scheduler("fixed:2"))
    up = broker.client("cloud")
    up.subscribe(T.up("cloud", "e0"))
    for name in ("c1", "c2"):
        child(broker, node="e0", name=name)
        _, p = update_bytes(np.full(SIZE, 0.01, np.float32), sender=name, manifest=m, job=JOB,
                            num_samples=MAX_NUM_SAMPLES, train_loss=MAX_ABS_LOSS)
        broker.client(name).publish(T.up("e0", name), p)
        edge.run_once(timeout=0)
    pushed = [decode_message(x.payload, expected=SPECS, bundle_id=m.bundle_id, max_bytes=1 << 20)
              for x in drain(up)]
    assert len(pushed) == 1 and edge.stats.pushes_up == 1
    assert pushed[0].num_samples == MAX_NUM_SAMPLES  # the sum, clamped to the wire's bound
    assert pushed[0].train_loss == MAX_ABS_LOSS


def test_replayed_update_is_acked_as_duplicate_never_reapplied_even_after_restart(tmp_path):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1)
    c1 = child(broker)
    d = np.full(SIZE, 0.5, np.float32)
    uid, p = update_bytes(d, sender="c1", manifest=m, job=JOB)
    c1.publish(T.up("cloud", "c1"), p)
    node.run_once(timeout=0)
    np.testing.assert_allclose(node.model, d)
    c1.publish(T.up("cloud", "c1"), p)  # QoS 1 redelivery or an outbox re-send
    node.run_once(timeout=0)
    np.testing.assert_allclose(node.model, d)
    assert [a.status for a in acks(drain(c1))] == ["applied", "duplicate"]
    # A restarted node remembers what it applied.
    node.transport.crash()
    node2, _ = make_node(tmp_path, broker, strategy="fedbuff", children=1)
    assert node2.version == 1
    np.testing.assert_allclose(node2.model, d)
    c1.publish(T.up("cloud", "c1"), p)
    node2.run_once(timeout=0)
    np.testing.assert_allclose(node2.model, d)
    assert [a.status for a in acks(drain(c1))] == ["duplicate"]


def test_offline_child_is_not_waited_for(tmp_path):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedavg", children=2)
    c1, c2 = child(broker, name="c1"), child(broker, name="c2")
    for name, c in (("c1", c1), ("c2", c2)):
        c.publish(T.status(name), encode_presence(Presence(name, "online", "device", 0, 1.0)), retain=True)
    node.run_once(timeout=0)
    for name, c in (("c1", c1), ("c2", c2)):  # round 1: both children deliver
        c.publish(T.up("cloud", name), update_bytes(np.ones(SIZE, np.float32), sender=name, manifest=m, job=JOB)[1])
    node.run_once(timeout=0)
    assert node.version == 1
    uid, p = update_bytes(np.ones(SIZE, np.float32), sender="c1", manifest=m, job=JOB, base_version=1)
    c1.publish(T.up("cloud", "c1"), p)
    node.run_once(timeout=0)
    assert node.version == 1  # still waiting for c2
    c2.publish(T.status("c2"), encode_presence(Presence("c2", "offline", "device", 0, 2.0)), retain=True)
    node.run_once(timeout=0)
    assert node.version == 2  # c2 left: the round closes with what c1 sent
    assert [a.status for a in acks(drain(c1))] == ["applied", "applied"]


def test_odd_topics_under_our_filters_are_ignored(tmp_path):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1)
    rogue = broker.client("rogue")
    for topic in ("tomtit/t/node/cloud/up/bad id!", "tomtit/t/status/###", "tomtit/t/status/x/y"):
        rogue.publish(topic, b"junk")
    node.run_once(timeout=0)  # must not raise
    assert node.version == 0 and node.stats.accepted == 0


def test_chunked_update_is_reassembled(tmp_path):
    from tomtit.wire import split_payload

    from tomtit.manifest import TensorSpec

    broker = MemoryBroker()
    big = synthetic_manifest(specs=(TensorSpec("w", (40, 25)),))
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1, manifest=big)
    c1 = child(broker)
    d = np.linspace(-1, 1, m.buffer_size).astype(np.float32)
    uid, p = update_bytes(d, sender="c1", manifest=m, job=JOB)
    chunks = split_payload(p, update_id=uid, limit=1024)
    assert len(chunks) > 1
    for ch in reversed(chunks):
        c1.publish(T.up("cloud", "c1"), ch)
    node.run_once(timeout=0)
    np.testing.assert_allclose(node.model, d, rtol=1e-6)


def test_edge_pushes_upward_and_merges_the_parent_model(tmp_path):
    broker = MemoryBroker()
    clock = Clock()
    edge, m = make_node(tmp_path, broker, node_id="edge1", parent="cloud", strategy="fedbuff", children=1,
                        clock=clock, scheduler=make_scheduler("fixed:2"))
    cloud = broker.client("cloud-probe")
    cloud.subscribe(T.up_filter("cloud"))
    c1 = child(broker, node="edge1")
    d1, d2 = np.full(SIZE, 0.1, np.float32), np.full(SIZE, 0.2, np.float32)
    for d in (d1, d2):
        _, p = update_bytes(d, sender="c1", manifest=m, job=JOB)
        c1.publish(T.up("edge1", "c1"), p)
        edge.run_once(timeout=0)
    ups = [x for x in drain(cloud) if x.topic == T.up("cloud", "edge1")]
    assert len(ups) == 1  # fixed:2 -> one push after two absorbed updates
    pushed = decode_message(ups[0].payload, expected=SPECS, bundle_id=m.bundle_id, max_bytes=1 << 20,
                            expect_sender="edge1")
    np.testing.assert_allclose(flatten(dict(pushed.tensors), SPECS), d1 + d2, rtol=1e-3)  # f16 upward
    assert pushed.local_steps == 2 and len(edge.outbox) == 1
    # One more child update arrives; then the parent publishes its new model P.
    _, p = update_bytes(np.full(SIZE, 0.05, np.float32), sender="c1", manifest=m, job=JOB)
    c1.publish(T.up("edge1", "c1"), p)
    edge.run_once(timeout=0)
    parent_model = np.full(SIZE, 1.0, np.float32)
    cloud.publish(T.down("cloud"), encode_message(ModelMessage(
        kind="model", sender="cloud", job=JOB, bundle_id=m.bundle_id, base_version=0, version=1, num_samples=0,
        local_steps=0, train_loss=0.0, energy_j=0.0, is_delta=False, created_at=1.0,
        tensors=unflatten(parent_model, SPECS))), retain=True)
    edge.run_once(timeout=0)
    # merge rule: P + (model - pushed); model - pushed is the unsent 0.05 (+ f16 rounding of d1+d2)
    np.testing.assert_allclose(edge.model, parent_model + 0.05, atol=1e-3)
    assert edge.parent_version == 1
    # The parent's ack clears the edge's outbox.
    from tomtit.wire import Ack, encode_acks
    cloud.publish(T.ack("cloud", "edge1"), encode_acks([Ack(update_id="e" * 32, status="applied"),
                                                        Ack(update_id=pushed.update_id, status="applied")]))
    edge.run_once(timeout=0)
    assert len(edge.outbox) == 0


def _model_msg(m, version, value, is_delta=False):
    return encode_message(ModelMessage(
        kind="model", sender="cloud", job=JOB, bundle_id=m.bundle_id, base_version=0, version=version, num_samples=0,
        local_steps=0, train_loss=0.0, energy_j=0.0, is_delta=is_delta, created_at=1.0,
        tensors=unflatten(np.full(SIZE, value, np.float32), SPECS)))


def test_a_parent_model_marked_as_a_delta_is_not_adopted(tmp_path):
    broker = MemoryBroker()
    edge, m = make_node(tmp_path, broker, node_id="e0", parent="cloud", strategy="fedbuff", children=1,
                        initial=np.full(SIZE, 0.5, np.float32), scheduler=make_scheduler("fixed:2"))
    broker.client("cloud").publish(T.down("cloud"), _model_msg(m, 3, 0.1, is_delta=True), retain=True)
    edge.run_once(timeout=0)
    np.testing.assert_array_equal(edge.model, np.full(SIZE, 0.5, np.float32))
    assert edge.parent_version == 0
    broker.client("cloud").publish(T.down("cloud"), _model_msg(m, 4, 0.1), retain=True)
    edge.run_once(timeout=0)
    assert edge.parent_version == 4


def test_an_edge_counts_its_own_joules_and_reports_the_cycle_energy_upward(tmp_path):
    """Issue 9: an edge's own joules never reached its scheduler (the energy term was empty)."""
    broker = MemoryBroker()
    meter = CountingMeter()
    m = synthetic_manifest()
    edge = Node(NodeConfig(node_id="edge1", parent="cloud", job=JOB), manifest=m,
                initial_adapter=np.zeros(SIZE, np.float32), buffer=make_strategy("fedbuff", k_updates=1),
                transport=broker.client("edge1"), state_dir=tmp_path / "edge1", scheduler=make_scheduler("fixed:3"),
                meter=meter, clock=Clock())
    edge.run_once(timeout=0)
    cloud = broker.client("cloud-probe")
    cloud.subscribe(T.up_filter("cloud"))
    c1 = child(broker, node="edge1")
    seen = []
    real_observe = edge.scheduler.observe
    edge.scheduler.observe = lambda step: (seen.append(step.joules), real_observe(step))[1]
    for _ in range(3):
        meter.j += 0.5  # this edge's own work between updates
        c1.publish(T.up("edge1", "c1"), update_bytes(np.full(SIZE, 0.01, np.float32), sender="c1", manifest=m,
                                                     job=JOB)[1])  # each reports energy_j=2.0
        edge.run_once(timeout=0)
    # the first reading only sets the meter's zero; after that each step is 2.0 child + 0.5 own
    assert seen == [2.0, 2.5, 2.5]
    ups = [x for x in drain(cloud) if x.topic == T.up("cloud", "edge1")]
    pushed = decode_message(ups[0].payload, expected=SPECS, bundle_id=m.bundle_id, max_bytes=1 << 20)
    assert pushed.energy_j == pytest.approx(7.0)  # was always 0.0


def test_marginal_rule_inside_an_edge_that_joins_10_versions_late(tmp_path):
    broker = MemoryBroker()
    m = synthetic_manifest()
    edge = Node(NodeConfig(node_id="edge1", parent="cloud", job=JOB), manifest=m,
                initial_adapter=np.zeros(SIZE, np.float32), buffer=make_strategy("fedbuff", k_updates=1),
                transport=broker.client("edge1"), state_dir=tmp_path / "edge1",
                scheduler=make_scheduler("marginal:tau_min=2,tau_max=40,sync_cost_j=5,cheap_share=0,measure_first=no"), clock=Clock())
    # The Charnov test alone (cheap_share=0, measure_first=no): here a sync is nearly free, and the
    # cheap-sync rule would end every cycle at tau_min and hide the staleness bug.
    cloud = broker.client("cloud")
    cloud.publish(T.down("cloud"), _model_msg(m, 10, 0.0), retain=True)  # the cloud is at v10, then quiet
    edge.run_once(timeout=0)
    edge.run_once(timeout=0)
    assert edge.parent_version == 10
    c1 = child(broker, node="edge1")
    rng = np.random.default_rng(0)
    for k in range(120):
        loss = 0.2 + 2.0 * 0.95 ** k + 0.01 * rng.standard_normal()
        _, p = update_bytes(np.full(SIZE, 1e-3, np.float32), sender="c1", manifest=m, job=JOB)
        msg = decode_message(p, expected=SPECS, bundle_id=m.bundle_id, max_bytes=1 << 20)
        c1.publish(T.up("edge1", "c1"), encode_message(ModelMessage(
            kind="update", sender="c1", job=JOB, bundle_id=m.bundle_id, base_version=edge.version, version=1,
            num_samples=10, local_steps=5, train_loss=float(loss), energy_j=2.0, is_delta=True, created_at=1.0,
            update_id=msg.update_id, codec="f32", tensors=msg.tensors)))
        edge.run_once(timeout=0)
    pushes = edge.stats.pushes_up
    assert 1 <= pushes < 30, pushes  # before the fix: a push every 2 absorbed updates (60)


def _burst(m, plan):
    """(sender, delta, uid, payload) per update, in publish order."""
    out = []
    for i, sender in enumerate(plan):
        d = np.full(SIZE, 0.01 * (i + 1), np.float32)
        uid, p = update_bytes(d, sender=sender, manifest=m, job=JOB)
        out.append((sender, d, uid, p))
    return out


def test_a_burst_is_aggregated_k_at_a_time_and_committed_once(tmp_path):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=2)  # K = 2
    c1, c2 = child(broker, name="c1"), child(broker, name="c2")
    watcher = broker.client("watcher")
    watcher.subscribe(T.down("cloud"))
    drain(watcher)
    commits = []
    real_checkpoint = node.checkpoint
    node.checkpoint = lambda: (commits.append(node.version), real_checkpoint())
    updates = _burst(m, ["c1", "c2", "c1", "c1", "c2", "c1", "c2"])
    for sender, _, _, p in updates:
        (c1 if sender == "c1" else c2).publish(T.up("cloud", sender), p)
    node.run_once(timeout=0)  # all seven are queued: one batch
    # exactly K per aggregation, in arrival order: pairs (1,2), (3,4), (5,6); the 7th waits
    expected = sum((updates[i][1] + updates[i + 1][1]) / 2 for i in (0, 2, 4))
    np.testing.assert_allclose(node.model, expected, rtol=1e-6)
    assert node.version == 3 and node.buffer.pending == 1
    assert set(node._pending_meta) == {updates[6][2]}  # per-update bookkeeping ends with the update
    assert [v["updates"] for v in node.stats.versions] == [2, 2, 2]
    assert commits == [3]  # one checkpoint for the batch, after all three aggregations
    models = drain(watcher)
    assert len(models) == 1  # and one model publish
    assert decode_message(models[0].payload, expected=SPECS, bundle_id=m.bundle_id, max_bytes=1 << 20).version == 3
    # one ack message per child, listing exactly its applied updates
    for c, name in ((c1, "c1"), (c2, "c2")):
        msgs = [x for x in drain(c) if "/ack/" in x.topic]
        assert len(msgs) == 1
        want = [u for s, _, u, _ in updates[:6] if s == name]
        assert [(a.update_id, a.status) for a in decode_acks(msgs[0].payload)] == [(u, "applied") for u in want]


def test_no_ack_outlives_a_crash_between_aggregation_and_commit(tmp_path):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=2)
    c1 = child(broker)
    updates = _burst(m, ["c1", "c1"])
    for _, _, _, p in updates:
        c1.publish(T.up("cloud", "c1"), p)
    drain(c1)
    # the node handles both and aggregates, then dies before its commit
    while (msg := node.transport.get(0)) is not None:
        node.handle(msg.topic, msg.payload)
        node._apply_ready(node.clock())
    assert node.version == 1
    node.transport.crash()
    assert acks(drain(c1)) == []  # nothing was acknowledged
    # restarted from its last checkpoint: the aggregation never happened, the children re-send
    node2, _ = make_node(tmp_path, broker, strategy="fedbuff", children=2)
    assert node2.version == 0
    for _, _, _, p in updates:
        c1.publish(T.up("cloud", "c1"), p)
    node2.run_once(timeout=0)
    np.testing.assert_allclose(node2.model, (updates[0][1] + updates[1][1]) / 2, rtol=1e-6)
    assert sorted(a.update_id for a in acks(drain(c1))) == sorted(u for _, _, u, _ in updates)


def test_seen_ids_stay_bounded_and_a_late_resend_is_refused_as_stale(tmp_path):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1)  # K = 1
    stale_bound = node.buffer.config.max_staleness
    c1 = child(broker)
    first_uid, first = update_bytes(np.full(SIZE, 0.5, np.float32), sender="c1", manifest=m, job=JOB)
    c1.publish(T.up("cloud", "c1"), first)
    node.run_once(timeout=0)
    for v in range(1, 40):  # 39 more updates, each trained on the model before it
        c1.publish(T.up("cloud", "c1"), update_bytes(np.zeros(SIZE, np.float32), sender="c1", manifest=m,
                                                      job=JOB, base_version=v)[1])
        node.run_once(timeout=0)
        # only ids whose re-send would not already count as stale are kept
        assert all(b >= node.version - stale_bound for b in node.seen.values())
        assert len(node.seen) <= stale_bound + 1
    assert node.version == 40 and first_uid not in node.seen
    drain(c1)
    model = node.model.copy()
    c1.publish(T.up("cloud", "c1"), first)  # its ack was lost long ago; its outbox re-sends it
    node.run_once(timeout=0)
    np.testing.assert_array_equal(node.model, model)  # never applied twice
    assert [(a.update_id, a.status, a.reason) for a in acks(drain(c1))] == [(first_uid, "rejected", "stale")]
    # the checkpoint holds the same bounded set, and a restart keeps it
    node.transport.crash()
    node2, _ = make_node(tmp_path, broker, strategy="fedbuff", children=1)
    assert node2.seen == node.seen


def _zero_updates(node, c1, m, base_versions):
    """One zero update per base version, each handled at once (K = 1: one version each)."""
    for v in base_versions:
        c1.publish(T.up("cloud", "c1"), update_bytes(np.zeros(SIZE, np.float32), sender="c1", manifest=m,
                                                      job=JOB, base_version=v)[1])
        node.run_once(timeout=0)


def test_a_reported_base_ahead_of_the_node_is_remembered_as_reported(tmp_path):
    """A node that lost its state clamps a base_version ahead of its own to its version; a later
    re-send must still be caught as a duplicate, not re-applied as fresh."""
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1)
    c1 = child(broker)
    uid, p = update_bytes(np.full(SIZE, 0.5, np.float32), sender="c1", manifest=m, job=JOB, base_version=57)
    c1.publish(T.up("cloud", "c1"), p)
    node.run_once(timeout=0)
    _zero_updates(node, c1, m, range(1, 30))
    assert node.seen[uid] == 57
    drain(c1)
    c1.publish(T.up("cloud", "c1"), p)
    node.run_once(timeout=0)
    assert [(a.update_id, a.status) for a in acks(drain(c1))] == [(uid, "duplicate")]


def test_a_checkpoint_with_malformed_seen_ids_is_refused_not_reset(tmp_path):
    """Starting over would re-apply updates already acknowledged: an unreadable seen-set stops the node."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from edge_broker.checkpoint import CHECKPOINT_FILE
    from tomtit.errors import TomtitError

    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1)
    node.checkpoint()
    path = tmp_path / "cloud" / CHECKPOINT_FILE
    with safe_open(str(path), "np") as f:
        meta = dict(f.metadata())
    meta["seen"] = json.dumps(["a" * 32, "b" * 32])  # a list, not id -> base_version
    save_file(load_file(str(path)), str(path), metadata=meta)
    node.transport.crash()
    with pytest.raises(TomtitError, match="seen update ids"):
        make_node(tmp_path, broker, strategy="fedbuff", children=1)


def test_a_failed_checkpoint_sends_no_ack_even_at_shutdown(tmp_path):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1)
    c1 = child(broker)
    c1.publish(T.up("cloud", "c1"), update_bytes(np.full(SIZE, 0.5, np.float32), sender="c1", manifest=m, job=JOB)[1])

    def disk_full():
        raise OSError(28, "No space left on device")

    node.checkpoint = disk_full
    with pytest.raises(OSError):
        node.run_once(timeout=0)
    with pytest.raises(OSError):
        node.shutdown()  # what run()'s finally does: it must not send the acks either
    assert acks(drain(c1)) == []


def test_an_edge_push_staged_just_before_a_crash_is_accounted_on_restart(tmp_path):
    from device_runtime.uplink import staged_delta

    broker = MemoryBroker()
    edge, m = make_node(tmp_path, broker, node_id="edge1", parent="cloud", strategy="fedbuff", children=1,
                        scheduler=make_scheduler("fixed:1"))
    c1 = child(broker, node="edge1")
    pushed_before = edge.pushed.copy()
    # The push is staged (outbox on disk) before the commit's checkpoint, which accounts for it;
    # a crash right there loses that checkpoint: the aggregate AND the accounting.
    edge.checkpoint = lambda: (_ for _ in ()).throw(OSError("power cut"))
    c1.publish(T.up("edge1", "c1"), update_bytes(np.full(SIZE, 0.25, np.float32), sender="c1", manifest=m, job=JOB)[1])
    with pytest.raises(OSError):
        edge.run_once(timeout=0)
    assert len(edge.outbox) == 1 and acks(drain(c1)) == []  # staged, and the child was never acked
    uid = edge.outbox.ids()[0]
    edge.transport.crash()
    edge2, _ = make_node(tmp_path, broker, node_id="edge1", parent="cloud", strategy="fedbuff", children=1,
                         scheduler=make_scheduler("fixed:1"))
    # the push will still be sent, so `pushed` must include it...
    np.testing.assert_array_equal(edge2.pushed, pushed_before + staged_delta(edge2.outbox, uid, m))
    assert edge2.version == 0  # ...while the aggregate was lost with the checkpoint: the child re-sends
    c1.publish(T.up("edge1", "c1"), update_bytes(np.full(SIZE, 0.25, np.float32), sender="c1", manifest=m, job=JOB)[1])
    edge2.scheduler = edge2.uplink.scheduler = make_scheduler("fixed:1000")  # no second push here
    edge2.run_once(timeout=0)
    np.testing.assert_allclose(edge2.model - edge2.pushed, 0, atol=1e-3)  # nothing sent twice: f16 rounding only


def test_pruned_ids_stay_refused_after_a_restart_with_a_larger_staleness_bound(tmp_path):
    broker = MemoryBroker()
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1)
    node.buffer.config = type(node.buffer.config)(**{**node.buffer.config.__dict__, "k_updates": 1, "max_staleness": 1})
    c1 = child(broker)
    first_uid, first = update_bytes(np.full(SIZE, 0.5, np.float32), sender="c1", manifest=m, job=JOB)
    c1.publish(T.up("cloud", "c1"), first)
    node.run_once(timeout=0)
    _zero_updates(node, c1, m, range(1, 5))
    assert first_uid not in node.seen and node.version == 5 and node.seen_horizon == 5 - 1
    node.transport.crash()
    node2, _ = make_node(tmp_path, broker, strategy="fedbuff", children=1)  # max_staleness 10 again
    assert node2.seen_horizon == 4
    drain(c1)
    model = node2.model.copy()
    c1.publish(T.up("cloud", "c1"), first)  # staleness 5 would pass a bound of 10
    node2.run_once(timeout=0)
    np.testing.assert_array_equal(node2.model, model)
    assert [(a.update_id, a.status, a.reason) for a in acks(drain(c1))] == [(first_uid, "rejected", "stale")]


def test_the_cloud_publishes_the_run_configuration_retained(tmp_path):
    from tomtit.wire import RunConfig, decode_run_config

    broker = MemoryBroker()
    m = synthetic_manifest()
    cfg = RunConfig(job=JOB, bundle_id=m.bundle_id, up_codec="int8", device_scheduler="fixed:7",
                    edge_scheduler="marginal", k_updates=2, max_wait_s=5.0, max_staleness=4, staleness_exponent=0.5,
                    target_accuracy=0.9, deadline_s=None, created_at=1.0)
    cloud = Node(NodeConfig(node_id="cloud", job=JOB), manifest=m, initial_adapter=np.zeros(SIZE, np.float32),
                 buffer=make_strategy("fedbuff", k_updates=2), transport=broker.client("cloud"),
                 state_dir=tmp_path / "cloud", run_config=cfg, clock=Clock())
    cloud.run_once(timeout=0)
    late = broker.client("late-child")
    late.subscribe(T.run())  # a child that connects later still gets it (retained)
    got = decode_run_config(late.get(0).payload)
    assert got == cfg


def test_fuzz_a_node_never_fails_on_what_arrives_on_its_up_topics(tmp_path):
    """Mutated updates, chunks and metadata, straight into the node's inbound path: every one is
    applied or rejected with a wire reason; no exception escapes, none needs the last-line guard
    (`internal`), and whatever is applied is finite and within the norm bound."""
    import random

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from safetensors.numpy import load, save

    from test_wire import _mutate
    from tomtit.manifest import TensorSpec
    from tomtit.wire import split_payload

    broker = MemoryBroker()
    big = synthetic_manifest(specs=(TensorSpec("w", (20, 25)), TensorSpec("b", (3,))))
    node, m = make_node(tmp_path, broker, strategy="fedbuff", children=1, manifest=big)
    node.buffer.config = node.buffer.config.__class__(**{**node.buffer.config.__dict__, "k_updates": 1})
    seeds = []
    for i in range(4):
        uid, p = update_bytes(np.full(m.buffer_size, 0.001 * (i + 1), np.float32), sender="c1", manifest=m,
                              job=JOB, codec=("f32", "f16", "int8", "f32")[i])
        seeds.append((uid, p))
    keys = ["num_samples", "local_steps", "base_version", "train_loss", "is_delta", "codec", "kind", "sender",
            "job", "update_id", "energy_j", "created_at", "proto"]
    values = ["", "-1", "0", "1e308", "nan", "inf", "9" * 19, "true", "false", "f16", "model", "c2", "t",
              "0" * 32, "1e-320", "1" * 400]

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 2**64 - 1))
    def run(seed):
        rng = random.Random(seed)
        uid, base = rng.choice(seeds)
        kind = rng.randrange(3)
        if kind == 0:
            parts = [_mutate(rng, base)]
        elif kind == 1:
            meta = json.loads(base[8:8 + int.from_bytes(base[:8], "little")])["__metadata__"]
            for _ in range(rng.randint(1, 3)):
                meta[rng.choice(keys)] = rng.choice(values)
            parts = [save(load(base), metadata=meta)]
        else:
            parts = split_payload(base, update_id=uid, limit=1024)
            j = rng.randrange(len(parts))
            parts[j] = _mutate(rng, parts[j])
            rng.shuffle(parts)
        before = node.model.copy()
        for p in parts:
            node.handle(T.up("cloud", "c1"), p)  # not the guarded entry: nothing may escape
            node._apply_ready(node.clock())
        assert node.stats.rejected["internal"] == 0
        assert np.isfinite(node.model).all()
        assert np.linalg.norm(node.model - before) <= node.cfg.max_update_norm * 1.0001

    run()
    # the corpus reached both outcomes and many different reasons
    assert node.stats.accepted >= 1 and len(node.stats.rejected) >= 8, (node.stats.accepted, node.stats.rejected)
