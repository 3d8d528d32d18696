"""Served inference: the wire (request/reply, limits, reply topics), the device's InferenceServer
over the in-memory broker with a tiny bundle, the agent serving between its training steps, and
`tomtit infer --remote` answered by a training device over a real Mosquitto (MQTT 3.1.1 and 5)."""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from tomtit.transport import Inbound, MemoryBroker
from tomtit.wire.infer import reply_address
from tomtit.wire import (MAX_REQUEST_BYTES, MAX_TEXT_CHARS, MAX_TEXTS_PER_REQUEST, InferReply, InferRequest,
                         Topics, WireError, decode_reply, decode_request, encode_reply, encode_request, reply_topic,
                         reply_topic_hint)

JOB = "t"
T = Topics(JOB)
DEV = "d1"


# -- the wire ---------------------------------------------------------------------------------
def test_topics_are_exact():
    assert T.infer_request("d1") == "tomtit/t/infer/d1/request"
    assert T.infer_reply("d1", "c7") == "tomtit/t/infer/d1/reply/c7"
    assert T.infer_request_filter() == "tomtit/t/infer/+/request"
    assert T.infer_reply_filter("d1") == "tomtit/t/infer/d1/reply/+"
    assert T.infer_reply_filter() == "tomtit/t/infer/+/reply/+"
    assert T.parse_infer_reply("tomtit/t/infer/d1/reply/c7") == ("d1", "c7")
    for bad in ("tomtit/t/infer/d1/reply", "tomtit/t/infer/d1/reply/c7/x", "tomtit/other/infer/d1/reply/c7",
                "tomtit/t/infer/d1/request", "tomtit/t/infer/d 1/reply/c7"):
        with pytest.raises(WireError) as e:
            T.parse_infer_reply(bad)
        assert e.value.reason == "bad_reply_topic"


def test_request_and_reply_round_trip_with_exact_bytes():
    req = InferRequest(texts=("goal!", "shares fell"), adapter="local", reply_to=T.infer_reply(DEV, "c1"), id="r1")
    data = encode_request(req)
    assert data == (b'{"adapter":"local","id":"r1","reply_to":"tomtit/t/infer/d1/reply/c1",'
                    b'"texts":["goal!","shares fell"]}')
    assert decode_request(data) == req
    assert decode_request(b'{"texts":["x"]}') == InferRequest(texts=("x",))  # adapter defaults to global
    rep = InferReply(device=DEV, ok=True, id="r1", adapter="local", version=4, step=17, labels=("a", "b"),
                     results=({"label": "b", "probabilities": [0.25, 0.75]},), queued_ms=1.5, infer_ms=3.25)
    data = encode_reply(rep)
    assert json.loads(data) == {"device": "d1", "ok": True, "id": "r1", "adapter": "local", "version": 4, "step": 17,
                                "labels": ["a", "b"], "results": [{"label": "b", "probabilities": [0.25, 0.75]}],
                                "queued_ms": 1.5, "infer_ms": 3.25}
    back = decode_reply(data)
    assert back == rep and back.probabilities(0) == {"a": 0.25, "b": 0.75}
    err = decode_reply(encode_reply(InferReply(device=DEV, ok=False, id="r1", error="busy", detail="later")))
    assert (err.ok, err.error, err.detail, err.id) == (False, "busy", "later", "r1")


def _req(**fields) -> bytes:
    obj = {"texts": ["hello"], "reply_to": T.infer_reply(DEV, "c1"), **fields}
    return json.dumps(obj).encode()


@pytest.mark.parametrize("payload, reason", [
    (_req(texts=["x"] * (MAX_TEXTS_PER_REQUEST + 1)), "too_many_texts"),
    (_req(texts=["x" * (MAX_TEXT_CHARS + 1)]), "text_too_long"),
    (b'{"texts": ["a"], "reply_to": ', "not_json"),
    (b'{"texts": ["a"], "texts": ["b"]}', "not_json"),  # a repeated key
    (b'["a"]', "not_json"),
    (_req(adapter="newest"), "bad_adapter"),
    (_req(texts=[]), "bad_schema"),
    (_req(texts="hello"), "bad_schema"),
    (_req(texts=[1]), "bad_schema"),
    (_req(id="not an id!"), "bad_schema"),
    (b'{"adapter": "global"}', "bad_schema"),
    (b"", "empty"),
    (_req(texts=["x" * 1000] * 16, pad="y" * MAX_REQUEST_BYTES), "too_large"),
])
def test_bad_requests_are_refused_with_a_reason(payload, reason):
    with pytest.raises(WireError) as e:
        decode_request(payload)
    assert e.value.reason == reason


def test_the_reply_topic_must_be_the_devices_own():
    mine, theirs = T.infer_reply(DEV, "c1"), T.infer_reply("d2", "c1")
    assert reply_topic(T, DEV, reply_to=mine) == mine
    assert reply_topic(T, DEV, reply_to=theirs, response_topic=mine) == mine  # MQTT 5's property wins
    for kwargs, reason in [({}, "no_reply_topic"), ({"reply_to": ""}, "no_reply_topic"),
                           ({"reply_to": theirs}, "bad_reply_topic"),
                           ({"reply_to": T.down("edge")}, "bad_reply_topic"),
                           ({"reply_to": theirs, "response_topic": "a/b"}, "bad_reply_topic"),
                           ({"response_topic": theirs}, "bad_reply_topic")]:
        with pytest.raises(WireError) as e:
            reply_topic(T, DEV, **kwargs)
        assert e.value.reason == reason, kwargs


def test_an_invalid_response_topic_falls_back_to_a_valid_reply_to():
    mine = T.infer_reply(DEV, "c1")
    for bad in ("a/b", T.infer_reply("d2", "c1"), T.infer_request(DEV)):
        assert reply_topic(T, DEV, reply_to=mine, response_topic=bad) == mine, bad
    with pytest.raises(WireError) as e:  # neither valid: the Response Topic's problem is reported
        reply_topic(T, DEV, reply_to="x/y", response_topic=T.infer_reply("d2", "c1"))
    assert "d2" in str(e.value)


def test_an_unpaired_surrogate_is_refused_as_bad_text():
    payload = b'{"texts": ["fine", "bad \\ud800 text"], "reply_to": "' + T.infer_reply(DEV, "c1").encode() + b'"}'
    assert json.loads(payload)["texts"][1] == "bad \ud800 text"  # JSON lets it through...
    with pytest.raises(UnicodeEncodeError):
        "bad \ud800 text".encode("utf-8")  # ...but no tokenizer can encode it
    with pytest.raises(WireError) as e:
        decode_request(payload)
    assert e.value.reason == "bad_text" and "texts[1]" in str(e.value)
    assert decode_request(json.dumps({"texts": ["pair \U0001F600 ok"]}).encode()).texts == ("pair \U0001F600 ok",)


def test_a_reply_topic_is_found_at_the_head_of_an_undecodable_request():
    big = encode_request(InferRequest(texts=("x" * MAX_TEXT_CHARS,) * MAX_TEXTS_PER_REQUEST,
                                      reply_to=T.infer_reply(DEV, "c1")))
    assert reply_topic_hint(big + b"x" * MAX_REQUEST_BYTES) == T.infer_reply(DEV, "c1")  # keys sorted: it comes first
    assert reply_topic_hint(b'{"reply_to": "tomtit/t/infer/d1/reply/c1", "texts": [') == T.infer_reply(DEV, "c1")
    assert reply_topic_hint(b'{"texts": ["a"]}') == ""
    assert reply_topic_hint(b"\xff" * 5000) == ""
    # a refused request that parses gives its reply_to and id wherever they are
    late = json.dumps({"texts": ["x" * 5000], "reply_to": T.infer_reply(DEV, "c1"), "id": "r9"}).encode()
    assert reply_address(late) == (T.infer_reply(DEV, "c1"), "r9")
    assert reply_address(b'{"reply_to": 5, "id": "not an id!"}') == ("", "")
    assert reply_address(b'{"reply_to":"tomtit/t/infer/d1/reply/c1","texts":[') == (T.infer_reply(DEV, "c1"), "")


@pytest.mark.parametrize("change", [
    {"labels": ["a", "b"], "results": [{"label": "c", "probabilities": [0.5, 0.5]}]},
    {"results": [{"label": "a", "probabilities": [0.5]}]},
    {"results": [{"label": "a", "probabilities": [1.5, 0.5]}]},
    {"results": [{"label": "a", "probabilities": [float("nan"), 0.5]}]},
    {"results": []},
    {"error": "busy"},
    {"ok": "yes"},
    {"version": -1},
    {"adapter": "newest"},
])
def test_bad_replies_are_refused(change):
    obj = {"device": DEV, "ok": True, "id": "", "adapter": "global", "version": 1, "step": 2, "labels": ["a", "b"],
           "results": [{"label": "a", "probabilities": [0.5, 0.5]}], **change}
    with pytest.raises(WireError):
        decode_reply(json.dumps(obj).encode())


# -- the server, in memory, with a tiny bundle ----------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    """(bundle, a classifier for the server, an independent one for expected answers, initial adapter)."""
    from device_runtime.adapter import load_adapter
    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier

    bundle = open_bundle(tiny_bundle, roles=("inference_model", "tokenizer", "initial_adapter"))
    adapter = load_adapter(bundle.path("initial_adapter"), bundle.manifest)
    return bundle, Classifier(bundle, memory="lean"), Classifier(bundle), adapter  # lean as served, fast as infer


class Adapters:
    """An AdapterSource with fixed adapters."""

    def __init__(self, global_params, local_params, version=3, step=11):
        from device_runtime.serving import ServedAdapter

        self.g = None if global_params is None else ServedAdapter(global_params, version, step)
        self.l = ServedAdapter(local_params, version, step)

    def served_adapter(self, kind):
        return self.g if kind == "global" else self.l


class Client:
    def __init__(self, broker: MemoryBroker, token: str = "c1"):
        self.t = broker.client(f"client-{token}")
        self.reply_to = T.infer_reply(DEV, token)
        self.t.subscribe(self.reply_to)

    def ask(self, texts, adapter="global", rid="", reply_to=None, **props) -> None:
        req = InferRequest(texts=tuple(texts), adapter=adapter, id=rid,
                           reply_to=self.reply_to if reply_to is None else reply_to)
        self.t.publish(T.infer_request(DEV), encode_request(req), **props)

    def replies(self) -> list[tuple[InferReply, Inbound]]:
        out = []
        while (m := self.t.get(0)) is not None:
            out.append((decode_reply(m.payload), m))
        return out


def make_server(broker, tiny, **cfg):
    from device_runtime.serving import InferenceServer, ServeConfig

    _, clf, _, _ = tiny
    t = broker.client(DEV)
    server = InferenceServer(ServeConfig(device_id=DEV, job=JOB, **cfg), transport=t, load_classifier=lambda: clf)
    server.subscribe()
    return server, t


def pump(server, t) -> None:
    """What the agent's drain_inbound does for requests."""
    while (m := t.get(0)) is not None:
        server.offer(m)


def test_one_batch_per_serve_same_answers_as_local_infer(tiny):
    _, _, reference, init = tiny
    broker = MemoryBroker()
    server, t = make_server(broker, tiny)
    client = Client(broker)
    g, loc = init, init + np.float32(0.05)
    texts = [f"football match goal {i}" for i in range(10)]
    client.ask(texts, rid="a")  # 10 texts
    client.ask(texts[:6], rid="b")  # 10 + 6 = 16: shares the batch
    client.ask(texts[:1], rid="c")  # 17 > 16: the next batch
    client.ask(["market shares"], adapter="local", rid="d")  # another adapter: its own batch
    pump(server, t)
    src = Adapters(g, loc)
    assert server.serve(src) == 16 and [r.id for r, _ in client.replies()] == ["a", "b"]
    assert server.serve(src) == 1 and [r.id for r, _ in client.replies()] == ["c"]
    assert server.serve(src) == 1
    [(d, _)] = client.replies()
    assert server.serve(src) == 0 and server.stats.batches == 3
    assert (d.id, d.adapter, d.version, d.step) == ("d", "local", 3, 11)
    expected = reference.predict(["market shares"], loc)[0]
    assert d.results[0].label == expected.label
    np.testing.assert_allclose(list(d.probabilities(0).values()), list(expected.probabilities.values()), atol=1e-5)
    assert list(d.labels) == list(reference.manifest.labels)


def test_a_batch_answers_exactly_as_predict_per_request(tiny):
    _, _, reference, init = tiny
    broker = MemoryBroker()
    server, t = make_server(broker, tiny)
    client = Client(broker)
    texts = ["film music actor award", "bank profit economy shares market", "the"]
    client.ask(texts[:2], rid="a")
    client.ask(texts[2:], rid="b")
    pump(server, t)
    server.serve(Adapters(init, init))
    replies = {r.id: r for r, _ in client.replies()}
    for rid, part in (("a", texts[:2]), ("b", texts[2:])):
        for i, p in enumerate(reference.predict(part, init)):  # alone, unpadded by the other request's texts
            assert replies[rid].results[i].label == p.label
            np.testing.assert_allclose(list(replies[rid].probabilities(i).values()), list(p.probabilities.values()),
                                       atol=1e-5)


def test_a_full_queue_answers_busy_at_once(tiny):
    _, _, _, init = tiny
    broker = MemoryBroker()
    server, t = make_server(broker, tiny, max_queued=2)
    client = Client(broker)
    for rid in ("a", "b", "c"):
        client.ask(["goal"], rid=rid)
    pump(server, t)
    [(busy, _)] = client.replies()  # before any serve
    assert (busy.ok, busy.error, busy.id) == (False, "busy", "c")
    assert server.pending == 2 and server.stats.errors == {"busy": 1}
    server.serve(Adapters(init, init))
    assert sorted(r.id for r, _ in client.replies() if r.ok) == ["a", "b"]


def test_bad_requests_get_error_replies_and_nothing_breaks(tiny):
    _, _, _, init = tiny
    broker = MemoryBroker()
    server, t = make_server(broker, tiny)
    client = Client(broker)
    raw, req_topic = client.t, T.infer_request(DEV)
    mine = client.reply_to
    raw.publish(req_topic, json.dumps({"texts": ["x"] * 17, "reply_to": mine, "id": "many"}).encode())
    raw.publish(req_topic, json.dumps({"texts": ["x" * 5000], "reply_to": mine, "id": "long"}).encode())
    raw.publish(req_topic, json.dumps({"texts": ["x"], "adapter": "newest", "reply_to": mine}).encode())
    raw.publish(req_topic, b'{"reply_to": "' + mine.encode() + b'", "texts": [oops')  # not JSON: topic from its head
    # too large: shed by the transport before it is queued (Transport.shed), so no reply, counted
    raw.publish(req_topic, b'{"reply_to":"' + mine.encode() + b'","texts":["' + b"x" * MAX_REQUEST_BYTES + b'"]}')
    raw.publish(req_topic, json.dumps({"texts": ["x"]}).encode())  # nowhere to reply: dropped
    raw.publish(req_topic, json.dumps({"texts": ["x"], "reply_to": T.infer_reply("d2", "c1")}).encode())  # not ours
    raw.publish(req_topic, json.dumps({"texts": ["x"], "reply_to": T.down("edge")}).encode())
    raw.publish(req_topic, b"\x00\xff" * 100)
    pump(server, t)
    assert server.serve(Adapters(init, init)) == 0  # nothing was queued
    got = [(r.ok, r.error, r.id) for r, m in client.replies()]
    assert got == [(False, "too_many_texts", "many"), (False, "text_too_long", "long"), (False, "bad_adapter", ""),
                   (False, "not_json", "")]
    assert server.stats.unanswerable == 4 and server.stats.requests == 8
    assert server.summary()["shed"] == {"too_large": 1}
    assert broker.retained == {}  # nothing published anywhere else


def test_mqtt5_response_topic_and_correlation_data(tiny):
    _, _, _, init = tiny
    broker = MemoryBroker()
    server, t = make_server(broker, tiny)
    client = Client(broker, "v5")
    body = encode_request(InferRequest(texts=("goal",)))  # no reply_to, no id: the properties carry them
    client.t.publish(T.infer_request(DEV), body, response_topic=client.reply_to, correlation_data=b"\x01corr")
    client.t.publish(T.infer_request(DEV), encode_request(InferRequest(texts=("x",), adapter="local")),
                     response_topic=client.reply_to, correlation_data=b"x" * 300)  # too long to echo
    pump(server, t)
    server.serve(Adapters(init, init))
    (bad, m_bad), (ok, m_ok) = client.replies()  # the error is sent at once, the answer after the batch
    assert (ok.ok, ok.id, m_ok.topic, m_ok.correlation_data) == (True, "", client.reply_to, b"\x01corr")
    assert (bad.ok, bad.error, m_bad.correlation_data) == (False, "bad_correlation", None)
    # a Response Topic that is not ours, with a valid reply_to in the JSON: answered on reply_to
    client.ask(["goal"], rid="fallback", response_topic="elsewhere/x")
    pump(server, t)
    server.serve(Adapters(init, init))
    [(r, m)] = client.replies()
    assert (r.ok, r.id, m.topic) == (True, "fallback", client.reply_to)


def test_no_global_model_yet_unavailable_and_closing(tiny):
    from device_runtime.serving import InferenceServer, ServeConfig

    _, _, _, init = tiny
    broker = MemoryBroker()
    server, t = make_server(broker, tiny)
    client = Client(broker)
    client.ask(["goal"], rid="g")
    client.ask(["goal"], adapter="local", rid="l")
    client.ask(["goal"], rid="q")
    pump(server, t)
    src = Adapters(None, init)
    server.serve(src)
    server.serve(src)
    server.close()
    got = [(r.id, r.ok, r.error) for r, _ in client.replies()]
    assert got == [("g", False, "no_global_model"), ("l", True, ""), ("q", False, "unavailable")]

    def broken():
        raise OSError("inference.onnx: no such file")

    t2 = broker.client("d1-broken")
    server = InferenceServer(ServeConfig(device_id=DEV, job=JOB), transport=t2, load_classifier=broken)
    server.subscribe()
    client.ask(["a"], adapter="local", rid="x")
    pump(server, t2)
    assert server.serve(src) == 0
    client.ask(["a"], adapter="local", rid="y")  # refused at once now
    pump(server, t2)
    got = [(r.id, r.error, "no such file" in r.detail) for r, _ in client.replies()]
    assert got == [("x", "unavailable", True), ("y", "unavailable", True)]


# -- the agent: serving between its training steps ------------------------------------------
def make_device(tmp_path, broker, tiny, *, serve=True):
    from device_runtime.agent import DeviceAgent, DeviceConfig
    from device_runtime.energy import ModelMeter
    from device_runtime.local_data import BatchStream, encode_dataset
    from device_runtime.scheduler import make_scheduler
    from device_runtime.serving import InferenceServer, ServeConfig
    from device_runtime.text import TextEncoder
    from device_runtime.trainer import TrainerConfig, make_trainer
    from conftest import write_tiny_dataset
    from tomtit.data import load_dataset

    bundle, clf, _, _ = tiny
    m = bundle.manifest
    data = encode_dataset(load_dataset(str(write_tiny_dataset(tmp_path / "d.jsonl", n_per_class=8))),
                          TextEncoder(bundle.path("tokenizer"), m.max_length), m)
    transport = broker.client(DEV)
    server = InferenceServer(ServeConfig(device_id=DEV, job=JOB), transport=transport,
                             load_classifier=lambda: clf) if serve else None
    return DeviceAgent(
        DeviceConfig(device_id=DEV, parent="edge", job=JOB, codec="f32", wait_for_model_s=0.0, resend_after_s=1000.0),
        manifest=m, trainer=make_trainer(bundle, TrainerConfig(learning_rate=1e-2), "portable"),
        batches=BatchStream(data, 4, seed=0), num_samples=len(data), meter=ModelMeter(busy_watts=5.0, idle_watts=1.0),
        scheduler=make_scheduler("fixed:1000"), transport=transport, state_dir=tmp_path / "state", server=server)


def publish_model(broker, manifest, params, version) -> None:
    from device_runtime.adapter import unflatten
    from tomtit.wire import ModelMessage, encode_message

    broker.client("edge").publish(T.down("edge"), encode_message(ModelMessage(
        kind="model", sender="edge", job=JOB, bundle_id=manifest.bundle_id, base_version=0, version=version,
        num_samples=0, local_steps=0, train_loss=0.0, energy_j=0.0, is_delta=False, created_at=1.0,
        tensors=unflatten(params, manifest.trainable))), retain=True)


def test_the_agent_serves_one_batch_per_step_with_each_adapters_version(tmp_path, tiny):
    bundle, _, reference, init = tiny
    broker = MemoryBroker()
    parent_params = init + np.float32(0.01)
    publish_model(broker, bundle.manifest, parent_params, version=5)
    agent = make_device(tmp_path, broker, tiny)
    agent._on_connection_change()
    agent.drain_inbound()
    assert agent.base_version == 5
    client = Client(broker)
    full = [f"goal league team {i}" for i in range(MAX_TEXTS_PER_REQUEST)]
    client.ask(full, rid="g1")
    client.ask(full, adapter="local", rid="l1")
    client.ask(full, rid="g2")
    for k in range(3):
        steps, batches = agent.stats.steps, agent.server.stats.batches
        local_before = agent.trainer.get_adapter().copy()  # what a "local" request served before this step sees
        agent.step()
        assert agent.stats.steps == steps + 1 and agent.server.stats.batches == batches + 1  # one of each
        [(r, _)] = client.replies()
        assert r.ok and r.id == ("g1", "l1", "g2")[k] and r.version == 5 and r.step == k
        expected = reference.predict(full[:1], parent_params if r.adapter == "global" else local_before)[0]
        np.testing.assert_allclose(list(r.probabilities(0).values()), list(expected.probabilities.values()),
                                   atol=1e-5)
    agent.step()
    assert client.replies() == [] and agent.server.pending == 0
    s = agent.summary()["serving"]
    assert (s["requests"], s["answered"], s["texts"], s["batches"]) == (3, 3, 48, 3)
    assert agent.stats.serve_joules > 0


def test_without_a_server_the_agent_ignores_requests(tmp_path, tiny):
    broker = MemoryBroker()
    agent = make_device(tmp_path, broker, tiny, serve=False)
    agent._on_connection_change()
    client = Client(broker)
    client.ask(["goal"], rid="a")
    agent.step()
    assert client.replies() == [] and "serving" not in agent.summary()
    assert T.infer_request(DEV) not in agent.transport._filters  # not even subscribed


# -- end to end: `tomtit infer --remote` against a training device on Mosquitto -------------
@pytest.mark.mosquitto
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_infer_remote_is_answered_by_a_training_device(tmp_path, mosquitto, tiny_bundle, tiny_data, protocol):
    from conftest import run_tomtit, spawn_tomtit, wait_for
    from tomtit.mqtt import MqttOptions, MqttTransport

    job = f"serve{protocol.replace('.', '')}"
    t = Topics(job)
    logs = {"cloud": tmp_path / "cloud.log", "dev": tmp_path / "dev.log"}
    summary = tmp_path / "dev.json"
    procs = {
        "cloud": spawn_tomtit(["node", "run", "--id", "cloud", "--bundle", str(tiny_bundle), "--broker", mosquitto.url,
                               "--job", job, "--k", "1", "--state-dir", str(tmp_path / "s-cloud")], logs["cloud"]),
        "dev": spawn_tomtit(["device", "run", "--id", "dev1", "--parent", "cloud", "--bundle", str(tiny_bundle),
                             "--data", str(tiny_data), "--broker", mosquitto.url, "--job", job, "--mqtt-protocol",
                             protocol, "--scheduler", "fixed:5", "--energy", "model:rpi4", "--state-dir",
                             str(tmp_path / "s-dev"), "--summary", str(summary)], logs["dev"]),
    }
    try:
        wait_for(lambda: "adopted parent model" in logs["dev"].read_text(), 120, "the device's first model", logs)
        common = ["--broker", mosquitto.url, "--job", job, "--mqtt-protocol", protocol, "--timeout", "60"]
        texts = ["football match goal team", "market shares bank profit"]
        r = run_tomtit(["infer", "--remote", "dev1", *common, "--json", *texts], no_torch=True, timeout=120)
        assert r.returncode == 0, r.stderr + logs["dev"].read_text()[-1500:]
        out = json.loads(r.stdout)
        assert (out["device"], out["adapter"]) == ("dev1", "global") and out["version"] >= 0
        assert [p["text"] for p in out["predictions"]] == texts
        assert all(p["label"] in ("alpha", "beta", "gamma") and abs(sum(p["probabilities"].values()) - 1) < 1e-4
                   for p in out["predictions"])
        long_text = "football goal " * 300  # 4,200 characters: cut to the device's limit by the client
        r = run_tomtit(["infer", "--remote", "dev1", *common, "--adapter-kind", "local", *texts, long_text],
                       timeout=120)
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.splitlines()) == 3 and "local adapter" in r.stderr  # the table, as local infer prints
        assert "were cut to their first 2048" in r.stderr
        r = run_tomtit(["infer", "--remote", "dev1", *common, *(["x"] * 17)], timeout=60)
        assert r.returncode == 2 and "too_many_texts" in r.stderr  # refused before it is sent

        # the raw protocol: MQTT 5 properties only (no reply_to, no id in the JSON), or 3.1.1's JSON
        raw = MqttTransport(MqttOptions(url=mosquitto.url, client_id=f"raw-{job}", protocol=protocol,
                                        persistent=False)).start()
        try:
            assert raw.wait_connected(10)
            reply_to = t.infer_reply("dev1", "raw")
            raw.subscribe(reply_to, qos=0)
            v5 = protocol == "5"

            def ask(body: dict, corr: bytes) -> tuple[InferReply, Inbound]:
                if not v5:
                    body = {**body, "reply_to": reply_to, "id": corr.decode()}
                raw.publish(t.infer_request("dev1"), json.dumps(body).encode(), qos=1,
                            **({"response_topic": reply_to, "correlation_data": corr} if v5 else {}))
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    m = raw.get(0.5)
                    if m is not None:
                        reply = decode_reply(m.payload)
                        if (m.correlation_data if v5 else reply.id.encode()) == corr:
                            return reply, m
                raise AssertionError(f"no reply to {corr!r}: {logs['dev'].read_text()[-1500:]}")

            ok, m = ask({"texts": ["concert film actor"]}, b"c1")
            assert ok.ok and ok.results[0].label in ("alpha", "beta", "gamma") and m.topic == reply_to
            assert ok.id == ("" if v5 else "c1")  # on MQTT 5 the device answered through the properties
            bad, _ = ask({"texts": ["x"] * 17}, b"c2")
            assert (bad.ok, bad.error) == (False, "too_many_texts")
        finally:
            raw.close()
    finally:
        procs["dev"].send_signal(signal.SIGTERM)
        rc = procs["dev"].wait(60)
        procs["cloud"].send_signal(signal.SIGTERM)
        procs["cloud"].wait(60)
    assert rc == 0, logs["dev"].read_text()[-2000:]
    s = json.loads(summary.read_text())
    assert s["steps"] > 0 and s["serving"]["answered"] >= 3 and s["serving"]["errors"] == {"too_many_texts": 1}


# -- hostile and broken requests, floods ---------------------------------------------------------
class Rigged:
    """The served classifier, except: a batch holding "poison" raises (as a tokenizer would), and
    texts "nan" / "inf" come out as NaN / +inf logits."""

    def __init__(self, clf):
        self.clf, self.manifest, self.calls = clf, clf.manifest, []

    def logits_for_texts(self, texts, adapter, batch_size=32):
        self.calls.append(list(texts))
        if "poison" in texts:
            raise ValueError("the tokenizer choked")
        out = self.clf.logits_for_texts(texts, adapter, batch_size=batch_size).copy()
        for i, t in enumerate(texts):
            if t in ("nan", "inf"):
                out[i, :] = float(t)
        return out


def rigged_server(broker, tiny, **cfg):
    from device_runtime.serving import InferenceServer, ServeConfig

    rigged = Rigged(tiny[1])
    t = broker.client(DEV)
    server = InferenceServer(ServeConfig(device_id=DEV, job=JOB, **cfg), transport=t, load_classifier=lambda: rigged)
    server.subscribe()
    return server, t, rigged


def assert_answers_as_reference(reply, reference, texts, adapter):
    assert reply.ok, reply
    for i, p in enumerate(reference.predict(texts, adapter)):
        assert reply.results[i].label == p.label
        np.testing.assert_allclose(list(reply.probabilities(i).values()), list(p.probabilities.values()), atol=1e-5)


def test_a_lone_surrogate_text_fails_only_its_own_request(tiny):
    """JSON's \\ud800 decodes to a str no tokenizer can encode; it used to share a batch with an
    innocent request and fail both with "internal"."""
    _, _, reference, init = tiny
    broker = MemoryBroker()
    server, t = make_server(broker, tiny)
    client = Client(broker)
    client.ask(["goal league"], rid="before")
    client.t.publish(T.infer_request(DEV), b'{"texts": ["a \\ud800 b"], "id": "evil", "reply_to": "'
                     + client.reply_to.encode() + b'"}')
    client.ask(["market shares"], rid="after")
    pump(server, t)
    assert server.serve(Adapters(init, init)) == 2
    replies = {r.id: r for r, _ in client.replies()}
    assert (replies["evil"].ok, replies["evil"].error) == (False, "bad_text")
    assert_answers_as_reference(replies["before"], reference, ["goal league"], init)
    assert_answers_as_reference(replies["after"], reference, ["market shares"], init)


def test_a_failing_batch_is_retried_one_request_at_a_time_and_logged_once(tiny, caplog):
    _, _, reference, init = tiny
    broker = MemoryBroker()
    server, t, rigged = rigged_server(broker, tiny)
    client = Client(broker)
    client.ask(["goal league"], rid="a")
    client.ask(["poison", "film"], rid="evil")
    client.ask(["market shares"], rid="b")
    pump(server, t)
    src = Adapters(init, init)
    with caplog.at_level("DEBUG", logger="tomtit.serving"):
        assert server.serve(src) == 0 and client.replies() == []  # the merged batch failed: nobody answered yet
        assert [server.serve(src) for _ in range(4)] == [1, 0, 1, 0]  # then one run per gap, each alone
        for rid in ("evil2", "evil3"):  # more hostile requests: the log does not grow a traceback each
            client.ask(["poison"], rid=rid)
        pump(server, t)
        assert [server.serve(src) for _ in range(3)] == [0, 0, 0]  # merged, failed, then each alone
    assert rigged.calls == [["goal league", "poison", "film", "market shares"], ["goal league"],
                            ["poison", "film"], ["market shares"], ["poison", "poison"], ["poison"], ["poison"]]
    replies = {r.id: r for r, _ in client.replies()}
    assert_answers_as_reference(replies["a"], reference, ["goal league"], init)
    assert_answers_as_reference(replies["b"], reference, ["market shares"], init)
    assert [(replies[r].ok, replies[r].error) for r in ("evil", "evil2", "evil3")] == [(False, "internal")] * 3
    assert server.stats.errors == {"internal": 3} and server.stats.answered == 2
    assert sum(1 for r in caplog.records if r.exc_info) == 1  # one traceback, then debug lines
    assert sum(1 for r in caplog.records if r.levelname in ("WARNING", "ERROR")) <= 3  # one per reason


def test_non_finite_output_is_an_error_not_a_label(tiny):
    _, _, reference, init = tiny
    broker = MemoryBroker()
    server, t, _ = rigged_server(broker, tiny)
    client = Client(broker)
    client.ask(["goal league"], rid="a")
    client.ask(["nan"], rid="n")
    client.ask(["film", "inf"], rid="i")
    pump(server, t)
    assert server.serve(Adapters(init, init)) == 4  # one batch, as before
    replies = {r.id: r for r, _ in client.replies()}
    assert_answers_as_reference(replies["a"], reference, ["goal league"], init)
    for rid in ("n", "i"):
        assert (replies[rid].ok, replies[rid].error, replies[rid].results) == (False, "non_finite", ())
    assert server.stats.errors == {"non_finite": 2} and server.stats.answered == 1


def test_error_replies_are_rate_limited_per_device(tiny):
    from device_runtime.serving import InferenceServer, ServeConfig

    now = [100.0]
    broker = MemoryBroker()
    t = broker.client(DEV)
    server = InferenceServer(ServeConfig(device_id=DEV, job=JOB, error_reply_burst=3, error_replies_per_s=2.0),
                             transport=t, load_classifier=lambda: tiny[1], clock=lambda: now[0])
    server.subscribe()
    client = Client(broker)
    raw = json.dumps({"texts": ["x"] * (MAX_TEXTS_PER_REQUEST + 1), "reply_to": client.reply_to}).encode()
    for _ in range(10):
        client.t.publish(T.infer_request(DEV), raw)
    pump(server, t)
    assert len(client.replies()) == 3  # the burst
    now[0] += 1.5  # 1.5 s x 2/s = 3 more tokens
    for _ in range(5):
        client.t.publish(T.infer_request(DEV), raw)
    pump(server, t)
    assert len(client.replies()) == 3
    s = server.summary()
    assert s["errors"] == {"too_many_texts": 15} and s["errors_unsent"] == 15 - 6 and s["requests"] == 15


def test_the_transport_sheds_oversize_and_excess_requests_before_queueing(tiny):
    from types import SimpleNamespace

    from tomtit.mqtt import MqttOptions, MqttTransport

    broker = MemoryBroker()
    server, t = make_server(broker, tiny, max_inbound=5)
    t.subscribe("other/topic")
    client = Client(broker)
    huge = b'{"texts":["' + b"x" * MAX_REQUEST_BYTES + b'"]}'
    client.t.publish(T.infer_request(DEV), huge)
    for i in range(8):
        client.ask(["goal"], rid=f"r{i}")
        client.t.publish("other/topic", b"m%d" % i)  # not requests: never shed
    got = []
    while (m := t.get(0)) is not None:
        got.append(m.topic)
    assert got.count(T.infer_request(DEV)) == 5 and got.count("other/topic") == 8
    assert server.summary()["shed"] == {"too_large": 1, "flood": 3}
    client.ask(["goal"], rid="later")  # taken from the queue: room again
    assert t.get(0).topic == T.infer_request(DEV)

    # the same on paho's receive path (its network thread calls _on_message)
    mq = MqttTransport(MqttOptions(url="mqtt://localhost:1", client_id="x"))
    mq.shed(T.infer_request(DEV), max_bytes=100, max_pending=2)
    req = T.infer_request(DEV)
    for payload, topic in [(b"x" * 101, req), (b"{}", req), (b"{}", req), (b"{}", req), (b"x" * 101, "tomtit/t/down/e")]:
        mq._on_message(None, None, SimpleNamespace(topic=topic, payload=payload, retain=False, qos=0, properties=None))
    assert mq._queue.qsize() == 3 and mq.shed_counts == {"too_large": 1, "flood": 1}


class FloodingTransport:
    """The device's in-memory transport with an endless flood of valid requests in front: every
    other get() is one more request, however many were taken (clients faster than the drain)."""

    def __init__(self, inner, request_topic, reply_to, limit=20_000):
        self.inner, self.request_topic, self.limit = inner, request_topic, limit
        self.body = encode_request(InferRequest(texts=("goal",), reply_to=reply_to, id="flood"))
        self.gets = 0

    def get(self, timeout=None):
        self.gets += 1
        if self.gets > self.limit:
            raise AssertionError("the drain never ends under a flood")
        if self.gets % 2 == 0 and (m := self.inner.get(0)) is not None:
            return m
        return Inbound(self.request_topic, self.body)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_request_flood_cannot_stall_training(tmp_path, tiny):
    bundle, _, _, init = tiny
    broker = MemoryBroker()
    publish_model(broker, bundle.manifest, init, version=5)
    agent = make_device(tmp_path, broker, tiny)
    client = Client(broker)  # the flood's replies land here
    agent.transport = agent.server.transport = FloodingTransport(agent.transport, T.infer_request(DEV),
                                                                 client.reply_to)
    agent._on_connection_change()
    cap = agent.server.cfg.max_queued + 1  # enough to fill an empty queue and tell one more "busy"
    for k in range(4):
        gets = agent.transport.gets
        agent.step()
        assert agent.stats.steps == k + 1  # training advances, one step per call
        assert agent.transport.gets - gets <= 2 * cap + 1  # the drain stopped at its cap
        assert agent.server.pending <= agent.server.cfg.max_queued
        if k == 1:
            publish_model(broker, bundle.manifest, init + np.float32(0.01), version=6)  # behind the flood
    agent.step()
    assert agent.base_version == 6  # a model behind the flood still got through
    assert agent.server.max_offers_per_drain == cap
    s = agent.server.summary()
    assert s["batches"] == 5 and s["errors"]["busy"] > 0 and s["errors_unsent"] > 0


def test_the_cli_refuses_a_reply_that_does_not_answer_every_text():
    from tomtit.cli import CliError
    from tomtit.cli.infer_cmd import check_answer_count

    one = InferReply(device=DEV, ok=True, adapter="global", labels=("a", "b"),
                     results=({"label": "a", "probabilities": [0.5, 0.5]},))
    check_answer_count(DEV, ["x"], one)
    with pytest.raises(CliError, match="1 result\\(s\\) for 2 text"):
        check_answer_count(DEV, ["x", "y"], one)
    gen = InferReply(device=DEV, ok=True, adapter="global", generated=("p", "q", "r"))
    with pytest.raises(CliError, match="3 result"):
        check_answer_count(DEV, ["x", "y"], gen)
    check_answer_count(DEV, ["x", "y", "z"], gen)
