"""`tomtit node run`: an aggregating node (edge with --parent, cloud without)."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from device_runtime.scheduler import DEVICE_SCHEDULER, EDGE_SCHEDULER
from tomtit.cli.mqtt_args import (add_broker_args, mqtt_options, resolve_identity, setup_logging, signing_keys,
                                  stop_event_on_signals)


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("run", help="aggregate children's updates; sync upward autonomously if --parent")
    r.add_argument("--id", help="this node's id (default: the credentials')")
    r.add_argument("--bundle", required=True, type=Path)
    add_broker_args(r)
    r.add_argument("--parent", help="parent node id (this node is then an edge); none = cloud")
    r.add_argument("--strategy", default="fedbuff", help="fedbuff | fedavg | fednova | median | trimmed")
    r.add_argument("--children", type=int, help="expected children (fedavg waits for all; caps K otherwise)")
    r.add_argument("--k", type=int, help="apply after K buffered updates (cloud: for every node of the run; "
                                         "edge: overrides the run's)")
    r.add_argument("--max-wait", type=float, help="...or after this many seconds since the first buffered one")
    r.add_argument("--max-staleness", type=int, help="reject updates more than this many versions old")
    r.add_argument("--server-lr", type=float)
    r.add_argument("--max-norm", type=float, default=100.0, help="reject child deltas with a larger L2 norm")
    r.add_argument("--clip-norm", type=float,
                   help="clip each child delta to this L2 norm before aggregating (default: off); against a "
                        "poisoning device, ~2x the largest honest norm (README: Deploying to the field)")
    r.add_argument("--scheduler", help=f"edge: {EDGE_SCHEDULER} | marginal (tau_min 5, slower at an edge) | fixed:K2 "
                                       f"| adaptive (default: the run's edge scheduler)")
    r.add_argument("--device-scheduler", default=DEVICE_SCHEDULER,
                   help=f"cloud: the run's device scheduler (published; default {DEVICE_SCHEDULER})")
    r.add_argument("--edge-scheduler", default=EDGE_SCHEDULER,
                   help=f"cloud: the run's edge scheduler (published; default {EDGE_SCHEDULER})")
    r.add_argument("--up-codec", default="f16", choices=["f32", "f16", "int8"],
                   help="cloud: the codec children encode updates with (published)")
    r.add_argument("--config-timeout", type=float, default=120.0,
                   help="edge: seconds to wait for the run configuration the cloud publishes")
    r.add_argument("--eval-data", help="cloud: held-out JSONL/CSV to evaluate each global model on (causal-LM "
                                        "bundle: JSONL prompt/response or text rows, e.g. a split's test.jsonl; "
                                        "scored by mean token cross-entropy and perplexity)")
    r.add_argument("--eval-max", type=int, default=1000,
                   help="evaluate on N held-out examples (classifier: the first N; causal LM: N evenly spaced rows, "
                        "since a split's test file is grouped by category)")
    r.add_argument("--target-accuracy", type=float, help="classifier bundle: finish at this held-out accuracy")
    r.add_argument("--target-loss", type=float,
                   help="causal-LM bundle: finish once the held-out loss (mean token cross-entropy, nats) is at "
                        "most this")
    r.add_argument("--eval-generate", type=int, default=0, metavar="N",
                   help="causal-LM bundle: also generate greedily for the first N prompt/response rows of the "
                        "evenly spaced --eval-max subset of --eval-data and score unigram F1 (ROUGE-1) against their responses (default 0: off)")
    r.add_argument("--eval-new-tokens", type=int, default=24,
                   help="with --eval-generate: tokens to generate per prompt")
    r.add_argument("--max-minutes", type=float)
    r.add_argument("--state-dir", type=Path, help="checkpoints and outbox (default: ./state/JOB/ID)")
    r.add_argument("--summary", type=Path, help="write the run summary JSON here when stopping")
    r.add_argument("--save-model", type=Path, help="write this node's final model here when stopping (an adapter "
                                                   "file: `tomtit infer --adapter`, `tomtit peft export --adapter`)")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--energy", default="auto", help="edge: its own energy meter (auto | rapl | ina3221 | model:PROFILE)")


def run(args: argparse.Namespace) -> int:
    from device_runtime.adapter import load_adapter
    from device_runtime.bundle import open_bundle
    from device_runtime.energy import detect_meter
    from device_runtime.scheduler import make_scheduler
    from edge_broker.aggregation import BufferConfig, make_strategy
    from edge_broker.node import Node, NodeConfig
    from edge_broker.observers import EvaluateAndStop, Evaluator
    from tomtit.cli import CliError
    from tomtit.mqtt import MqttTransport
    from tomtit.transport import Will
    from tomtit.cli.mqtt_args import await_run_config
    from tomtit.wire import Presence, RunConfig, Topics, check_id, encode_presence

    from tomtit.alloc import retain_freed_memory

    creds = resolve_identity(args, roles=("edge", "cloud"), needs_parent=False)
    signer, keyring = signing_keys(creds)  # with credentials: sign models and pushes, take only signed updates
    setup_logging(args, args.id)
    log = logging.getLogger("tomtit.node")
    retain_freed_memory()  # the hot path allocates adapter-sized arrays per update (see tomtit/alloc.py)
    check_id(args.id, "--id")
    if args.parent:
        check_id(args.parent, "--parent")
    if args.parent is None and args.eval_data is None and args.target_accuracy is not None:
        raise CliError("--target-accuracy needs --eval-data")
    bundle = open_bundle(args.bundle, roles=("initial_adapter", "inference_model", "tokenizer"))
    m = bundle.manifest
    _check_eval_options(args, causal=m.task == "causal-lm")
    observers = []  # built before the broker: bad held-out data fails here, not after connecting
    if args.eval_data and m.task == "causal-lm":
        observers.append(_causal_evaluator(args, log))
    elif args.eval_data:
        from device_runtime.inference import Classifier
        from device_runtime.local_data import encode_dataset
        from tomtit.data import load_dataset

        clf = Classifier(bundle, threads=args.threads)
        data = encode_dataset(load_dataset(args.eval_data), clf.encoder, m)
        n = min(len(data), args.eval_max)
        observers.append(EvaluateAndStop(Evaluator(clf, data.input_ids[:n], data.attention_mask[:n], data.labels[:n]),
                                         args.target_accuracy))
    topics = Topics(args.job)
    will = Will(topics.status(args.id), encode_presence(Presence(id=args.id, state="offline", role="node",
                                                                  version=0, ts=0.0)))
    transport = MqttTransport(mqtt_options(args, client_id=f"tomtit-{args.job}-{args.id}"), will=will).start()
    if not transport.wait_connected(10):
        log.warning("broker %s not reachable yet (%s); retrying in the background", args.broker,
                    transport.last_error or "no answer")
    stop = stop_event_on_signals()
    if args.parent is None:
        # The cloud owns the run's configuration and publishes it (retained): children take the
        # settings that must agree across the tree from there, not from flags set to match by hand.
        run_config = RunConfig(job=args.job, bundle_id=m.bundle_id, up_codec=args.up_codec,
                               device_scheduler=args.device_scheduler, edge_scheduler=args.edge_scheduler,
                               k_updates=args.k or 3, max_wait_s=args.max_wait or 30.0,
                               max_staleness=(args.max_staleness if args.max_staleness is not None
                                              else BufferConfig().max_staleness),
                               staleness_exponent=0.5, target_accuracy=args.target_accuracy,
                               deadline_s=60 * args.max_minutes if args.max_minutes else None, created_at=time.time())
        make_scheduler(run_config.device_scheduler), make_scheduler(run_config.edge_scheduler)  # fail here, not there
    else:
        run_config = await_run_config(transport, args.job, m.bundle_id, args.config_timeout, stop)
        if run_config is None:
            transport.close()
            raise CliError(f"no run configuration on {topics.run()} within {args.config_timeout:g} s: "
                           f"start the cloud node of job {args.job!r} first")
        log.info("run configuration from the cloud: edge scheduler %s, K=%d, codec %s", run_config.edge_scheduler,
                 run_config.k_updates, run_config.up_codec)
    explicit = {k: v for k, v in {"k_updates": args.k, "max_wait_s": args.max_wait, "server_lr": args.server_lr,
                                  "max_staleness": args.max_staleness, "clip_norm": args.clip_norm}.items()
                if v is not None}
    if args.strategy == "fedavg":
        opts = explicit  # synchronous rounds: K = the children, no discount, whatever the run says
    else:
        opts = {"k_updates": run_config.k_updates, "max_wait_s": run_config.max_wait_s,
                "max_staleness": run_config.max_staleness, "staleness_exponent": run_config.staleness_exponent,
                **explicit}
        if args.children and args.k is None:  # a node with fewer children than K would wait for its timer
            opts["k_updates"] = min(run_config.k_updates, args.children)
    buffer = make_strategy(args.strategy, expected_children=args.children, **opts)
    scheduler = make_scheduler(args.scheduler or run_config.edge_scheduler) if args.parent else None
    config = NodeConfig(node_id=args.id, parent=args.parent, job=args.job, max_update_norm=args.max_norm,
                        max_minutes=args.max_minutes, up_codec=run_config.up_codec)
    # An edge's scheduler weighs its own joules too (aggregation CPU, its radio): same meters as a device.
    meter = detect_meter(args.energy) if args.parent else None
    node = Node(config, manifest=m, initial_adapter=load_adapter(bundle.path("initial_adapter"), m), buffer=buffer,
                transport=transport, state_dir=args.state_dir or Path("state") / args.job / args.id,
                scheduler=scheduler, observers=observers, meter=meter,
                run_config=run_config if args.parent is None else None, signer=signer, keyring=keyring)
    log.info("node %s (%s), strategy %s, bundle %s", args.id, f"edge of {args.parent}" if args.parent else "cloud",
             args.strategy, m.bundle_id)
    try:
        node.run(stop.is_set)
    finally:
        transport.close()
        if args.summary:
            args.summary.write_text(json.dumps(node.summary(), indent=2))
        if args.save_model:
            from device_runtime.adapter import save_adapter

            save_adapter(args.save_model, node.model, m, version=str(node.version), node=args.id, job=args.job)
    log.info("stopped (%s) at version %d", node.stats.stop_reason, node.version)
    return 0


def _check_eval_options(args: argparse.Namespace, *, causal: bool) -> None:
    """The stop target that fits the bundle's task, and the options that go with it."""
    import math

    from tomtit.cli import CliError

    if causal and args.target_accuracy is not None:
        raise CliError("--target-accuracy is for classifier bundles; this bundle is a causal LM: stop a run "
                       "with --target-loss (held-out mean token cross-entropy)")
    if not causal and args.target_loss is not None:
        raise CliError("--target-loss is for causal-LM bundles; a classifier run stops at --target-accuracy")
    if not causal and args.eval_generate:
        raise CliError("--eval-generate scores generated text: it needs a causal-LM bundle")
    if args.target_loss is not None:
        if args.eval_data is None:
            raise CliError("--target-loss needs --eval-data")
        if not (math.isfinite(args.target_loss) and args.target_loss > 0):
            raise CliError(f"--target-loss must be a positive number of nats, not {args.target_loss}")
    if args.eval_generate and args.eval_data is None:
        raise CliError("--eval-generate needs --eval-data")
    if args.eval_generate < 0 or not 1 <= args.eval_new_tokens <= 256 or args.eval_max < 1:
        raise CliError("--eval-generate must be >= 0, --eval-new-tokens in 1..256 and --eval-max >= 1")


def _causal_evaluator(args: argparse.Namespace, log):
    """Held-out loss from the bundle's full-sequence inference graph (device_runtime, no torch),
    plus, with --eval-generate, a unigram-F1 score of greedy generations on a fixed subset."""
    import numpy as np

    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier, TokenLoss
    from device_runtime.local_data import encode_lm_dataset
    from edge_broker.observers import GenerationScore, HeldOutLossAndStop
    from tomtit.cli import CliError
    from tomtit.lm_data import load_lm_dataset

    # the inference graph keeps its frozen weights in the shared external file: verify it too
    roles = ("inference_model", "tokenizer", "weights")
    if args.eval_generate and "generation_model" in open_bundle(args.bundle, roles=(), verify=False).manifest.files:
        roles += ("generation_model",)  # the KV-cache graph the generator runs
    bundle = open_bundle(args.bundle, roles=roles)
    ds = load_lm_dataset(args.eval_data)
    data = encode_lm_dataset(ds, bundle.path("tokenizer"), bundle.manifest)
    n = min(len(data), args.eval_max)
    # evenly spaced rows, not the first n: a split's test.jsonl is grouped by category, and the
    # first rows of a BBC split are all business news
    pick = np.unique(np.linspace(0, len(data) - 1, n).round().astype(np.int64))
    loss = TokenLoss(Classifier(bundle, threads=args.threads, memory="lean", token_logits=True),
                     data.input_ids[pick], data.attention_mask[pick], data.labels[pick])
    score = None
    if args.eval_generate:
        pairs = [(ds.prompts[i], ds.responses[i]) for i in pick if ds.prompts[i]][:args.eval_generate]
        if not pairs:
            raise CliError(f"--eval-generate: {args.eval_data} has no prompt/response rows among the {n} evaluated")
        from device_runtime.generation import Generator

        gen = Generator(bundle, threads=args.threads)
        score = GenerationScore(gen, [p for p, _ in pairs], [r for _, r in pairs], max_new_tokens=args.eval_new_tokens)
    log.info("evaluating each global model on %d held-out examples (%d scored tokens)%s", len(pick), loss.tokens,
             f", generating for {len(score.prompts)}" if score else "")
    return HeldOutLossAndStop(loss, args.target_loss, score)
