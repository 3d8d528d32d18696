"""`tomtit infer`: classify texts on the device (plain ONNX Runtime, no torch), or ask a running
device to classify them over MQTT (`--remote DEVICE_ID`: served inference, tomtit.wire.infer).
A device training a causal LM answers a remote request with generated text: the texts are its
prompts (`--max-new-tokens`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    from tomtit.cli.mqtt_args import add_broker_args

    p.add_argument("--bundle", type=Path, help="the bundle to run here (or --remote)")
    p.add_argument("--adapter", type=Path, help="adapter safetensors (default: the bundle's initial adapter)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    remote = p.add_argument_group("served inference: ask a device that runs `tomtit device run`")
    remote.add_argument("--remote", metavar="DEVICE_ID", help="the device to ask, over the broker (--broker or "
                                                              "--credentials)")
    remote.add_argument("--adapter-kind", choices=["global", "local"], default="global",
                        help="global: the latest model the device adopted from its parent (default); "
                             "local: the device's own adapter as trained so far")
    remote.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer")
    remote.add_argument("--max-new-tokens", type=int,
                        help="a device training a causal LM: tokens to generate per prompt (1..128; the device's "
                             "default: 32); a classifier device ignores it")
    add_broker_args(remote)
    p.add_argument("texts", nargs="+", metavar="TEXT")


def run(args: argparse.Namespace) -> int:
    from tomtit.cli import CliError

    if (args.bundle is None) == (args.remote is None):
        raise CliError("give one of --bundle B (classify here) and --remote DEVICE_ID (ask a device)")
    if args.remote is not None:
        if args.adapter is not None:
            raise CliError("--adapter is a local adapter file; with --remote choose --adapter-kind global|local")
        return _run_remote(args)
    if args.broker is not None or args.credentials is not None or args.max_new_tokens is not None:
        raise CliError("--broker, --credentials and --max-new-tokens go with --remote DEVICE_ID "
                       "(generate here: tomtit generate --bundle B)")

    from device_runtime.adapter import load_adapter
    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier

    from device_runtime.inference import refuse_causal

    bundle = open_bundle(args.bundle, roles=(), verify=False)
    refuse_causal(bundle.manifest, bundle.root)  # before hashing or loading anything
    bundle = open_bundle(args.bundle, roles=("inference_model", "tokenizer", "initial_adapter"))
    adapter = load_adapter(args.adapter or bundle.path("initial_adapter"), bundle.manifest)
    preds = Classifier(bundle, threads=args.threads).predict(args.texts, adapter)
    _print(preds, args.json)
    return 0


def _print(preds, as_json: bool, extra: dict | None = None) -> None:
    rows = [{"text": p.text, "label": p.label, "probabilities": p.probabilities} for p in preds]
    if as_json:
        print(json.dumps(rows if extra is None else {**extra, "predictions": rows}))
        return
    for p in preds:
        top = sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:3]
        print(f"{p.label:>15}  ({', '.join(f'{k} {v:.2f}' for k, v in top)})  {p.text[:70]}")


def _run_remote(args: argparse.Namespace) -> int:
    """One request, one reply: a fresh, non-persistent MQTT session with a reply topic of its own."""
    import dataclasses
    import time
    import uuid

    from device_runtime.inference import Prediction
    from tomtit.cli import CliError
    from tomtit.cli.mqtt_args import mqtt_options
    from tomtit.mqtt import MqttTransport
    from tomtit.wire import MAX_TEXT_CHARS, InferRequest, Topics, WireError, check_id, decode_reply, encode_request

    token = uuid.uuid4().hex
    options = dataclasses.replace(mqtt_options(args, client_id=f"tomtit-infer-{token[:12]}"), persistent=False)
    device = args.remote
    try:
        check_id(device, "--remote")
        topics = Topics(args.job)
        reply_to = topics.infer_reply(device, token)
        # reply_to and id in the JSON (any device answers them); on MQTT 5 also as Response Topic and
        # Correlation Data, which a device connected with MQTT 5 uses instead
        # the model reads only the bundle's first max_length tokens (64 by default, ~300 characters):
        # a long article is cut here rather than refused by the device
        sent = tuple(t[:MAX_TEXT_CHARS] for t in args.texts)
        if sent != tuple(args.texts):
            print(f"tomtit infer: texts longer than {MAX_TEXT_CHARS} characters were cut to their first "
                  f"{MAX_TEXT_CHARS} (the device's limit)", file=sys.stderr)
        payload = encode_request(InferRequest(texts=sent, adapter=args.adapter_kind, reply_to=reply_to, id=token,
                                              max_new_tokens=args.max_new_tokens))
    except WireError as e:
        raise CliError(str(e)) from None
    transport = MqttTransport(options).start()
    try:
        if not transport.wait_connected(min(args.timeout, 10.0)):
            raise CliError(f"broker {args.broker} not reachable: {transport.last_error or 'no answer'}")
        transport.subscribe(reply_to, qos=0)  # on the wire before the request: its reply cannot overtake it
        transport.publish(topics.infer_request(device), payload, qos=1, response_topic=reply_to,
                          correlation_data=token.encode())
        deadline = time.monotonic() + args.timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = transport.get(min(left, 0.5))
            if msg is None or msg.topic != reply_to:
                continue
            try:
                reply = decode_reply(msg.payload)
            except WireError as e:
                print(f"tomtit infer: ignored a malformed reply: {e}", file=sys.stderr)
                continue
            if reply.id != token and msg.correlation_data != token.encode():
                continue  # not the answer to this request
            if not reply.ok:
                raise CliError(f"device {device} answered {reply.error}: {reply.detail}")
            check_answer_count(device, args.texts, reply)
            if reply.generated:
                _print_generated(args, reply)
                return 0
            preds = [Prediction(text, r.label, reply.probabilities(i))
                     for i, (text, r) in enumerate(zip(args.texts, reply.results))]
            extra = {"device": reply.device, "adapter": reply.adapter, "version": reply.version, "step": reply.step,
                     "queued_ms": reply.queued_ms, "infer_ms": reply.infer_ms}
            if not args.json:
                print(f"{device}: {reply.adapter} adapter, global version {reply.version}, step {reply.step}; "
                      f"{reply.queued_ms:.0f} ms queued, {reply.infer_ms:.0f} ms inference", file=sys.stderr)
            _print(preds, args.json, extra)
            return 0
        raise CliError(f"no answer from device {device!r} within {args.timeout:g} s on job {args.job!r} (is it "
                       f"running `tomtit device run` without --no-serve, on this broker, and may this login "
                       f"publish requests?)")
    finally:
        transport.close()


def check_answer_count(device: str, texts, reply) -> None:
    """A reply answers every text, in order, or it is not an answer: zip would silently drop the
    texts of a short reply (an older or broken device) and pair a long one's extras with nothing."""
    from tomtit.cli import CliError

    got = len(reply.generated) if reply.generated else len(reply.results)
    if got != len(texts):
        raise CliError(f"device {device} answered {got} result(s) for {len(texts)} text(s); not printing a "
                       "partial answer")


def _print_generated(args: argparse.Namespace, reply) -> None:
    """A causal-LM device's answer: each prompt's generated continuation."""
    rows = [{"prompt": p, "text": t} for p, t in zip(args.texts, reply.generated)]
    if args.json:
        print(json.dumps({"device": reply.device, "adapter": reply.adapter, "version": reply.version,
                          "step": reply.step, "queued_ms": reply.queued_ms, "infer_ms": reply.infer_ms,
                          "generations": rows}))
        return
    print(f"{reply.device}: {reply.adapter} adapter, global version {reply.version}, step {reply.step}; "
          f"{reply.queued_ms:.0f} ms queued, {reply.infer_ms:.0f} ms generating", file=sys.stderr)
    for r in rows:
        print(r["text"] if len(rows) == 1 else f"{r['prompt'][:40]!r} -> {r['text']}")
