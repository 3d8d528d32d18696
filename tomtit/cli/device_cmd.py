"""`tomtit device run`: the federated device agent (board side, no torch)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tomtit.cli import config_file, device_pack_cmd
from tomtit.cli.mqtt_args import (add_broker_args, mqtt_options, resolve_identity, setup_logging, signing_keys,
                                  stop_event_on_signals)


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("run", help="train locally and sync autonomously with the parent node")
    config_file.enable(r, prog="tomtit device run")  # --config FILE: every option below, flags override it
    r.add_argument("--bundle", required=True, type=Path)
    r.add_argument("--data", required=True, help="this device's JSONL/CSV examples (causal-LM bundle: JSONL with "
                                                 "prompt/response or text rows, e.g. a `tomtit data split` file)")
    r.add_argument("--parent", help="id of the node (edge) to sync with (default: the credentials')")
    r.add_argument("--id", help="this device's id, unique in the job (default: the credentials')")
    add_broker_args(r)
    r.add_argument("--scheduler", help="marginal | fixed:10 | adaptive (options: marginal:tau_max=40); "
                                       "default: the run's, from the cloud")
    r.add_argument("--energy", default="auto", help="auto | rapl | ina3221 | pi5-pmic | battery | model:PROFILE")
    r.add_argument("--board", help="emulate a board from tomtit/profiles.toml (pi4, pi5, jetson-nano, orin-nano, "
                                   "x86-minipc): steps paced to its step time, energy from its watts, labelled "
                                   "emulated:BOARD (demos and testbeds on one machine; never on the real board)")
    r.add_argument("--link", help="with --board: emulate a link too (ethernet, wifi, lte-m, nb-iot): sends wait "
                                  "for its airtime, its J/MB are metered (default: ethernet)")
    r.add_argument("--reference-step", type=float, default=None,
                   help="with --board: seconds of one batch-8 x 32-token step on the reference core that "
                        "profiles.toml's step factors are relative to (default 0.065)")
    r.add_argument("--slowdown", type=float, default=None,
                   help="with --board: run the emulated board F times slower than real (steps and airtime F x "
                        "longer; energy still in board time) when this machine is too loaded to keep its pace")
    r.add_argument("--codec", choices=["f32", "f16", "int8"], help="update encoding (default: the run's; f16 with an explicit --scheduler)")
    r.add_argument("--config-timeout", type=float, default=120.0,
                   help="seconds to wait for the run configuration the cloud publishes")
    r.add_argument("--state-dir", type=Path, help="outbox and resume state (default: ./state/JOB/ID)")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--memory", choices=["lean", "fast"], default="lean",
                   help="ORT session profile: lean (default; ~0.4x PyTorch's peak RSS, ~5% slower steps) or "
                        "fast (ORT's defaults: weight pre-packing, constant folding, memory pattern)")
    r.add_argument("--backend", default="auto", help="auto | ort-training | portable (plain onnxruntime)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-steps", type=int, help="stop after this many local steps")
    r.add_argument("--link-j-per-mb", type=float, default=0.5, help="radio energy per MB uploaded")
    r.add_argument("--resend-after", type=float, default=30.0, help="seconds before re-sending an unacknowledged update")
    r.add_argument("--summary", type=Path, help="write a JSON summary here on exit")
    r.add_argument("--no-serve", action="store_true",
                   help="do not answer inference requests (default: answer them on tomtit/JOB/infer/ID/request "
                        "between training steps, one batch per step; `tomtit infer --remote ID` asks)")
    device_pack_cmd.register(sub)  # `tomtit device pack`: everything a board needs, offline


def run(args: argparse.Namespace) -> int:
    config_file.resolve(args)  # --config values where no flag was given; checks --bundle and --data
    from device_runtime.agent import DeviceAgent, DeviceConfig
    from device_runtime.energy import detect_meter
    from device_runtime.local_data import BatchStream, encode_for_bundle
    from device_runtime.scheduler import make_scheduler
    from device_runtime.trainer import TrainerConfig, make_trainer, open_training_bundle
    from tomtit.mqtt import MqttTransport
    from tomtit.transport import Will
    from tomtit.cli import CliError
    from tomtit.cli.mqtt_args import await_run_config
    from tomtit.wire import Presence, Topics, check_id, encode_presence

    creds = resolve_identity(args, roles=("device",), needs_parent=True)
    signer, keyring = signing_keys(creds)  # with credentials: sign updates, take only signed models
    setup_logging(args, args.id)
    log = logging.getLogger("tomtit.device")
    check_id(args.id, "--id")
    check_id(args.parent, "--parent")
    topics = Topics(args.job)
    # Everything that can fail on bad input fails here, before we touch the broker.
    bundle, backend = open_training_bundle(args.bundle, args.backend)
    m = bundle.manifest
    data = encode_for_bundle(args.data, bundle)  # classifier: text+label; causal LM: prompt/response or text
    emulated = _emulated_board(args, m.max_length)
    meter = emulated.meter if emulated else detect_meter(args.energy)
    trainer = make_trainer(bundle, TrainerConfig(threads=args.threads, learning_rate=args.lr, memory=args.memory), backend)
    if emulated:
        trainer = emulated.pace(trainer)
    if args.scheduler:
        make_scheduler(args.scheduler)  # a bad spec fails now, before the broker
    state_dir = args.state_dir or Path("state") / args.job / args.id
    will = Will(topics.status(args.id), encode_presence(Presence(id=args.id, state="offline", role="device",
                                                                  version=0, ts=0.0)))
    transport = MqttTransport(mqtt_options(args, client_id=f"tomtit-{args.job}-{args.id}"), will=will).start()
    if not transport.wait_connected(10):
        log.warning("broker %s not reachable yet (%s); training offline, updates wait in the outbox",
                    args.broker, transport.last_error or "no answer")
    stop = stop_event_on_signals()
    spec, codec = args.scheduler, args.codec or ("f16" if args.scheduler else None)
    if spec is None:  # without --scheduler, the run's settings come from the cloud
        run_config = await_run_config(transport, args.job, m.bundle_id, args.config_timeout, stop)
        if run_config is None:
            transport.close()
            raise CliError(f"no run configuration on {topics.run()} within {args.config_timeout:g} s: start the "
                           f"cloud node of job {args.job!r}, or give --scheduler (and --codec)")
        spec, codec = spec or run_config.device_scheduler, codec or run_config.up_codec
    if emulated:  # after the run configuration: the radio only slows what the device itself sends
        transport = emulated.radio(transport)
    scheduler = make_scheduler(spec)
    config = DeviceConfig(device_id=args.id, parent=args.parent, job=args.job, codec=codec,
                          resend_after_s=args.resend_after,
                          # an emulated link meters its own joules per MB: adding them again would count twice
                          link_joules_per_mb=0.0 if emulated else args.link_j_per_mb,
                          max_steps=args.max_steps, board=emulated.board.name if emulated else "",
                          link=emulated.link.name if emulated else "")
    log.info("device %s: %d examples, %s backend, meter %s%s, scheduler %s, parent %s", args.id, len(data),
             trainer.backend, meter.name, " (estimated)" if meter.estimated else "", scheduler.describe(), args.parent)
    if emulated:
        log.info("emulating %s (%.3f s/step, %g/%g W busy/idle) on %s (%g Mbit/s up, %g J/MB up), %gx slower than real",
                 emulated.board.name, emulated.step_s, emulated.board.busy_w, emulated.board.idle_w,
                 emulated.link.name, emulated.link.up_mbps, emulated.link.j_per_mb_up, emulated.slowdown)
    server = None if args.no_serve else _inference_server(args, transport, log)
    agent = DeviceAgent(config, manifest=m, trainer=trainer, batches=BatchStream(data, args.batch, seed=args.seed),
                        num_samples=len(data), meter=meter, scheduler=scheduler, transport=transport,
                        state_dir=state_dir, signer=signer, keyring=keyring, server=server)
    try:
        stats = agent.run(stop.is_set)
    finally:
        transport.close()
    log.info("stopped (%s): %d steps, %d syncs, %d acked, %d rejected, %d in outbox",
             stats.stop_reason, stats.steps, stats.syncs, agent.uplink.acked, agent.uplink.rejected, len(agent.outbox))
    if args.summary:
        summary = agent.summary()
        if emulated:
            summary.update(board_step_s=emulated.step_s, slowdown=emulated.slowdown, pace_misses=trainer.pace_misses,
                           link_bytes_up=transport.bytes_up, link_bytes_down=transport.bytes_down)
            if trainer.steps and trainer.pace_misses > trainer.steps // 10:
                log.warning("%d of %d steps took longer here than %.3f s (a %s's step x slowdown %g): this "
                            "machine is too loaded to emulate it faithfully; raise --slowdown", trainer.pace_misses,
                            trainer.steps, trainer.wall_step_s, emulated.board.name, emulated.slowdown)
        args.summary.write_text(json.dumps(summary, indent=2))
    return 0


def _inference_server(args: argparse.Namespace, transport, log):
    """The server for inference requests, or None (with a warning) when the bundle has no
    inference model: serving is on by default and must never keep a device from training.
    A causal-LM bundle answers with generated text (its prompts are the request's texts)."""
    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier
    from device_runtime.serving import InferenceServer, ServeConfig
    from tomtit.manifest import BundleError
    from tomtit.wire import Topics

    files = open_bundle(args.bundle, roles=(), verify=False).manifest
    causal = files.task == "causal-lm"
    # a causal LM generates with its KV-cache graph where the bundle has one; its frozen weights are
    # in the shared file the trainer verified
    roles = ("inference_model", "tokenizer") + (("generation_model",) if "generation_model" in files.files else ())
    try:
        bundle = open_bundle(args.bundle, roles=roles)
    except BundleError as e:
        log.warning("not serving inference requests: %s", e)
        return None
    log.info("serving %s requests on %s", "generation" if causal else "inference",
             Topics(args.job).infer_request(args.id))
    config = ServeConfig(device_id=args.id, job=args.job)
    if causal:
        from device_runtime.generation import Generator

        # one lean ORT session with one thread, created at the first request, like the classifier's
        return InferenceServer(config, transport=transport, load_generator=lambda: Generator(bundle, threads=1))
    # one lean ORT session with one thread, created at the first request (a device nobody asks pays
    # nothing; MiniLM-L6: ~120 MB once asked)
    return InferenceServer(config, transport=transport,
                           load_classifier=lambda: Classifier(bundle, threads=1, memory="lean"))


def _emulated_board(args: argparse.Namespace, max_length: int):
    """The EmulatedBoard for --board/--link, or None; bad names fail before the broker."""
    from tomtit.cli import CliError

    if args.board is None:
        if args.link is not None or args.reference_step is not None or args.slowdown is not None:
            raise CliError("--link, --reference-step and --slowdown emulate a board: give --board too")
        return None
    if args.energy != "auto":
        raise CliError(f"--board meters the emulated board's energy; --energy {args.energy} contradicts it")
    from device_runtime.emulation import REFERENCE_STEP_S, EmulatedBoard
    from tomtit.profiles import ProfileError, load_profiles, resolve_name

    profiles = load_profiles()
    try:
        board = profiles.boards[resolve_name(args.board, profiles.boards, "--board")]
        link = profiles.links[resolve_name(args.link or "ethernet", profiles.links, "--link")]
    except ProfileError as e:
        raise CliError(str(e)) from None
    ref = REFERENCE_STEP_S if args.reference_step is None else args.reference_step
    if not (0 < ref < 60):
        raise CliError(f"--reference-step must be a number of seconds in (0, 60), not {ref}")
    slowdown = 1.0 if args.slowdown is None else args.slowdown
    if not 1 <= slowdown <= 1000:
        raise CliError(f"--slowdown must be in [1, 1000], not {slowdown}")
    return EmulatedBoard.create(board, link, batch=args.batch, max_length=max_length, reference_step_s=ref,
                                slowdown=slowdown)
