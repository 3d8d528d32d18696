"""A corpus of malformed and hostile messages sent over a real Mosquitto to a running node.

Each must be rejected with its reason on `errors/`, counted, the node must stay up, and its model
must not change. The expected reason of every case is written here by hand from the wire rules
(tomtit/wire), not read back from the code under test.
"""
from __future__ import annotations

import json
import struct
import threading
import time

import numpy as np
import pytest

from edge_broker.aggregation import make_strategy
from edge_broker.node import Node, NodeConfig
from fedkit import synthetic_manifest, update_bytes
from tomtit.manifest import TensorSpec
from tomtit.mqtt import MqttOptions, MqttTransport
from tomtit.wire import Topics, decode_acks, decode_error, split_payload

JOB = "hostile"
T = Topics(JOB)
MAX_BYTES = 200_000  # the node's payload limit in this test
# an adapter of 514 values (~2 KB as f32): big enough to travel in several 1 KB chunks
SPECS = (TensorSpec("a.lora_A", (8, 32)), TensorSpec("a.lora_B", (32, 8)), TensorSpec("head.bias", (2,)))
SIZE = sum(s.numel for s in SPECS)
OK = np.full(SIZE, 0.01, np.float32)


def _manifest(bundle_id: str = "b0b0b0b0b0b0b0b0"):
    return synthetic_manifest(bundle_id, specs=SPECS)


def _st(header: dict | bytes, data: bytes) -> bytes:
    """A safetensors payload from a hand-written header (dict or raw bytes) and data area."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _split(payload: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + n]), payload[8 + n:]


def _meta(payload: bytes, **changes) -> bytes:
    header, data = _split(payload)
    header["__metadata__"].update(changes)
    return _st(header, data)


def _good(**kw) -> tuple[str, bytes]:
    kw.setdefault("base_version", 50)
    return update_bytes(OK, sender="c1", manifest=_manifest(), job=JOB, **kw)


def _corpus() -> list[tuple[str, str, str, bytes | list[bytes]]]:
    """(name, sender topic id, expected reason, payload or chunks)."""
    m = _manifest()
    cases: list[tuple[str, str, str, bytes | list[bytes]]] = []

    def add(name, reason, payload, sender="c1"):
        cases.append((name, sender, reason, payload))

    _, p = _good()
    header, data = _split(p)
    add("empty", "empty", b"")
    add("truncated", "not_safetensors", p[: len(p) - 10])
    add("oversized", "too_large", p + b"\0" * MAX_BYTES)
    add("header length beyond the payload", "not_safetensors", struct.pack("<Q", 10**12) + p[8:])
    add("header not JSON", "not_safetensors", _st(b"{this is not json}", data))
    nested = b'{"__metadata__":{},"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    add("deeply nested header", "not_safetensors", _st(nested, data))
    add("metadata of the wrong type", "bad_metadata", _meta(_good()[1], num_samples="ten"))
    add("sender is not the topic", "wrong_sender", _good()[1], sender="c2")
    add("other job", "wrong_job", update_bytes(OK, sender="c1", manifest=m, job="other", base_version=50)[1])
    add("other bundle", "wrong_bundle",
        update_bytes(OK, sender="c1", manifest=_manifest("ffffffffffffffff"), job=JOB, base_version=50)[1])
    add("wrong proto", "bad_proto", _meta(_good()[1], proto="99"))
    add("a model on an update topic", "wrong_kind", _meta(_good()[1], kind="model"))
    h = dict(header)
    h["zz.extra"] = h.pop(SPECS[-1].name)
    add("wrong tensor names", "wrong_tensors", _st(h, data))
    h = json.loads(json.dumps(header))
    h[SPECS[0].name]["shape"] = [32, 8]  # same byte size, transposed
    add("wrong shape", "wrong_shape", _st(h, data))
    h = json.loads(json.dumps(header))
    first = h[SPECS[-1].name]
    first["dtype"] = "I32"  # same byte size as F32
    add("wrong dtype", "wrong_dtype", _st(h, data))
    raw = json.dumps(header).encode()
    name = json.dumps(SPECS[-1].name).encode()
    entry = raw[raw.index(name):]
    entry = entry[: entry.index(b"}") + 1]
    add("duplicate tensor names", "not_safetensors", _st(raw[:-1] + b"," + entry + b"}", data))
    h = json.loads(json.dumps(header))
    offs = sorted(v["data_offsets"] for k, v in h.items() if k != "__metadata__")
    for k, v in h.items():  # shift the last tensor onto the one before it
        if k != "__metadata__" and v["data_offsets"] == offs[-1]:
            v["data_offsets"] = [offs[-1][0] - 4, offs[-1][1] - 4]
    add("overlapping data offsets", "not_safetensors", _st(h, data))
    marker = np.zeros(SIZE, np.float32)
    marker[0] = 12345.678
    _, pm = update_bytes(marker, sender="c1", manifest=m, job=JOB, base_version=50)
    needle = np.float32(12345.678).tobytes()
    add("NaN", "not_finite", pm.replace(needle, np.float32(np.nan).tobytes()))
    add("inf", "not_finite", pm.replace(needle, np.float32(np.inf).tobytes()))
    add("enormous norm", "norm", update_bytes(np.full(SIZE, 1e6, np.float32), sender="c1", manifest=m, job=JOB,
                                              base_version=50)[1])
    add("negative num_samples", "bad_metadata", _meta(_good()[1], num_samples="-5"))
    add("absurd num_samples", "bad_metadata", _meta(_good()[1], num_samples="9" * 19))
    add("absurd local_steps", "local_steps", _good(local_steps=10**9)[1])
    add("absurd train_loss", "bad_metadata", _meta(_good()[1], train_loss="1e308"))
    add("future base_version", "future_base", _good(base_version=10**15)[1])
    add("very stale base_version", "stale", _good(base_version=1)[1])
    add("full values, not a delta", "not_delta", _good(is_delta=False)[1])
    # chunk sets: one missing, one altered, one out of range
    big_uid, big = _good()
    chunks = split_payload(big, update_id=big_uid, limit=1024)
    assert len(chunks) >= 3
    add("chunk set with a chunk missing", "incomplete", chunks[:-1])
    uid2, p2 = _good()
    ch2 = split_payload(p2, update_id=uid2, limit=1024)
    h, d = _split(ch2[1])
    altered = _st(h, bytes([d[0] ^ 0xFF]) + d[1:])
    add("chunk set with an altered chunk", "bad_checksum", [ch2[0], altered, *ch2[2:]])
    uid3, p3 = _good()
    ch3 = split_payload(p3, update_id=uid3, limit=1024)
    h, d = _split(ch3[0])
    h["__metadata__"]["index"] = str(len(ch3) + 5)
    add("chunk out of range", "bad_chunk", [_st(h, d)])
    return cases


@pytest.fixture
def running_node(mosquitto, tmp_path):
    m = _manifest()
    # one update per aggregation: the legitimate update below is applied at once
    node = Node(NodeConfig(node_id="cloud", job=JOB, max_update_bytes=MAX_BYTES, chunk_timeout_s=2.0),
                manifest=m, initial_adapter=np.zeros(SIZE, np.float32),
                buffer=make_strategy("fedbuff", k_updates=1, max_wait_s=1e9),
                transport=MqttTransport(MqttOptions(url=mosquitto.url, client_id="cloud")).start(),
                state_dir=tmp_path / "cloud")
    node.version = 50  # far enough along that a base of 1 is stale
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop.is_set,), daemon=True)
    thread.start()
    yield node, thread, mosquitto
    stop.set()
    thread.join(10)


def _collect(sub: MqttTransport, until, timeout: float) -> list:
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        msg = sub.get(0.1)
        if msg is not None:
            got.append(msg)
    return got


def test_a_running_node_rejects_every_hostile_message_and_stays_up(running_node):
    node, thread, broker = running_node
    obs = MqttTransport(MqttOptions(url=broker.url, client_id="observer", persistent=False)).start()
    obs.subscribe(T.errors("cloud"), qos=1)
    obs.subscribe(T.ack("cloud", "c1"), qos=1)
    obs.subscribe(T.ack("cloud", "c2"), qos=1)
    assert obs.wait_connected(10) if hasattr(obs, "wait_connected") else True
    time.sleep(0.5)  # subscriptions in place
    c1 = MqttTransport(MqttOptions(url=broker.url, client_id="c1", persistent=False)).start()
    c2 = MqttTransport(MqttOptions(url=broker.url, client_id="c2", persistent=False)).start()
    senders = {"c1": c1, "c2": c2}
    time.sleep(0.5)

    # a legitimate update first: applied, so the model has moved once
    good_uid, good = _good()
    c1.publish(T.up("cloud", "c1"), good, qos=1)
    _collect(obs, lambda g: any(good_uid in [a.update_id for a in decode_acks(x.payload)]
                                for x in g if "/ack/" in x.topic), 10)
    assert node.stats.accepted == 1
    model_after_good = node.model.copy()
    np.testing.assert_allclose(model_after_good, OK, rtol=1e-6)

    cases = _corpus()
    for _, sender, _, payload in cases:
        for part in (payload if isinstance(payload, list) else [payload]):
            senders[sender].publish(T.up("cloud", sender), part, qos=1)
    c1.publish(T.up("cloud", "c1"), good, qos=1)  # a replay of the applied update

    expected = sorted(reason for _, _, reason, _ in cases)
    got = _collect(obs, lambda g: sum("/errors/" in x.topic for x in g) >= len(expected)
                   and any("duplicate" in [a.status for a in decode_acks(x.payload)] for x in g if "/ack/" in x.topic),
                   30)
    reasons = sorted(decode_error(x.payload).reason for x in got if "/errors/" in x.topic)
    assert reasons == expected, {"missing": sorted(set(expected) - set(reasons)),
                                 "unexpected": sorted(set(reasons) - set(expected))}
    acks = [a for x in got if "/ack/" in x.topic for a in decode_acks(x.payload)]
    assert [a.update_id for a in acks if a.status == "duplicate"] == [good_uid]  # never applied twice
    assert not [a for a in acks if a.status == "applied"]
    assert thread.is_alive() and not node.finished
    np.testing.assert_array_equal(node.model, model_after_good)
    assert node.version == 51 and node.stats.accepted == 1
    counted = {k: v for k, v in node.stats.rejected.items()}
    want: dict[str, int] = {}
    for r in expected:
        want[r] = want.get(r, 0) + 1
    assert counted == want
    for t in (obs, c1, c2):
        t.close()
