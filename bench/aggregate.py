"""Edge absorption benchmark: how many MiniLM-sized updates/s a node decodes, validates and
aggregates, against the raw receive rate of the same payloads through the same broker.

    python bench/aggregate.py [--updates 300] [--repeat 3] [--codec f16] [--broker mosquitto|amqtt]

Both sides drain the same backlog. The receiver process is frozen (SIGSTOP) once subscribed, N
update payloads are published (QoS 1) on its up topics until the broker has accepted them all,
and the clock starts when the receiver is resumed (SIGCONT): the publisher has finished, so the
two cores serve only the broker and the receiver, as on an edge whose children are other boards.
- Raw: a process with the node's own transport (MqttTransport, paho) that takes N payloads off
  the queue and drops them; rate = N / (its last receive - resume).
- Node: a real `tomtit node run` (fedbuff, K=3, max-norm bound; checkpoint, retained model and
  batched acks per commit); rate = N / (last ack seen here - resume). An ack is only sent once
  the update is applied in a checkpointed model, so this is decode + validate + aggregate +
  checkpoint + ack, end to end.
Printed: both rates, their ratio (target >= 0.8), and each side's CPU per update. Alternating
rounds, medians. Set TOMTIT_PYSPY=FILE to sample all of the node's threads with py-spy (pip
install py-spy) while it absorbs, or TOMTIT_PROFILE=FILE to run it under cProfile (main thread).
The payloads are MiniLM-L6 + LoRA r=8 on query,value + a 5-class head: 75,653 floats.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
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
from tomtit.wire import ModelMessage, Topics, decode_acks, encode_message, new_update_id  # noqa: E402

JOB = "bench"
K_UPDATES = 3  # the node's buffer size (fedbuff K)


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
        # base_version: the node's version when this update would have been trained (K=3 updates
        # per version, one behind): realistic staleness 1, never beyond the node's bound.
        msg = ModelMessage(kind="update", sender=sender, job=JOB, bundle_id=manifest.bundle_id,
                           base_version=max(0, i // K_UPDATES - 1),
                           version=i, num_samples=100, local_steps=10, train_loss=1.0, energy_j=1.0, is_delta=True,
                           created_at=time.time(), codec=codec, update_id=uid, tensors=tensors)
        out.append((sender, uid, encode_message(msg)))
    return out


def client(url: str, cid: str, inflight: int | None = None):
    from tomtit.mqtt import MqttOptions, MqttTransport

    # Publishers get everything in flight: with paho's 20 the rest wait in a queue that paho
    # rescans on every PUBACK (O(N) each), and the benchmark would time the publisher.
    t = MqttTransport(MqttOptions(url=url, client_id=cid, persistent=False, max_inflight=inflight or 20)).start()
    if not t.wait_connected(10):
        raise SystemExit(f"cannot connect to {url}")
    return t


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def receive_only(url: str, node_id: str, n: int) -> None:
    """The raw side, run as its own process exactly like a node: the node's own transport
    (MqttTransport, paho) takes N payloads off the node's up topics and does nothing with them.
    Prints "ready", then the monotonic time of the last one."""
    from tomtit.alloc import retain_freed_memory

    retain_freed_memory()  # as `tomtit node run` does: the same process setup on both sides
    sub = client(url, f"bench-raw-{node_id}")
    sub.subscribe(Topics(JOB).up_filter(node_id))
    time.sleep(0.5)  # SUBACK
    print("ready", flush=True)
    for got in range(n):
        if sub.get(60) is None:
            raise SystemExit(f"raw receiver: only {got}/{n} payloads arrived")
    print(time.monotonic(), flush=True)
    sub.close()


class Phase:
    """Wall time and the CPU seconds of the receiver and the broker, from resume to the end."""

    def __init__(self, receiver: int, broker: int | None):
        self.pids = {"receiver": receiver, **({"broker": broker} if broker else {})}
        self.start = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.t0 = time.monotonic()

    def end(self, t_end: float, n: int) -> dict:
        cpu = {k: cpu_seconds(p) - self.start[k] for k, p in self.pids.items()}
        return {"updates_per_s": n / (t_end - self.t0), **{f"{k}_cpu_ms_per_update": 1e3 * v / n for k, v in cpu.items()}}


def backlog(url: str, items, node_id: str, receiver_pid: int, broker_pid: int | None) -> Phase:
    """Freeze the receiver, queue every payload at the broker, then resume it: the clock starts."""
    topics = Topics(JOB)
    os.kill(receiver_pid, signal.SIGSTOP)
    try:
        pub = client(url, f"bench-pub-{node_id}", inflight=len(items))
        for sender, _, data in items:
            pub.publish(topics.up(node_id, sender), data, qos=1)
        if not pub.flush(timeout=120):  # every PUBACK back: the broker holds them all
            raise SystemExit("the broker did not accept the backlog")
        pub.close()
    except BaseException:
        os.kill(receiver_pid, signal.SIGCONT)
        raise
    phase = Phase(receiver_pid, broker_pid)
    os.kill(receiver_pid, signal.SIGCONT)
    return phase


def raw_rate(url: str, items, node_id: str, broker_pid: int | None) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--receive-only", url, node_id, str(len(items))],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("raw receiver did not start")
        phase = backlog(url, items, node_id, proc.pid, broker_pid)
        line = proc.stdout.readline().strip()
        if not line:
            raise SystemExit("raw receiver failed")
        return phase.end(float(line), len(items))
    finally:
        proc.wait(30)


def node_rate(url: str, items, bundle: Path, state: Path, node_id: str, broker_pid: int | None) -> tuple[dict, dict]:
    topics = Topics(JOB)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    prof = ["-m", "cProfile", "-o", os.environ["TOMTIT_PROFILE"]] if os.environ.get("TOMTIT_PROFILE") else []
    proc = subprocess.Popen([sys.executable, *prof, "-m", "tomtit", "node", "run", "--id", node_id, "--bundle", str(bundle),
                             "--broker", url, "--job", JOB, "--strategy", "fedbuff", "--k", str(K_UPDATES), "--max-norm", "1e9",
                             "--state-dir", str(state), "--summary", str(state / "summary.json"), "--log-level", "WARNING"],
                            env=env)
    try:
        acker = client(url, f"bench-acks-{node_id}")
        senders = sorted({s for s, _, _ in items})
        for s in senders:
            acker.subscribe(topics.ack(node_id, s))
        # The node's retained model appears once it is up and subscribed.
        acker.subscribe(topics.down(node_id))
        deadline = time.monotonic() + 60
        while True:
            msg = acker.get(0.5)
            if msg is not None and msg.topic == topics.down(node_id):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("node did not start")
        spy = None
        if os.environ.get("TOMTIT_PYSPY"):  # sample every thread of the node while it absorbs
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--threads", "--nonblocking",
                                    "--rate", "500", "--format", "raw", "--output", os.environ["TOMTIT_PYSPY"]])
            time.sleep(1.0)
        pending = {uid for _, uid, _ in items}
        phase = backlog(url, items, node_id, proc.pid, broker_pid)
        statuses = {}
        while pending:
            msg = acker.get(60)
            if msg is None:
                raise SystemExit(f"node: {len(pending)} updates never acknowledged")
            if "/ack/" not in msg.topic:
                continue  # the retained model, republished after every commit
            for ack in decode_acks(msg.payload):
                if ack.update_id in pending:
                    pending.discard(ack.update_id)
                    statuses[ack.status] = statuses.get(ack.status, 0) + 1
        result = phase.end(time.monotonic(), len(items))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        acker.close()
        return result, statuses
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=300, help="rounded up to a multiple of K (see below)")
    ap.add_argument("--codec", default="f16", choices=["f32", "f16", "int8"])
    ap.add_argument("--children", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="alternate raw and node runs this many times; medians")
    ap.add_argument("--broker", default="mosquitto", choices=["mosquitto", "amqtt"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from edge_broker.brokers import MosquittoConfig, MosquittoProcess, free_port, wait_for_port

    # A multiple of K: a last partial buffer would wait for the node's max-wait timer (by design:
    # fedbuff applies exactly K updates) and the benchmark would time the timer, not the node.
    n = -(-args.updates // K_UPDATES) * K_UPDATES
    manifest = minilm_like_manifest()
    items = payloads(manifest, n, args.codec, [f"dev{i}" for i in range(args.children)])
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
    raws, nodes, statuses = [], [], {}
    broker_pid = broker.proc.pid if args.broker == "mosquitto" else proc.pid
    try:
        bundle = fake_bundle(work / "bundle", manifest)
        # Alternating rounds, each receiver fresh (own id, own state dir): background noise on a
        # small machine hits both sides alike, and the medians ignore one unlucky round.
        for r in range(args.repeat):
            raws.append(raw_rate(url, items, f"raw{r}", broker_pid))
            rate, statuses = node_rate(url, items, bundle, work / f"state{r}", f"edge{r}", broker_pid)
            nodes.append(rate)
    finally:
        stop()

    def median(rounds, key):
        return statistics.median(r[key] for r in rounds)

    raw, absorbed = median(raws, "updates_per_s"), median(nodes, "updates_per_s")
    result = {"broker": args.broker, "updates": n, "codec": args.codec, "payload_bytes": size,
              "raw_updates_per_s": raw, "node_updates_per_s": absorbed, "ratio": absorbed / raw,
              "raw_rounds": raws, "node_rounds": nodes, "acks_last_round": statuses}
    if args.json:
        print(json.dumps(result))
        return
    cpu = "receiver_cpu_ms_per_update"
    print(f"{n} MiniLM-sized updates ({size / 1024:.0f} KiB each, {args.codec}) via {args.broker}, "
          f"median of {args.repeat} alternating rounds")
    print(f"  raw receive (bare receiver, same transport)   {raw:8.1f} updates/s  ({raw * size / 1e6:.1f} MB/s), "
          f"receiver CPU {median(raws, cpu):.2f} ms/update")
    print(f"  node decode+validate+aggregate+checkpoint+ack {absorbed:8.1f} updates/s, "
          f"node CPU {median(nodes, cpu):.2f} ms/update")
    print(f"  broker CPU {median(raws, 'broker_cpu_ms_per_update'):.2f} / "
          f"{median(nodes, 'broker_cpu_ms_per_update'):.2f} ms/update (raw / node)")
    print("  rounds (raw/node updates/s): " + ", ".join(f"{a['updates_per_s']:.0f}/{b['updates_per_s']:.0f}"
                                                    for a, b in zip(raws, nodes)))
    print(f"  ratio node/raw = {absorbed / raw:.2f}  (target >= 0.8); acks (last round): {statuses}")


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    if sys.argv[1:2] == ["--receive-only"]:
        receive_only(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
