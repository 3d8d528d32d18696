"""The device agent against a real Node over the in-memory broker, with a numpy trainer."""
import numpy as np

from device_runtime.agent import DeviceAgent, DeviceConfig
from device_runtime.energy import ModelMeter
from device_runtime.scheduler import make_scheduler
from edge_broker.aggregation import make_strategy
from edge_broker.node import Node, NodeConfig
from fedkit import SIZE, SPECS, CountingMeter, DummyBatches, QuadraticTrainer, synthetic_manifest
from tomtit.transport import MemoryBroker
from tomtit.wire import Presence, Topics, encode_presence

JOB = "t"
T = Topics(JOB)
TARGET = np.linspace(-1, 1, SIZE).astype(np.float32)


def make_agent(tmp_path, broker, *, codec="f32", tau=5, device_id="d1", trainer=None, max_steps=None):
    m = synthetic_manifest()
    tr = trainer or QuadraticTrainer(TARGET, lr=0.05)
    return DeviceAgent(
        DeviceConfig(device_id=device_id, parent="edge", job=JOB, codec=codec, wait_for_model_s=0.0,
                     max_steps=max_steps, resend_after_s=1000.0),
        manifest=m, trainer=tr, batches=DummyBatches(), num_samples=50,
        meter=ModelMeter(busy_watts=5.0, idle_watts=1.0), scheduler=make_scheduler(f"fixed:{tau}"),
        transport=broker.client(device_id), state_dir=tmp_path / device_id,
    )


def make_node(tmp_path, broker):
    m = synthetic_manifest()
    return Node(NodeConfig(node_id="edge", job=JOB), manifest=m, initial_adapter=np.zeros(SIZE, np.float32),
                buffer=make_strategy("fedbuff", k_updates=1), transport=broker.client("edge"),
                state_dir=tmp_path / "edge")


def test_updates_flow_acks_clear_the_outbox_and_models_come_back(tmp_path):
    broker = MemoryBroker()
    node = make_node(tmp_path, broker)
    node.run_once(timeout=0)
    agent = make_agent(tmp_path, broker, max_steps=20)
    agent._on_connection_change()
    for _ in range(20):
        agent.step()
        node.run_once(timeout=0)
    agent.drain_inbound()
    assert agent.stats.syncs == 4 and agent.stats.intervals == [5, 5, 5, 5]
    assert agent.uplink.acked == 4 and len(agent.outbox) == 0
    assert node.version == 4 and agent.base_version == 4
    # With one device and server_lr 1, the node's model is exactly what the device sent.
    np.testing.assert_allclose(node.model, agent.reference, atol=1e-6)
    np.testing.assert_allclose(agent.trainer.get_adapter(), agent.reference, atol=1e-6)


def test_int8_error_feedback_loses_nothing(tmp_path):
    broker = MemoryBroker()
    node = make_node(tmp_path, broker)
    node.run_once(timeout=0)
    agent = make_agent(tmp_path, broker, codec="int8", tau=3)
    agent._on_connection_change()
    for _ in range(30):
        agent.step()
        node.run_once(timeout=0)
    agent.drain_inbound()
    local = agent.trainer.get_adapter()
    # What the node holds + what the device has not sent yet == the device's model, exactly:
    # int8 rounding is carried into the next update instead of being lost.
    np.testing.assert_allclose(node.model + (local - agent.reference), local, atol=1e-6)
    assert np.abs(local - node.model).max() < 0.05  # the residual stays at rounding size


def test_parent_model_is_merged_keeping_unsent_progress(tmp_path):
    from device_runtime.adapter import unflatten
    from tomtit.wire import ModelMessage, encode_message

    broker = MemoryBroker()
    parent = broker.client("edge")
    agent = make_agent(tmp_path, broker, tau=100)
    agent._on_connection_change()
    for _ in range(3):
        agent.step()
    local = agent.trainer.get_adapter()
    p = np.full(SIZE, 0.25, np.float32)
    parent.publish(T.down("edge"), encode_message(ModelMessage(
        kind="model", sender="edge", job=JOB, bundle_id=agent.manifest.bundle_id, base_version=0, version=7,
        num_samples=0, local_steps=0, train_loss=0.0, energy_j=0.0, is_delta=False, created_at=1.0,
        tensors=unflatten(p, SPECS))), retain=True)
    agent.drain_inbound()
    np.testing.assert_allclose(agent.trainer.get_adapter(), p + local, atol=1e-6)  # reference was 0
    np.testing.assert_array_equal(agent.reference, p)
    assert agent.base_version == 7


def test_foreign_or_corrupt_model_is_ignored_and_training_goes_on(tmp_path, caplog):
    from device_runtime.adapter import unflatten
    from tomtit.wire import ModelMessage, encode_message

    broker = MemoryBroker()
    parent = broker.client("edge")
    agent = make_agent(tmp_path, broker, tau=100)
    agent._on_connection_change()
    parent.publish(T.down("edge"), b"\x00garbage\xff" * 10, retain=True)
    parent.publish(T.down("edge"), encode_message(ModelMessage(
        kind="model", sender="edge", job=JOB, bundle_id="0123456789abcdef", base_version=0, version=3,
        num_samples=0, local_steps=0, train_loss=0.0, energy_j=0.0, is_delta=False, created_at=1.0,
        tensors=unflatten(np.ones(SIZE, np.float32), SPECS))), retain=True)
    for _ in range(3):
        agent.step()
    assert agent.stats.steps == 3 and agent.base_version == 0
    text = caplog.text
    assert "not_safetensors" in text and "wrong_bundle" in text


def test_killed_device_resends_unacked_updates_exactly_once(tmp_path):
    broker = MemoryBroker()
    agent = make_agent(tmp_path, broker, tau=4)
    agent._on_connection_change()
    for _ in range(12):  # 3 updates; no node is listening: nobody acks
        agent.step()
    assert len(agent.outbox) == 3
    agent.transport.crash()  # SIGKILL: no shutdown, no state flush beyond what sync wrote
    steps_before = agent.stats.steps
    node = make_node(tmp_path, broker)
    node.run_once(timeout=0)
    revived = make_agent(tmp_path, broker, tau=4)
    assert len(revived.outbox) == 3 and revived.stats.steps == steps_before
    np.testing.assert_array_equal(revived.reference, agent.reference)
    revived._on_connection_change()
    revived.flush_outbox()
    revived.flush_outbox()  # a second flush does not re-send before the timeout
    node.run_once(timeout=0)
    revived.drain_inbound()
    assert len(revived.outbox) == 0 and revived.uplink.acked == 3
    assert node.stats.accepted == 3 and node.stats.duplicates == 0 and node.version >= 1
    np.testing.assert_allclose(node.model, revived.reference, atol=1e-6)


def test_device_stops_when_its_parent_finishes(tmp_path):
    broker = MemoryBroker()
    parent = broker.client("edge")
    agent = make_agent(tmp_path, broker, tau=100)
    parent.publish(T.status("edge"), encode_presence(Presence("edge", "finished", "node", 3, 1.0)), retain=True)
    stats = agent.run(lambda: False)
    assert stats.stop_reason == "parent finished"
    status = broker.retained[T.status("d1")]
    assert b'"offline"' in status


def test_state_is_one_file_and_a_crash_between_staging_and_saving_is_counted(tmp_path):
    from device_runtime.agent import STATE_FILE

    broker = MemoryBroker()
    agent = make_agent(tmp_path, broker, tau=3)  # no node: updates stay in the outbox
    for _ in range(6):
        agent.step()
    assert agent.stats.syncs == 2 and len(agent.outbox) == 2
    assert sorted(p.name for p in (tmp_path / "d1").iterdir() if p.is_file()) == [STATE_FILE]
    local, reference = agent.trainer.get_adapter().copy(), agent.reference.copy()
    # crash right after the third update was staged, before the state was saved
    agent.save_state = lambda: None
    for _ in range(3):
        agent.step()
    assert len(agent.outbox) == 3
    from device_runtime.uplink import staged_delta

    staged = [u for u in agent.outbox.ids()][-1]
    again = make_agent(tmp_path, broker, tau=3)
    np.testing.assert_array_equal(again.trainer.get_adapter(), local)  # the last saved state...
    # ...with the staged update accounted for: it will be sent, so the reference moves past it
    # (otherwise the next update would carry that progress a second time)
    np.testing.assert_array_equal(again.reference, reference + staged_delta(again.outbox, staged, again.manifest))
    assert again.stats.syncs == 3 and len(again.outbox) == 3
    # and a clean restart changes nothing
    again.save_state()
    once_more = make_agent(tmp_path, broker, tau=3)
    np.testing.assert_array_equal(once_more.reference, again.reference)
    assert once_more.stats.syncs == 3


def test_a_half_written_outbox_entry_is_dropped_at_start(tmp_path):
    from tomtit.outbox import Outbox

    box = Outbox(tmp_path / "box")
    box.add("a" * 32, "t/x", b"kept", now=1.0)
    (tmp_path / "box" / ("b" * 32 + ".msg")).write_bytes(b"cut short before its .json")
    again = Outbox(tmp_path / "box")
    assert again.ids() == ["a" * 32] and again.payload("a" * 32) == b"kept"
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["a" * 32 + ".json", "a" * 32 + ".msg"]
    # a sidecar that exists but is damaged is not a crash's leftover: its payload is kept
    (tmp_path / "box" / ("a" * 32 + ".json")).write_text("{damaged")
    assert Outbox(tmp_path / "box").ids() == [] and (tmp_path / "box" / ("a" * 32 + ".msg")).read_bytes() == b"kept"



def test_unusable_state_is_reported_and_training_starts_from_the_bundle(tmp_path, caplog):
    from safetensors.numpy import save_file

    from device_runtime.agent import STATE_FILE

    broker = MemoryBroker()
    m = synthetic_manifest()
    (tmp_path / "d1").mkdir()
    bad = np.full(SIZE, np.nan, np.float32)
    save_file({"local": bad, "reference": bad}, str(tmp_path / "d1" / STATE_FILE),
              metadata={"bundle_id": m.bundle_id, "syncs": "3"})
    agent = make_agent(tmp_path, broker)
    assert agent.stats.syncs == 0 and np.isfinite(agent.trainer.get_adapter()).all()
    assert "cannot resume" in caplog.text
    (tmp_path / "d1" / STATE_FILE).write_bytes(b"not safetensors")
    agent = make_agent(tmp_path, broker)
    assert agent.stats.syncs == 0


class MeteredTrainer(QuadraticTrainer):
    def __init__(self, meter, **kw):
        super().__init__(TARGET, **kw)
        self.meter = meter

    def step(self, *a):
        self.meter.j += 1.0
        return super().step(*a)


def test_marginal_rule_inside_the_agent_a_late_joiner_under_a_quiet_parent_keeps_normal_intervals(tmp_path):
    """Issue 9: a device joining 10 versions late was told "lag 10" before merging, the lag was
    never cleared, and under a quiet parent it synced at tau_min for ever."""
    broker = MemoryBroker()
    m = synthetic_manifest()
    node = Node(NodeConfig(node_id="edge", job=JOB), manifest=m, initial_adapter=np.zeros(SIZE, np.float32),
                buffer=make_strategy("fedbuff", k_updates=1000, max_wait_s=1e9), transport=broker.client("edge"),
                state_dir=tmp_path / "edge")
    node.version = 10  # the federation is 10 versions in when this device arrives
    node.run_once(timeout=0)
    meter = CountingMeter()
    agent = DeviceAgent(
        DeviceConfig(device_id="d1", parent="edge", job=JOB, codec="f32", wait_for_model_s=0.0, resend_after_s=1e9,
                     link_joules_per_mb=2e4),
        manifest=m, trainer=MeteredTrainer(meter, lr=0.01), batches=DummyBatches(), num_samples=50, meter=meter,
        scheduler=make_scheduler("marginal:tau_min=2,tau_max=50,sync_cost_j=5,cheap_share=0,measure_first=no"), transport=broker.client("d1"),
        state_dir=tmp_path / "d1")
    # The Charnov test alone (cheap_share=0, measure_first=no), with a sync that costs a few joules
    # (a costly radio: the update's bytes x 2e4 J/MB): with a free sync the optimum is tau_min
    # anyway, and that would hide the staleness bug.
    agent._on_connection_change()
    for _ in range(150):
        agent.step()
        node.run_once(timeout=0)
    assert agent.base_version == 10 and agent.stats.models_adopted == 1
    assert agent.stats.syncs >= 2
    assert min(agent.stats.intervals) > 2, agent.stats.intervals  # before the fix: [2, 2, 2, ...]
    assert not any("versions ahead" in r for r in agent.stats.reasons)


def test_synchronous_rounds_wait_for_the_parent_model(tmp_path):
    broker = MemoryBroker()
    m = synthetic_manifest()
    node = Node(NodeConfig(node_id="edge", job=JOB), manifest=m, initial_adapter=np.zeros(SIZE, np.float32),
                buffer=make_strategy("fedavg", expected_children=2), transport=broker.client("edge"),
                state_dir=tmp_path / "edge")
    node.run_once(timeout=0)
    a = [DeviceAgent(DeviceConfig(device_id=f"d{i}", parent="edge", job=JOB, codec="f32", wait_for_model_s=0.0,
                                  resend_after_s=1e9, wait_for_parent=True),
                     manifest=m, trainer=QuadraticTrainer(TARGET, lr=0.05), batches=DummyBatches(), num_samples=50,
                     meter=CountingMeter(), scheduler=make_scheduler("fixed:3"), transport=broker.client(f"d{i}"),
                     state_dir=tmp_path / f"d{i}") for i in (1, 2)]
    for ag in a:
        ag._on_connection_change()
    for _ in range(3):
        assert a[0].step()
    assert a[0].waiting_for_parent
    for _ in range(5):  # d1 waits: no steps while d2 has not sent
        assert not a[0].step()
        node.run_once(timeout=0)
    assert a[0].stats.steps == 3 and node.version == 0
    for _ in range(3):
        a[1].step()
    node.run_once(timeout=0)
    assert node.version == 1
    assert a[0].step() and not a[0].waiting_for_parent and a[0].base_version == 1


def test_a_sync_waits_while_the_link_still_sends_the_previous_update(tmp_path):
    """A new update would queue behind the last one on a slow link and arrive stale: the sync is
    postponed (not dropped) until the link is free, and then carries every step trained meanwhile."""
    broker = MemoryBroker()
    node = make_node(tmp_path, broker)
    node.run_once(timeout=0)
    agent = make_agent(tmp_path, broker, tau=2)
    agent._on_connection_change()
    busy = {"on": False}
    type(agent.transport).publishing = property(lambda self: busy["on"])  # this test's client only
    try:
        agent.step(); agent.step()  # sync 1
        busy["on"] = True
        for _ in range(5):
            agent.step()  # due at k=2, 3, 4, 5: postponed
        assert agent.stats.syncs == 1 and agent.stats.postponed == 4
        busy["on"] = False
        agent.step()
        assert agent.stats.syncs == 2 and agent.stats.intervals == [2, 6]
    finally:
        del type(agent.transport).publishing
