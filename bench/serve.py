"""Served inference benchmark: a training device answering requests over MQTT, against `tomtit infer`
in process, and what answering costs the training.

    python bench/serve.py [--bundle runs/minilm] [--phase-s 20] [--out runs/bench-serve.json]

Real processes on this machine: a Mosquitto, a cloud node (`tomtit node run`, K=1) and one
device (`tomtit device run`, MiniLM-L6 + LoRA, portable backend, 1 thread, batch 8 x 64 tokens,
fixed:20 sync), training on 400 BBC News texts. This process is the client: one MQTT session,
requests of one BBC text each, "global" adapter.
  1. in process: `Classifier.predict` latency on 1 text and on 16 texts (what `tomtit infer` does
     per call, session already loaded), before anything else runs;
  2. the device trains with no requests (baseline steps/s);
  3. a sequential client: one request in flight (latency when the device is not busy serving);
  4. a saturating client: 32 requests in flight, the device's queue limit (throughput: at most one
     batch of 16 texts per training step).
Steps/s of each phase come from the device's own timeline (its summary: wall time and step every 10
steps); requests/s, p50 and p99 from this client (send to reply). Written as JSON (--out) and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tomtit.wire import MAX_TEXT_CHARS, InferRequest, Topics, decode_reply, encode_request  # noqa: E402

JOB = "bench-serve"
DEVICE = "dev0"
TRAIN_TEXTS = 400


def ensure_bundle(path: Path | None) -> Path:
    """The MiniLM-L6 bundle (the same temp export bench/train_step.py makes)."""
    if path is not None:
        return path
    out = Path(tempfile.gettempdir()) / "tomtit-bench-minilm"
    if not (out / "manifest.json").is_file():
        from export.bundle_builder import ExportConfig, export_bundle

        export_bundle(ExportConfig(model="minilm-l6", data="bbc-news", out=out, force=True))
    return out


def percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs, float) * 1000
    return {"n": len(xs), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "mean_ms": round(float(a.mean()), 1)}


def in_process(bundle_dir: Path, texts: list[str], rounds: int) -> dict:
    """`tomtit infer`'s work per call with the session loaded: Classifier.predict, one thread."""
    from device_runtime.adapter import load_adapter
    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier

    bundle = open_bundle(bundle_dir, roles=("inference_model", "tokenizer", "initial_adapter"))
    adapter = load_adapter(bundle.path("initial_adapter"), bundle.manifest)
    clf = Classifier(bundle, threads=1)
    clf.predict(texts[:16], adapter)  # warm-up
    out = {}
    for n in (1, 16):
        lat = []
        for i in range(rounds):
            t0 = time.perf_counter()
            clf.predict([texts[(i * n + k) % len(texts)] for k in range(n)], adapter)
            lat.append(time.perf_counter() - t0)
        out[f"batch_{n}"] = {**percentiles(lat), "texts_per_s": round(n / float(np.mean(lat)), 1)}
    return out


def rss_mb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            fields[k] = round(int(v.split()[0]) / 1024, 1)
    return fields


class Client:
    """Closed-loop requester: keeps `in_flight` requests outstanding, one text each."""

    def __init__(self, url: str, texts: list[str]):
        from tomtit.mqtt import MqttOptions, MqttTransport

        self.topics = Topics(JOB)
        self.token = uuid.uuid4().hex[:12]
        self.reply_to = self.topics.infer_reply(DEVICE, self.token)
        self.t = MqttTransport(MqttOptions(url=url, client_id=f"bench-client-{self.token}", persistent=False,
                                           max_inflight=100)).start()
        assert self.t.wait_connected(10), self.t.last_error
        self.t.subscribe(self.reply_to, qos=0)
        self.texts = [t[:MAX_TEXT_CHARS] for t in texts]  # as `tomtit infer --remote` cuts them
        self.n = 0

    def _send(self, sent: dict) -> None:
        rid = f"r{self.n}"
        text = self.texts[self.n % len(self.texts)]
        self.n += 1
        sent[rid] = time.perf_counter()
        self.t.publish(self.topics.infer_request(DEVICE),
                       encode_request(InferRequest(texts=(text,), reply_to=self.reply_to, id=rid)), qos=1)

    def run(self, in_flight: int, seconds: float) -> dict:
        sent: dict[str, float] = {}
        lat, errors = [], {}
        for _ in range(in_flight):
            self._send(sent)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            msg = self.t.get(0.2)
            if msg is None or msg.topic != self.reply_to:
                continue
            reply = decode_reply(msg.payload)
            t0 = sent.pop(reply.id, None)
            if t0 is None:
                continue
            if reply.ok:
                lat.append(time.perf_counter() - t0)
            else:
                errors[reply.error] = errors.get(reply.error, 0) + 1
            self._send(sent)
        drain_end = time.perf_counter() + 30  # let the outstanding ones finish (not counted in the rate)
        while sent and time.perf_counter() < drain_end:
            msg = self.t.get(0.2)
            if msg is not None and msg.topic == self.reply_to:
                sent.pop(decode_reply(msg.payload).id, None)
        return {"in_flight": in_flight, "answered": len(lat), "requests_per_s": round(len(lat) / seconds, 2),
                **percentiles(lat or [0.0]), "errors": errors, "unanswered": len(sent)}

    def close(self) -> None:
        self.t.close()


def steps_per_s(timeline: list, t0: float, t1: float) -> float:
    pts = [(t, s) for t, s, *_ in timeline if t0 <= t <= t1]
    if len(pts) < 2:
        return float("nan")
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="MiniLM bundle (default: export one to a temp folder)")
    ap.add_argument("--phase-s", type=float, default=20.0, help="seconds of each measured phase")
    ap.add_argument("--rounds", type=int, default=40, help="in-process predict calls per batch size")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-serve.json")
    args = ap.parse_args()

    from edge_broker.brokers import MosquittoConfig, MosquittoProcess, free_port
    from tomtit.data import load_dataset

    bundle = ensure_bundle(args.bundle)
    ds = load_dataset("bbc-news")
    texts = list(ds.texts)
    result: dict = {"bundle": str(bundle), "cores": os.cpu_count(), "phase_s": args.phase_s}
    print("in process (Classifier.predict, 1 thread)...", flush=True)
    result["in_process"] = in_process(bundle, texts, args.rounds)

    work = Path(tempfile.mkdtemp(prefix="tomtit-bench-serve-"))
    data = work / "train.jsonl"
    with data.open("w") as fh:
        for text, label in list(zip(ds.texts, ds.labels))[:TRAIN_TEXTS]:
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    broker = MosquittoProcess(MosquittoConfig(port=free_port()), workdir=work / "mosquitto")
    (work / "mosquitto").mkdir()
    broker.start()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    common = ["--bundle", str(bundle), "--broker", broker.url, "--job", JOB]
    logs = {n: (work / f"{n}.log").open("ab") for n in ("cloud", "device")}
    procs = {
        "cloud": subprocess.Popen([sys.executable, "-m", "tomtit", "node", "run", "--id", "cloud", *common, "--k", "1",
                                   "--state-dir", str(work / "s-cloud")], stdout=logs["cloud"],
                                  stderr=subprocess.STDOUT, env=env),
        "device": subprocess.Popen([sys.executable, "-m", "tomtit", "device", "run", "--id", DEVICE,
                                    "--parent", "cloud", *common, "--data", str(data), "--scheduler", "fixed:20",
                                    "--energy", "model:rpi4", "--backend", "portable", "--threads", "1",
                                    "--state-dir", str(work / "s-dev"), "--summary", str(work / "device.json")],
                                   stdout=logs["device"], stderr=subprocess.STDOUT, env=env),
    }
    client = None
    try:
        deadline = time.monotonic() + 180
        while "adopted parent model" not in (work / "device.log").read_text():
            if time.monotonic() > deadline or procs["device"].poll() is not None:
                raise SystemExit("the device did not start:\n" + (work / "device.log").read_text()[-2000:])
            time.sleep(0.5)
        time.sleep(5)  # past the first steps (session warm-up)
        client = Client(broker.url, texts)
        windows = {}
        print(f"training, no requests ({args.phase_s:g} s)...", flush=True)
        t0 = time.time()
        time.sleep(args.phase_s)
        windows["idle"] = (t0, time.time())
        result["device_rss_before_serving_mb"] = rss_mb(procs["device"].pid)
        for name, in_flight in (("sequential", 1), ("saturating", 32)):
            print(f"training, {in_flight} request(s) in flight ({args.phase_s:g} s)...", flush=True)
            t0 = time.time()
            result[name] = client.run(in_flight, args.phase_s)
            windows[name] = (t0, time.time())
        result["device_rss_after_serving_mb"] = rss_mb(procs["device"].pid)
    finally:
        if client is not None:
            client.close()
        for name in ("device", "cloud"):
            procs[name].send_signal(signal.SIGTERM)
            try:
                procs[name].wait(60)
            except subprocess.TimeoutExpired:
                procs[name].kill()
        broker.stop()
    summary = json.loads((work / "device.json").read_text())
    timeline = summary["timeline"]
    base = steps_per_s(timeline, *windows["idle"])
    result["steps_per_s"] = {k: round(steps_per_s(timeline, *w), 3) for k, w in windows.items()}
    result["training_slowdown"] = {k: round(1 - result["steps_per_s"][k] / base, 3)
                                   for k in ("sequential", "saturating")}
    result["device_serving"] = summary.get("serving")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    ip = result["in_process"]
    sps = result["steps_per_s"]
    print(f"\nserved inference, MiniLM-L6, one device training on this machine ({os.cpu_count()} cores); "
          f"{args.phase_s:g} s per phase")
    print(f"{'':<38} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'steps/s':>8} {'slowdown':>9}")
    print(f"{'in process, 1 text (tomtit infer)':<38} {'':>7} {ip['batch_1']['p50_ms']:>8} "
          f"{ip['batch_1']['p99_ms']:>8}")
    print(f"{'in process, 16 texts':<38} {'':>7} {ip['batch_16']['p50_ms']:>8} {ip['batch_16']['p99_ms']:>8}")
    print(f"{'device training, no requests':<38} {'':>7} {'':>8} {'':>8} {sps['idle']:>8}")
    for name, label in (("sequential", "served, 1 in flight"), ("saturating", "served, 32 in flight")):
        r = result[name]
        print(f"{label:<38} {r['requests_per_s']:>7} {r['p50_ms']:>8} {r['p99_ms']:>8} {sps[name]:>8} "
              f"{result['training_slowdown'][name]:>9.0%}" + (f"  errors {r['errors']}" if r["errors"] else ""))
    print(f"device RSS before serving {result['device_rss_before_serving_mb']}, after "
          f"{result['device_rss_after_serving_mb']} (MB)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
