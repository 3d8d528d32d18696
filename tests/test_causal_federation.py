"""Federation of a causal LM (issue 13): devices train a causal-LM bundle under `tomtit device run`,
the cloud scores each global model by held-out mean token cross-entropy and stops at
--target-loss, and a training device answers generation requests.

A tiny random Llama (test_causal_lm's) keeps it fast. Expected values are computed here
independently: the held-out loss from the inference graph's logits, one unpadded example at a
time, with the scored tokens picked from the tokenizer's output (not from the code under test).
"""
from __future__ import annotations

import json
import math
import signal
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from conftest import run_tomtit, spawn_tomtit, wait_for
from test_causal_lm import make_tiny_llama, write_headline_data

JOB = "lmfed"
TEXT_ROWS = ["Shares fall as profits slide in the city", "Team wins the cup final after a long week"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from export.bundle_builder import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("lmfed")
    llama = make_tiny_llama(root / "tiny-llama")
    data = write_headline_data(root / "headlines.jsonl")
    out = root / "bundle"
    export_bundle(ExportConfig(model=str(llama), data=str(data), out=out, max_length=48, task="causal-lm",
                               backend="portable", targets=("q_proj", "v_proj")), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def split(bundle, tmp_path_factory) -> Path:
    """Two device files and a held-out file (prompt/response rows, plus two plain-text rows)."""
    root = tmp_path_factory.mktemp("lmsplit")
    data = write_headline_data(root / "all.jsonl", n=64, seed=3)
    r = run_tomtit(["data", "split", "--data", str(data), "--devices", "2", "--alpha", "100",
                    "--test-fraction", "0.2", "--out", str(root / "split")])
    assert r.returncode == 0, r.stderr
    with (root / "split" / "test.jsonl").open("a") as fh:
        for t in TEXT_ROWS:
            fh.write(json.dumps({"text": t}) + "\n")
    return root / "split"


def reference_loss(bundle: Path, eval_file: Path, adapter: np.ndarray) -> tuple[float, int]:
    """Mean token cross-entropy computed independently: inference.onnx logits of each example on its
    own (no padding); scored targets = the response's tokens + eos (prompt/response rows) or every
    token after the first (text rows). The responses and texts here are short, never cut."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from device_runtime.adapter import unflatten
    from tomtit.manifest import load_manifest

    m = load_manifest(bundle)
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    eos, tpl = int(m.extra["eos_id"]), m.extra["prompt_template"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / "inference.onnx"), so, providers=["CPUExecutionProvider"])
    tensors = unflatten(adapter, m.trainable)
    nll, count = 0.0, 0
    for line in eval_file.read_text().splitlines():
        row = json.loads(line)
        if "response" in row:
            target = enc(row["response"]) + [eos]
            pre, post = enc(tpl["prefix"]), enc(tpl["suffix"])
            # the bundle's rule: a long prompt's body is cut to fit, never the template or the response
            ids = pre + enc(row["prompt"])[:m.max_length - len(pre) - len(post) - len(target)] + post + target
        else:
            ids = enc(row["text"]) + [eos]
            target = ids[1:]
        assert len(ids) <= m.max_length
        x = np.array([ids], np.int64)
        logits = sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x), **tensors})[0][0]
        start = len(ids) - len(target)  # position t predicts ids[t + 1]
        for t in range(start - 1, len(ids) - 1):
            z = logits[t].astype(np.float64)
            nll += float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[t + 1]])
            count += 1
    return nll / count, count


def initial_adapter(bundle: Path) -> np.ndarray:
    from device_runtime.adapter import load_adapter
    from tomtit.manifest import load_manifest

    return load_adapter(bundle / "adapter_init.safetensors", load_manifest(bundle))


def token_loss(bundle: Path, eval_file: Path, batch_size: int):
    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier, TokenLoss
    from device_runtime.local_data import encode_lm_dataset
    from tomtit.lm_data import load_lm_dataset

    b = open_bundle(bundle)
    data = encode_lm_dataset(load_lm_dataset(eval_file), b.path("tokenizer"), b.manifest)
    return TokenLoss(Classifier(b, memory="lean", token_logits=True), data.input_ids, data.attention_mask, data.labels,
                     batch_size=batch_size)


def test_token_loss_is_the_masked_mean_ce_whatever_the_batching(bundle, split):
    rng = np.random.default_rng(0)
    adapter = (initial_adapter(bundle) + 0.05 * rng.standard_normal(initial_adapter(bundle).shape)).astype(np.float32)
    want, tokens = reference_loss(bundle, split / "test.jsonl", adapter)
    for batch in (3, 64):
        loss = token_loss(bundle, split / "test.jsonl", batch)
        assert loss.tokens == tokens
        got = loss(adapter)
        assert abs(got - want) < 1e-4, (batch, got, want)


def test_unigram_f1_and_the_observer_stop_rule():
    from edge_broker.observers import GenerationScore, HeldOutLossAndStop, unigram_f1

    assert unigram_f1("China to stop economy", "China keeps tight rein on economy") == pytest.approx(0.4)  # 2/4, 2/6
    assert unigram_f1("the the cat", "the cat the") == 1.0 and unigram_f1("", "x") == 0.0
    assert unigram_f1("Bank RAISES rates!", "bank raises rates") == 1.0

    class Gen:
        def generate(self, prompt, adapter, max_new_tokens):
            return {"p1": "bank raises rates", "p2": "nothing"}[prompt]

    score = GenerationScore(Gen(), ["p1", "p2"], ["Bank raises interest rates", "Team wins"], max_new_tokens=8)
    losses = iter([3.0, 2.5, 1.9])
    obs = HeldOutLossAndStop(lambda a: next(losses), target_loss=2.0, score_fn=score)
    model = np.zeros(3, np.float32)
    assert obs.on_model(0, model, 0.0) is None and obs.on_model(0, model, 1.0) is None  # a version once
    assert obs.on_model(1, model, 2.0) is None
    assert obs.on_model(2, model, 3.0) == "target loss 2.0 reached"
    assert [h["loss"] for h in obs.history] == [3.0, 2.5, 1.9]
    f1 = (2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4) + 0.0) / 2
    assert obs.history[-1]["unigram_f1"] == pytest.approx(f1)
    assert obs.telemetry() == {"heldout_loss": 1.9, "perplexity": pytest.approx(math.exp(1.9)),
                               "unigram_f1": pytest.approx(f1)}
    s = obs.summary()
    assert s["task"] == "causal-lm" and s["target_loss"] == 2.0 and s["heldout_loss"][0]["version"] == 0


def test_a_non_finite_held_out_loss_stays_out_of_telemetry(caplog):
    import logging

    from edge_broker.observers import HeldOutLossAndStop
    from tomtit.wire.control import encode_telemetry

    losses = iter([3.0, float("nan"), float("-inf"), 2.5])
    obs = HeldOutLossAndStop(lambda a: next(losses), target_loss=2.0)
    model = np.zeros(3, np.float32)
    with caplog.at_level(logging.WARNING):
        assert obs.on_model(0, model, 0.0) is None
        assert obs.on_model(1, model, 1.0) is None
        assert obs.telemetry() == {"heldout_loss": 3.0, "perplexity": pytest.approx(math.exp(3.0))}
        encode_telemetry(obs.telemetry())  # the wire refuses NaN: the cloud must not crash here
        assert obs.on_model(2, model, 2.0) is None  # -inf <= 2.0, but it is no loss: never the target
        assert obs.on_model(3, model, 3.0) is None
    assert [h["loss"] for h in obs.history] == [3.0, 2.5] and obs.summary()["non_finite_versions"] == [1, 2]
    assert "v1: held-out loss is nan" in caplog.text
    json.dumps(obs.summary(), allow_nan=False)


def test_target_options_must_fit_the_bundle(bundle, split, tiny_bundle):
    base = ["node", "run", "--id", "cloud", "--broker", "mqtt://127.0.0.1:1", "--job", JOB]
    cases = [
        ([*base, "--bundle", str(bundle), "--eval-data", str(split / "test.jsonl"), "--target-accuracy", "0.9"],
         "--target-accuracy is for classifier bundles"),
        ([*base, "--bundle", str(bundle), "--target-loss", "2.0"], "--target-loss needs --eval-data"),
        ([*base, "--bundle", str(bundle), "--eval-data", str(split / "test.jsonl"), "--target-loss", "-1"],
         "--target-loss must be a positive number"),
        ([*base, "--bundle", str(tiny_bundle), "--eval-data", str(split / "test.jsonl"), "--target-loss", "2.0"],
         "--target-loss is for causal-LM bundles"),
    ]
    for args, message in cases:
        r = run_tomtit(args, no_torch=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    from tomtit.cli import CliError
    from tomtit.cli.node_cmd import _check_eval_options

    with pytest.raises(CliError, match="needs a causal-LM bundle"):
        _check_eval_options(Namespace(target_accuracy=None, target_loss=None, eval_generate=2, eval_data="x",
                                      eval_new_tokens=8, eval_max=10), causal=False)


def _stop(procs: dict) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.mark.mosquitto
def test_live_federation_lowers_held_out_loss_and_stops_at_target(tmp_path, mosquitto, bundle, split):
    """Cloud + 2 devices on Mosquitto, each its own process (the device and the cloud without torch)."""
    base, tokens = reference_loss(bundle, split / "test.jsonl", initial_adapter(bundle))
    target = round(base - 0.3, 3)  # ~1.2 s of training in the run this test was written with
    common = ["--bundle", str(bundle), "--broker", mosquitto.url, "--job", JOB]
    logs = {n: tmp_path / f"{n}.log" for n in ("cloud", "d0", "d1")}
    cloud_summary = tmp_path / "cloud.json"
    procs = {"cloud": spawn_tomtit(
        ["node", "run", "--id", "cloud", *common, "--k", "2", "--device-scheduler", "fixed:5",
         "--eval-data", str(split / "test.jsonl"), "--target-loss", str(target), "--eval-generate", "2",
         "--eval-new-tokens", "6", "--max-minutes", "3", "--state-dir", str(tmp_path / "s-cloud"),
         "--summary", str(cloud_summary)], logs["cloud"])}
    for i in range(2):
        procs[f"d{i}"] = spawn_tomtit(
            ["device", "run", "--id", f"d{i}", "--parent", "cloud", *common, "--data",
             str(split / f"device-0{i}.jsonl"), "--batch", "4", "--lr", "1e-2", "--seed", str(i),
             "--state-dir", str(tmp_path / f"s-d{i}"), "--summary", str(tmp_path / f"d{i}.json")], logs[f"d{i}"])
    try:
        assert procs["cloud"].wait(timeout=180) == 0, logs["cloud"].read_text()[-3000:]
        for name in ("d0", "d1"):
            assert procs[name].wait(timeout=60) == 0, logs[name].read_text()[-3000:]
    finally:
        _stop(procs)
    cloud = json.loads(cloud_summary.read_text())
    hist = cloud["heldout_loss"]
    print(f"held-out loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} (target {target}) in "
          f"{cloud['seconds']:.1f} s, {cloud['final_version']} versions")
    assert cloud["task"] == "causal-lm" and "accuracy" not in cloud
    assert hist[0]["version"] == 0 and hist[0]["tokens"] == tokens
    assert abs(hist[0]["loss"] - base) < 1e-4  # the cloud's evaluation = the independent masked mean CE
    assert hist[0]["perplexity"] == pytest.approx(math.exp(hist[0]["loss"]))
    assert cloud["stop_reason"] == f"target loss {target} reached"
    assert hist[-1]["loss"] <= target < hist[0]["loss"] and cloud["final_version"] >= 1
    assert all(0.0 <= h["unigram_f1"] <= 1.0 for h in hist)
    assert "held-out loss" in logs["cloud"].read_text()
    for i in range(2):
        dev = json.loads((tmp_path / f"d{i}.json").read_text())
        assert dev["stop_reason"] == "parent finished" and dev["syncs"] >= 1 and dev["backend"] == "portable"
        assert dev["serving"]["requests"] == 0
    # the report and the monitor's plain snapshot show the loss, not accuracy
    (tmp_path / "report").mkdir()
    for f in ("cloud.json", "d0.json", "d1.json"):
        (tmp_path / "report" / f).write_text((tmp_path / f).read_text())
    r = run_tomtit(["report", str(tmp_path / "report")])
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "heldout_loss_vs_time.png").is_file()
    assert not (tmp_path / "report" / "accuracy_vs_time.png").exists()
    assert f"held-out loss (mean token cross-entropy): {hist[0]['loss']:.3f} (base model" in md


@pytest.mark.mosquitto
def test_a_training_device_answers_generation_requests(tmp_path, mosquitto, bundle, split):
    """`tomtit infer --remote` on a device training a causal LM gets generated text back; bad
    requests get error replies. Learning rate 0 keeps the global model the bundle's initial
    adapter, so the answer must equal generating here with it."""
    from device_runtime.bundle import open_bundle
    from device_runtime.generation import Generator
    from tomtit.mqtt import MqttOptions, MqttTransport
    from tomtit.wire import Topics, decode_reply

    job = "lmserve"
    logs = {"cloud": tmp_path / "cloud.log", "dev": tmp_path / "dev.log"}
    summary = tmp_path / "dev.json"
    procs = {
        "cloud": spawn_tomtit(["node", "run", "--id", "cloud", "--bundle", str(bundle), "--broker", mosquitto.url,
                               "--job", job, "--k", "1", "--state-dir", str(tmp_path / "s-cloud")], logs["cloud"]),
        "dev": spawn_tomtit(["device", "run", "--id", "dev1", "--parent", "cloud", "--bundle", str(bundle),
                             "--data", str(split / "device-00.jsonl"), "--broker", mosquitto.url, "--job", job,
                             "--scheduler", "fixed:5", "--lr", "0", "--batch", "4", "--state-dir",
                             str(tmp_path / "s-dev"), "--summary", str(summary)], logs["dev"]),
    }
    prompts = ["Write a headline.\n\nReporters said today that bank raises interest rates.", "Team wins"]
    try:
        wait_for(lambda: "adopted parent model" in logs["dev"].read_text(), 60, "the device's first model", logs)
        common = ["--broker", mosquitto.url, "--job", job, "--timeout", "60"]
        r = run_tomtit(["infer", "--remote", "dev1", *common, "--max-new-tokens", "6", "--json", *prompts],
                       no_torch=True, timeout=120)
        assert r.returncode == 0, r.stderr + logs["dev"].read_text()[-1500:]
        out = json.loads(r.stdout)
        gen = Generator(open_bundle(bundle))
        want = [gen.generate(p, initial_adapter(bundle), max_new_tokens=6) for p in prompts]
        assert (out["device"], out["adapter"]) == ("dev1", "global")
        assert [g["prompt"] for g in out["generations"]] == prompts
        assert [g["text"] for g in out["generations"]] == want
        r = run_tomtit(["infer", "--remote", "dev1", *common, *["p"] * 5], timeout=120)
        assert r.returncode == 2 and "too_many_texts" in r.stderr  # generation: at most 4 prompts a request
        r = run_tomtit(["infer", "--remote", "dev1", *common, "--max-new-tokens", "0", "p"], timeout=60)
        assert r.returncode == 2 and "max_new_tokens" in r.stderr  # refused before it is sent

        # malformed requests straight on the wire: each gets an error reply, and training goes on
        t = Topics(job)
        raw = MqttTransport(MqttOptions(url=mosquitto.url, client_id="raw-lm", persistent=False)).start()
        try:
            assert raw.wait_connected(10)
            reply_to = t.infer_reply("dev1", "raw")
            raw.subscribe(reply_to, qos=0)
            time.sleep(0.3)
            for body in (b'{"reply_to": "' + reply_to.encode() + b'", "texts": ["x"',
                         json.dumps({"texts": ["x"], "max_new_tokens": 10_000, "reply_to": reply_to}).encode()):
                raw.publish(t.infer_request("dev1"), body, qos=1)
            errors = []
            deadline = time.monotonic() + 30
            while len(errors) < 2 and time.monotonic() < deadline:
                m = raw.get(0.5)
                if m is not None:
                    reply = decode_reply(m.payload)
                    assert not reply.ok
                    errors.append(reply.error)
            assert sorted(errors) == ["bad_max_new_tokens", "not_json"], errors
        finally:
            raw.close()
    finally:
        procs["dev"].send_signal(signal.SIGTERM)
        rc = procs["dev"].wait(60)
        procs["cloud"].send_signal(signal.SIGTERM)
        procs["cloud"].wait(60)
    assert rc == 0, logs["dev"].read_text()[-2000:]
    s = json.loads(summary.read_text())
    assert s["steps"] > 0 and s["serving"]["answered"] == 1 and s["serving"]["texts"] == 2
    assert s["serving"]["errors"] == {"too_many_texts": 1, "not_json": 1, "bad_max_new_tokens": 1}


def test_the_monitor_shows_a_causal_clouds_held_out_loss():
    """A causal-LM cloud's telemetry (heldout_loss, perplexity; no accuracy): one point per model,
    a sparkline on the points' own range, the loss in the cloud's row."""
    import io

    from tomtit.monitor.plain import PlainSink, snapshot
    from tomtit.monitor.rows import Session, loss_lines, rows
    from tomtit.monitor.state import FleetState
    from tomtit.wire import Topics, encode_telemetry

    state = FleetState("j")
    topic = Topics("j").telemetry("cloud")
    losses = [(1, 6.0), (1, 6.0), (2, 5.0), (3, 4.0), (4, 2.0)]  # v1 repeated by a telemetry tick
    for i, (v, loss) in enumerate(losses):
        payload = encode_telemetry({"role": "cloud", "parent": "", "version": v, "aggregations": v,
                                    "heldout_loss": loss, "perplexity": math.exp(loss)})
        assert state.apply(topic, payload, 100.0 + i) == "cloud"
    points = state.members["cloud"].heldout_loss
    assert [(p.version, p.loss) for p in points] == [(1, 6.0), (2, 5.0), (3, 4.0), (4, 2.0)]
    # range 2..6 in eighths: 6 -> █ (k = 8, clamped), 5 -> k = 6 ▇, 4 -> k = 4 ▅, 2 -> k = 0 ▁
    assert loss_lines(state) == [("cloud", "█▇▅▁", f"2.000 ppl {math.exp(2.0):.1f}", 4)]
    assert state.accuracy_series() == []
    assert rows(state, 105.0)[0].loss == "2.000"
    session = Session(broker="mqtt://x", job="j", started=100.0, link="connected")
    lines = snapshot(session, state, 105.0)
    assert any(line.endswith(f"cloud held-out loss █▇▅▁ 2.000 ppl {math.exp(2.0):.1f} (4 models)") for line in lines)
    out = io.StringIO()
    sink = PlainSink(out)
    sink.tick(session, state, 105.0)
    sink.tick(session, state, 106.0)  # nothing new: nothing printed
    assert sum("held-out loss" in line for line in out.getvalue().splitlines()) == 1


def test_the_cloud_evaluates_evenly_spaced_rows(bundle, split, tmp_path):
    """--eval-max N takes N rows spread over the file (a split's test file is grouped by category):
    rows 0, 4, 8, ... of 17 for N = 5 here, and their loss is the independent masked mean CE."""
    import logging

    from tomtit.cli.node_cmd import _causal_evaluator

    rows = (split / "test.jsonl").read_text().splitlines()
    n = 5
    picked = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    (tmp_path / "picked.jsonl").write_text("\n".join(rows[i] for i in picked) + "\n")
    args = Namespace(bundle=bundle, eval_data=str(split / "test.jsonl"), eval_max=n, eval_generate=1,
                     eval_new_tokens=4, target_loss=None, threads=1)
    observer = _causal_evaluator(args, logging.getLogger("test"))
    want, tokens = reference_loss(bundle, tmp_path / "picked.jsonl", initial_adapter(bundle))
    assert observer.loss_fn.tokens == tokens
    assert abs(observer.loss_fn(initial_adapter(bundle)) - want) < 1e-4
    first = json.loads(rows[picked[0]])  # the generation subset: the first picked prompt/response row
    assert observer.score_fn.prompts == [first["prompt"]] and observer.score_fn.references == [first["response"]]


def test_the_server_generates_one_request_per_gap_and_refuses_what_it_cannot():
    """In process (MemoryBroker): a generation request is answered with each prompt's continuation,
    with its max_new_tokens; one request per serve(); more than 4 prompts and an out-of-range
    max_new_tokens are refused with a reason; the wire round-trips `generated`."""
    from device_runtime.serving import MAX_GENERATE_TEXTS, InferenceServer, ServeConfig, ServedAdapter
    from tomtit.transport import MemoryBroker
    from tomtit.wire import InferReply, InferRequest, Topics, WireError, decode_reply, encode_reply, encode_request

    calls = []

    class Gen:
        def generate(self, prompt, adapter, max_new_tokens):
            calls.append((prompt, float(adapter[0]), max_new_tokens))
            return f"<{prompt}:{max_new_tokens}>"

    class Adapters:
        def served_adapter(self, kind):
            return ServedAdapter(np.full(3, 7.0 if kind == "global" else 8.0, np.float32), 5, 12)

    with pytest.raises(ValueError):
        InferenceServer(ServeConfig(device_id="d1", job="j"), transport=None)
    broker, t = MemoryBroker(), Topics("j")
    dev = broker.client("d1")
    server = InferenceServer(ServeConfig(device_id="d1", job="j"), transport=dev, load_generator=Gen)
    server.subscribe()
    client = broker.client("c")
    reply_to = t.infer_reply("d1", "tok")
    client.subscribe(reply_to)

    def ask(texts, rid, **kw):
        client.publish(t.infer_request("d1"), encode_request(InferRequest(texts=tuple(texts), reply_to=reply_to, id=rid,
                                                                          **kw)))

    ask(["a", "b"], "r1", max_new_tokens=3)
    ask(["c"], "r2", adapter="local")
    ask(["p"] * (MAX_GENERATE_TEXTS + 1), "r3")
    client.publish(t.infer_request("d1"), json.dumps({"texts": ["x"], "max_new_tokens": 0, "reply_to": reply_to,
                                                      "id": "r4"}).encode())
    while (m := dev.get(0)) is not None:
        server.offer(m)
    assert server.pending == 2  # the two bad ones were answered at once
    assert server.serve(Adapters()) == 2 and server.pending == 1  # one request per gap between steps
    assert server.serve(Adapters()) == 1
    assert calls == [("a", 7.0, 3), ("b", 7.0, 3), ("c", 8.0, 32)]  # default 32 tokens
    replies = {r.id: r for r in (decode_reply(m.payload) for m in iter(lambda: client.get(0), None))}
    assert (replies["r3"].ok, replies["r3"].error) == (False, "too_many_texts")
    assert (replies["r4"].ok, replies["r4"].error) == (False, "bad_max_new_tokens")
    assert replies["r1"].generated == ("<a:3>", "<b:3>") and replies["r1"].labels == ()
    assert (replies["r2"].adapter, replies["r2"].version, replies["r2"].step) == ("local", 5, 12)
    assert server.summary()["answered"] == 2 and server.summary()["texts"] == 3
    with pytest.raises(WireError):  # a reply carries generated text or labels, never both
        InferReply(device="d1", ok=True, adapter="global", generated=("x",), labels=("a",))
    again = decode_reply(encode_reply(replies["r1"]))
    assert again == replies["r1"]


def test_a_generation_request_is_bounded_by_its_token_budget():
    """One generation request is what one gap between training steps may cost: at most
    MAX_GENERATE_TOKENS new tokens over all its prompts (4 x 128 used to be accepted: 512 runs of
    the model between two steps). Refused with "too_many_tokens" beyond; served within it."""
    from device_runtime.serving import InferenceServer, ServeConfig, ServedAdapter
    from tomtit.transport import MemoryBroker
    from tomtit.wire import InferRequest, Topics, decode_reply, encode_request
    from tomtit.wire.infer import DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS

    assert DEFAULT_NEW_TOKENS == 32 and MAX_NEW_TOKENS == 128  # the cases below are worked out with these
    tokens_per_serve = []

    class Gen:
        def generate(self, prompt, adapter, max_new_tokens):
            tokens_per_serve[-1] += max_new_tokens  # the most this prompt can cost, in runs of the model
            return "x"

    class Adapters:
        def served_adapter(self, kind):
            return ServedAdapter(np.zeros(3, np.float32), 1, 2)

    broker, t = MemoryBroker(), Topics("j")
    dev = broker.client("d1")
    server = InferenceServer(ServeConfig(device_id="d1", job="j"), transport=dev, load_generator=Gen)
    server.subscribe()
    client = broker.client("c")
    reply_to = t.infer_reply("d1", "tok")
    client.subscribe(reply_to)
    cases = {  # id: (prompts, max_new_tokens, fits?) with the budget worked out by hand
        "4x32": (4, None, True),  # the default: 4 x 32 = 128
        "1x128": (1, 128, True),
        "3x42": (3, 42, True),  # 126
        "2x128": (2, 128, False),  # 256
        "4x128": (4, 128, False),  # 512
        "4x33": (4, 33, False),  # 132
        "3x43": (3, 43, False),  # 129
    }
    for rid, (n, tokens, _) in cases.items():
        client.publish(t.infer_request("d1"), encode_request(InferRequest(
            texts=tuple(f"p{i}" for i in range(n)), reply_to=reply_to, id=rid, max_new_tokens=tokens)))
    while (m := dev.get(0)) is not None:
        server.offer(m)
    while server.pending:
        tokens_per_serve.append(0)
        server.serve(Adapters())
    replies = {r.id: r for r in (decode_reply(m.payload) for m in iter(lambda: client.get(0), None))}
    for rid, (_, _, fits) in cases.items():
        assert (replies[rid].ok, replies[rid].error) == ((True, "") if fits else (False, "too_many_tokens")), rid
    assert tokens_per_serve == [128, 128, 126]
    assert server.summary()["errors"] == {"too_many_tokens": 4}
