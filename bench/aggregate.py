"""Edge absorption benchmark: how many MiniLM-sized updates/s a node decodes, validates and
aggregates, against the raw publish -> receive rate of the same payloads through the same broker.

    python bench/aggregate.py [--updates 200] [--codec f16] [--broker mosquitto|amqtt]

Raw: one client publishes N update payloads (QoS 1) on the node's up topic, another receives
them; rate = N / (last receive - first publish). Node: a real `tomtit node run` process (fedbuff,
K=3, checkpoint + retained model publish per aggregation) receives the same N payloads from the
same publisher; rate = N / (last ack - first publish), the ack being sent only after the update
is applied in a checkpointed model. Printed: both rates and their ratio (target >= 0.8).
Set TOMTIT_PROFILE=FILE to run the node under cProfile (main thread only; paho receives on its own).
The payloads are MiniLM-L6 + LoRA r=8 on query,value + a 5-class head: 75,653 floats.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tomtit.manifest import AdapterConfig, Manifest, TensorSpec  # noqa: E402
from tomtit.wire import ModelMessage, Topics, decode_ack, encode_message, new_update_id  # noqa: E402

JOB = "bench"


def minilm_like_manifest() -> Manifest:
    """The exact trainable layout of the MiniLM-L6 bundle, without needing the bundle."""
    specs = []
    for layer in range(6):
        for proj in ("query", "value"):
            p = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{proj}"
            specs += [TensorSpec(f"{p}.lora_A.default.weight", (8, 384)), TensorSpec(f"{p}.lora_B.default.weight", (384, 8))]
    specs += [TensorSpec("base_model.model.classifier.modules_to_save.default.bias", (5,)),
              TensorSpec("base_model.model.classifier.modules_to_save.default.weight", (5, 384))]
    return Manifest(format_version=1, bundle_id="benchbenchbench0", base_model="bench", base_weights_sha256="0" * 64,
                    architecture="BertForSequenceClassification", adapter=AdapterConfig("lora", 8, 16.0, 0.0, ("query", "value")),
                    trainable=tuple(specs), head_modules=("classifier",), labels=tuple("abcde"), max_length=64,
                    inputs=("input_ids", "attention_mask"), label_input="labels", logits_output="logits")


def fake_bundle(folder: Path, manifest: Manifest) -> Path:
    """A bundle folder with just what `tomtit node run` (without --eval-data) reads."""
    from dataclasses import asdict

    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    init = folder / "adapter_init.safetensors"
    save_file({t.name: np.zeros(t.shape, np.float32) for t in manifest.trainable}, str(init),
              metadata={"bundle_id": manifest.bundle_id})
    for name in ("inference.onnx", "tokenizer.json"):
        (folder / name).write_bytes(b"unused by this benchmark")
    import hashlib

    files = {role: {"name": n, "sha256": hashlib.sha256((folder / n).read_bytes()).hexdigest(),
                    "bytes": (folder / n).stat().st_size}
             for role, n in (("initial_adapter", init.name), ("inference_model", "inference.onnx"),
                             ("tokenizer", "tokenizer.json"))}
    d = asdict(manifest)
    d["files"] = files
    (folder / "manifest.json").write_text(json.dumps(d))
    return folder


def payloads(manifest: Manifest, n: int, codec: str, senders: list[str]) -> list[tuple[str, str, bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sender = senders[i % len(senders)]
        tensors = {t.name: (rng.normal(0, 1e-3, t.shape)).astype(np.float32) for t in manifest.trainable}
        uid = new_update_id()
        msg = ModelMessage(kind="update", sender=sender, job=JOB, bundle_id=manifest.bundle_id, base_version=0,
                           version=i, num_samples=100, local_steps=10, train_loss=1.0, energy_j=1.0, is_delta=True,
                           created_at=time.time(), codec=codec, update_id=uid, tensors=tensors)
        out.append((sender, uid, encode_message(msg)))
    return out


def client(url: str, cid: str):
    from tomtit.mqtt import MqttOptions, MqttTransport

    t = MqttTransport(MqttOptions(url=url, client_id=cid, persistent=False)).start()
    if not t.wait_connected(10):
        raise SystemExit(f"cannot connect to {url}")
    return t


def raw_rate(url: str, items) -> float:
    topics = Topics(JOB)
    sub = client(url, "bench-raw-sub")
    sub.subscribe(topics.up_filter("edge"))
    time.sleep(0.5)
    pub = client(url, "bench-raw-pub")
    t0 = time.perf_counter()
    for sender, _, data in items:
        pub.publish(topics.up("edge", sender), data, qos=1)
    got = 0
    while got < len(items):
        if sub.get(30) is None:
            raise SystemExit(f"raw: only {got}/{len(items)} received")
        got += 1
    dt = time.perf_counter() - t0
    pub.close()
    sub.close()
    return len(items) / dt


def node_rate(url: str, items, bundle: Path, state: Path) -> tuple[float, dict]:
    topics = Topics(JOB)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    prof = ["-m", "cProfile", "-o", os.environ["TOMTIT_PROFILE"]] if os.environ.get("TOMTIT_PROFILE") else []
    proc = subprocess.Popen([sys.executable, *prof, "-m", "tomtit", "node", "run", "--id", "edge", "--bundle", str(bundle),
                             "--broker", url, "--job", JOB, "--strategy", "fedbuff", "--k", "3", "--max-norm", "1e9",
                             "--state-dir", str(state), "--summary", str(state / "summary.json"), "--log-level", "WARNING"],
                            env=env)
    try:
        acker = client(url, "bench-acks")
        senders = sorted({s for s, _, _ in items})
        for s in senders:
            acker.subscribe(topics.ack("edge", s))
        # The node's retained model appears once it is up and subscribed.
        acker.subscribe(topics.down("edge"))
        deadline = time.monotonic() + 60
        while True:
            msg = acker.get(0.5)
            if msg is not None and msg.topic == topics.down("edge"):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("node did not start")
        pub = client(url, "bench-node-pub")
        pending = {uid for _, uid, _ in items}
        t0 = time.perf_counter()
        for sender, _, data in items:
            pub.publish(topics.up("edge", sender), data, qos=1)
        statuses = {}
        while pending:
            msg = acker.get(60)
            if msg is None:
                raise SystemExit(f"node: {len(pending)} updates never acknowledged")
            if "/ack/" not in msg.topic:
                continue  # the retained model, republished after every aggregation
            ack = decode_ack(msg.payload)
            if ack.update_id in pending:
                pending.discard(ack.update_id)
                statuses[ack.status] = statuses.get(ack.status, 0) + 1
        dt = time.perf_counter() - t0
        pub.close()
        acker.close()
        return len(items) / dt, statuses
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--codec", default="f16", choices=["f32", "f16", "int8"])
    ap.add_argument("--children", type=int, default=8)
    ap.add_argument("--broker", default="mosquitto", choices=["mosquitto", "amqtt"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from edge_broker.brokers import MosquittoConfig, MosquittoProcess, free_port, wait_for_port

    manifest = minilm_like_manifest()
    items = payloads(manifest, args.updates, args.codec, [f"dev{i}" for i in range(args.children)])
    size = len(items[0][2])
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="tomtit-bench-agg-"))
    if args.broker == "mosquitto":
        broker = MosquittoProcess(MosquittoConfig(port=port), workdir=work / "mosq")
        (work / "mosq").mkdir()
        broker.start()
        stop = broker.stop
    else:
        proc = subprocess.Popen([sys.executable, "-m", "tomtit", "broker", "run", "--port", str(port)],
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.DEVNULL)
        if not wait_for_port("127.0.0.1", port, 20):
            raise SystemExit("amqtt did not start")
        stop = proc.terminate
    url = f"mqtt://127.0.0.1:{port}"
    try:
        bundle = fake_bundle(work / "bundle", manifest)
        raw = raw_rate(url, items)
        absorbed, statuses = node_rate(url, items, bundle, work / "state")
    finally:
        stop()
    result = {"broker": args.broker, "updates": args.updates, "codec": args.codec, "payload_bytes": size,
              "raw_updates_per_s": raw, "node_updates_per_s": absorbed, "ratio": absorbed / raw, "acks": statuses}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.updates} MiniLM-sized updates ({size / 1024:.0f} KiB each, {args.codec}) via {args.broker}")
    print(f"  raw publish->receive     {raw:8.1f} updates/s  ({raw * size / 1e6:.1f} MB/s)")
    print(f"  node decode+validate+aggregate+checkpoint+ack {absorbed:8.1f} updates/s")
    print(f"  ratio node/raw = {absorbed / raw:.2f}  (target >= 0.8); acks: {statuses}")


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    main()
