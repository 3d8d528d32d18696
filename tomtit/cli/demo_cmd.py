"""`tomtit demo`: the whole system on one machine, each tier its own process.

export (once) -> non-IID split -> broker (embedded amqtt by default) -> cloud -> edges -> devices
(each an emulated board on an emulated link: `--profiles`, `--links`) -> live view until the cloud
reaches the target accuracy or its time limit -> summary, report (plots), the final adapter in
PEFT format, and a few held-out texts classified on the device runtime with it.
Every process is the same `tomtit` command a field deployment runs; logs go to OUT/logs/.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm-l6", help="minilm-l6 | PATH to a BERT-family folder")
    p.add_argument("--data", default="bbc-news")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew over devices")
    p.add_argument("--max-len", type=int, default=32,
                   help="tokens per text (32 keeps 4 devices + 2 edges + cloud responsive on 2 cores)")
    p.add_argument("--broker", default="embedded", help="embedded | mosquitto | mqtt://HOST:PORT (your own)")
    p.add_argument("--topology", choices=["single", "field"], default="single",
                   help="single: one broker for all; field: a secured deployment from `tomtit deploy init` "
                        "(TLS, passwords, ACLs, signed messages), one Mosquitto per edge bridged to the "
                        "cloud's, devices talking only to their edge's broker")
    p.add_argument("--port", type=int, default=0, help="port for the broker we start (0: a free one)")
    p.add_argument("--scheduler", default="marginal:tau_min=5,tau_max=30", help="device sync scheduler")
    p.add_argument("--edge-scheduler", default="marginal:tau_min=2,tau_max=6")
    p.add_argument("--strategy", default="fedbuff")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--target-accuracy", type=float, default=0.9)
    p.add_argument("--max-minutes", type=float, default=15)
    p.add_argument("--job", default="demo")
    p.add_argument("--json", action="store_true", help="print only the final summary, as JSON, on stdout "
                                                       "(progress goes to stderr)")
    p.add_argument("--profiles", default="pi4:2,pi5:1,orin-nano:1",
                   help="boards the devices emulate, a pattern dealt in order (tomtit/profiles.toml: pi4, pi5, "
                        "jetson-nano, orin-nano, x86-minipc; a unique prefix will do); 'none': no emulation, "
                        "every device this machine as it is")
    p.add_argument("--links", default="wifi,lte-m,wifi,ethernet",
                   help="links the devices emulate, likewise (ethernet, wifi, lte-m, nb-iot)")
    p.add_argument("--slowdown", type=float, default=3.0,
                   help="emulated boards run this many times slower than real: 4 devices and 3 nodes share this "
                        "machine, where a step takes ~0.3 s on 2 cores, slower than a Pi 5 or an Orin; energy is "
                        "still booked in board time (each device's pace_misses says if it was not enough)")
    p.add_argument("--plain", action="store_true", help="plain progress lines instead of the live dashboard")


def _tomtit(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "tomtit", *args], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(procs: dict[str, subprocess.Popen], timeout: float = 20, sig: int = signal.SIGTERM) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + timeout
    for p in procs.values():
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def run(args: argparse.Namespace) -> int:
    from edge_broker.brokers import free_port, wait_for_port
    from tomtit.cli import CliError

    if args.devices < 1 or args.edges < 1 or args.devices < args.edges:
        raise CliError("need --devices >= --edges >= 1")
    emulation = _emulation_plan(args)  # bad profile names fail before anything starts
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    bundle, split = out / "bundle", out / "split"
    # --json: stdout carries only the summary (a script can parse it); progress goes to stderr
    say = functools.partial(print, file=sys.stderr if args.json else sys.stdout, flush=True)

    if not (bundle / "manifest.json").is_file():
        say(f"[1/4] exporting {args.model} + LoRA for {args.data} -> {bundle}")
        from export.bundle_builder import ExportConfig, export_bundle

        export_bundle(ExportConfig(model=args.model, data=args.data, out=bundle, max_length=args.max_len, force=True),
                      log=lambda m: say("      " + m))
    else:
        say(f"[1/4] reusing bundle {bundle}")
    if not (split / "test.jsonl").is_file():
        from tomtit.cli import main as tomtit_main

        say(f"[2/4] splitting {args.data} over {args.devices} devices (Dirichlet alpha={args.alpha})")
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):  # its per-file lines
            rc = tomtit_main(["data", "split", "--data", args.data, "--devices", str(args.devices), "--alpha",
                              str(args.alpha), "--seed", "0", "--test-fraction", "0.2", "--out", str(split),
                              "--force"])
        if rc:
            return rc
    else:
        say(f"[2/4] reusing split {split}")

    procs: dict[str, subprocess.Popen] = {}
    broker_procs: dict[str, subprocess.Popen] = {}
    mosquitto = None
    creds: dict[str, Path] = {}
    if args.topology == "field":
        url = _field_brokers(out, args, broker_procs, creds, logs, say)
    elif args.broker.startswith("mqtt"):
        url = args.broker
    else:
        port = args.port or free_port()
        url = f"mqtt://127.0.0.1:{port}"
        if args.broker == "mosquitto":
            from edge_broker.brokers import MosquittoConfig, MosquittoProcess

            mosquitto = MosquittoProcess(MosquittoConfig(port=port), workdir=out / "mosquitto")
            (out / "mosquitto").mkdir(exist_ok=True)
            mosquitto.start()
        elif args.broker == "embedded":
            broker_procs["broker"] = _tomtit(["broker", "run", "--port", str(port)], logs / "broker.log")
            if not wait_for_port("127.0.0.1", port, 20):
                _stop(broker_procs)
                raise CliError(f"the embedded broker did not start; see {logs / 'broker.log'}")
        else:
            raise CliError("--broker must be embedded, mosquitto or mqtt://HOST:PORT")
    if args.topology != "field":
        say(f"[3/4] broker {url} ({args.broker}); logs in {logs}")
    state = out / "state" / f"{args.job}-{int(time.time())}"
    per_edge = -(-args.devices // args.edges)

    def common(ident: str) -> list[str]:
        if creds:  # broker, login, CA, --id/--parent/--job and signing keys from the credential file
            return ["--bundle", str(bundle), "--credentials", str(creds[ident])]
        return ["--bundle", str(bundle), "--broker", url, "--job", args.job]

    # The cloud publishes the run's configuration (schedulers, K, codec); edges and devices take it.
    procs["cloud"] = _tomtit(["node", "run", "--id", "cloud", *common("cloud"), "--strategy", args.strategy,
                              "--k", "2", "--children", str(args.edges), "--device-scheduler", args.scheduler, "--edge-scheduler", args.edge_scheduler,
                              "--eval-data", str(split / "test.jsonl"),
                              "--target-accuracy", str(args.target_accuracy), "--max-minutes", str(args.max_minutes),
                              "--state-dir", str(state / "cloud"), "--summary", str(out / "cloud.json"),
                              "--save-model", str(out / "final-adapter.safetensors")],
                             logs / "cloud.log")
    for e in range(args.edges):
        procs[f"edge{e}"] = _tomtit(["node", "run", "--id", f"edge{e}", "--parent", "cloud", *common(f"edge{e}"),
                                     "--strategy", args.strategy, "--children", str(per_edge), "--max-wait", "30",
                                     "--state-dir", str(state / f"edge{e}"),
                                     "--summary", str(out / f"edge{e}.json")], logs / f"edge{e}.log")
    width = max(2, len(str(args.devices - 1)))
    for d in range(args.devices):
        name = f"dev{d:0{width}d}"
        procs[name] = _tomtit(["device", "run", "--id", name, "--parent", f"edge{d // per_edge}", *common(name),
                               "--data", str(split / f"device-{d:0{width}d}.jsonl"),
                               "--lr", str(args.lr), "--state-dir", str(state / name), *emulation[d],
                               "--summary", str(out / f"{name}.json")], logs / f"{name}.log")
    say(f"[4/4] running cloud + {args.edges} edges + {args.devices} devices "
        f"(target accuracy {args.target_accuracy}, at most {args.max_minutes} min); Ctrl-C stops everything")
    t0 = time.monotonic()
    shown = 0
    # field topology: the deployment's read-only monitor identity (its ACL: status/+ and telemetry/+ only)
    monitor = _start_monitor(args, ["--credentials", str(creds["monitor"])] if creds else ["--broker", url, "--job", args.job])
    quiet = (lambda *a, **k: None) if monitor else say  # the dashboard owns the terminal while it runs
    try:
        while procs["cloud"].poll() is None:
            time.sleep(2)
            shown = _show_progress(logs / "cloud.log", shown, t0, quiet)
            dead = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            if dead:
                say(f"process(es) {', '.join(dead)} failed; see {logs}")
                break
        _show_progress(logs / "cloud.log", shown, t0, quiet)
        deadline = time.monotonic() + 60  # "finished" propagates: edges then devices stop by themselves
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("interrupted: stopping every process")
    finally:
        if monitor is not None:
            _stop({"monitor": monitor}, timeout=5, sig=signal.SIGINT)
        _stop(procs)
        _stop(broker_procs)
        if mosquitto is not None:
            mosquitto.stop()
    rc = _report(out, args, say)
    if rc == 0:
        _finale(out, bundle, split, args, say)
    return rc


def _start_monitor(args: argparse.Namespace, connection: list[str]) -> subprocess.Popen | None:
    """`tomtit monitor` on this terminal while the run lasts (None: plain progress lines instead,
    when stdout is not a terminal, with --plain or --json, or without rich)."""
    import importlib.util

    if args.json or args.plain or not sys.stdout.isatty() or importlib.util.find_spec("rich") is None:
        return None
    # Not in a new session: it shares our terminal, and Ctrl-C reaches it as it reaches us.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "tomtit", "monitor", *connection], env=env)


def _emulation_plan(args: argparse.Namespace) -> list[list[str]]:
    """Per device, the `device run` flags of its emulated board and link ([] without emulation)."""
    from tomtit.cli import CliError
    from tomtit.profiles import ProfileError, load_profiles, parse_mix

    if args.profiles.strip().lower() == "none":
        return [[] for _ in range(args.devices)]
    profiles = load_profiles()
    try:
        boards = parse_mix(args.profiles, profiles.boards, "--profiles")
        links = parse_mix(args.links, profiles.links, "--links")
    except ProfileError as e:
        raise CliError(str(e)) from None
    if not 1 <= args.slowdown <= 1000:
        raise CliError(f"--slowdown must be in [1, 1000], not {args.slowdown}")
    return [["--board", boards[d % len(boards)], "--link", links[d % len(links)], "--slowdown", str(args.slowdown)]
            for d in range(args.devices)]


def _field_brokers(out: Path, args: argparse.Namespace, broker_procs: dict, creds: dict, logs: Path, say) -> str:
    """A field deployment on this machine: `deploy init` with one Mosquitto per edge bridged to the
    cloud's (all on loopback), the brokers started; fills `creds` (id -> credential file)."""
    from edge_broker.brokers import BrokerError, find_mosquitto, free_port, wait_for_port
    from tomtit.cli import CliError
    from tomtit.deploy.init import init_deployment
    from tomtit.deploy.topology import load_topology

    try:
        binary = find_mosquitto()
    except BrokerError as e:
        raise CliError(f"--topology field runs Mosquitto: {e}") from None
    per_edge = -(-args.devices // args.edges)
    width = max(2, len(str(args.devices - 1)))
    ports = {"cloud": free_port(), **{f"edge{e}": free_port() for e in range(args.edges)}}
    lines = [f'job = "{args.job}"', "[cloud]", 'host = "127.0.0.1"', f"port = {ports['cloud']}"]
    for e in range(args.edges):
        devs = [f"dev{d:0{width}d}" for d in range(args.devices) if d // per_edge == e]
        lines += ["", "[[edges]]", f'id = "edge{e}"', f"devices = {json.dumps(devs)}", 'host = "127.0.0.1"',
                  f"port = {ports[f'edge{e}']}"]
    topo_file = out / "topology.toml"
    topo_file.write_text("\n".join(lines) + "\n")
    dep_dir = out / "deployment"
    dep = init_deployment(load_topology(topo_file), dep_dir, force=True)
    creds.update(dep.credentials)
    for b in dep.brokers:
        broker_procs[f"broker-{b.name}"] = subprocess.Popen([binary, "-c", str(b.conf)],
                                                            stdout=(logs / f"broker-{b.name}.log").open("ab"),
                                                            stderr=subprocess.STDOUT, start_new_session=True)
    for name, port in ports.items():
        if not wait_for_port("127.0.0.1", port, 20):
            _stop(broker_procs)
            raise CliError(f"Mosquitto for {name} did not start; see {logs / f'broker-{name}.log'}")
    say(f"[3/4] field topology: {len(dep.brokers)} Mosquitto brokers (TLS, passwords, ACLs; each edge's "
        f"bridged to the cloud's), signed messages; deployment in {dep_dir}; logs in {logs}")
    return f"mqtts://127.0.0.1:{ports['cloud']}"


def _show_progress(cloud_log: Path, shown: int, t0: float, say) -> int:
    lines = [line for line in cloud_log.read_text(errors="replace").splitlines() if "held-out accuracy" in line]
    for line in lines[shown:]:
        say(f"      {time.monotonic() - t0:6.0f}s  cloud {line.split(' INFO ', 1)[-1]}")
    return len(lines)


def _report(out: Path, args: argparse.Namespace, say) -> int:
    cloud_file = out / "cloud.json"
    if not cloud_file.is_file():
        say(f"no cloud summary: see {out / 'logs' / 'cloud.log'}")
        return 1
    cloud = json.loads(cloud_file.read_text())
    summary = {"cloud": {k: cloud[k] for k in ("stop_reason", "final_version", "updates_accepted",
                                              "updates_rejected", "duplicates", "bytes_in", "seconds")}}
    acc = cloud["accuracy"]
    summary["cloud"]["accuracy_start"] = acc[0]["accuracy"] if acc else None
    summary["cloud"]["accuracy_best"] = max((a["accuracy"] for a in acc), default=None)
    summary["edges"] = {}
    for f in sorted(out.glob("edge*.json")):
        e = json.loads(f.read_text())
        summary["edges"][e["node"]] = {"pushes_up": e["pushes_up"], "push_times_s": e["push_times"][:20],
                                       "aggregations": e["aggregations"]}
    summary["devices"] = {}
    for f in sorted(out.glob("dev*.json")):
        d = json.loads(f.read_text())
        iv, times = d["intervals"], d.get("sync_times", [])
        gaps = [b - a for a, b in zip(times, times[1:])]
        summary["devices"][d["id"]] = {
            "board": d.get("board") or None, "link": d.get("link") or None,
            "energy_kind": d.get("energy_kind", "estimated" if d["energy_estimated"] else "measured"),
            "steps": d["steps"], "syncs": d["syncs"], "joules": round(d["joules"], 1),
            "energy_estimated": d["energy_estimated"],
            "mean_interval": round(sum(iv) / len(iv), 1) if iv else None,  # steps per sync cycle
            "mean_interval_s": round(sum(gaps) / len(gaps), 1) if gaps else None,  # wall seconds between syncs
            "pace_misses": d.get("pace_misses")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        return 0  # printed after the finale, which adds the report and the adapter's paths
    c = summary["cloud"]
    say(f"\ncloud: {c['stop_reason']}; accuracy {c['accuracy_start']:.3f} (untrained head) -> "
        f"{c['accuracy_best']:.3f} in {c['seconds']:.0f} s, {c['final_version']} global versions, "
        f"{c['updates_accepted']} edge updates")
    for name, e in summary["edges"].items():
        say(f"{name}: pushed upward {e['pushes_up']} times, at {e['push_times_s'][:8]} s ...")
    for name, d in summary["devices"].items():
        who = f"{d['board']} on {d['link']}" if d["board"] else "this machine"
        secs = f", every {d['mean_interval_s']} s" if d["mean_interval_s"] is not None else ""
        say(f"{name} ({who}): {d['steps']} steps, {d['syncs']} syncs (mean interval {d['mean_interval']} steps"
            f"{secs}, chosen by its own scheduler), {d['joules']} J {d['energy_kind']}")
    say(f"summary -> {out / 'summary.json'}")
    return 0


def _finale(out: Path, bundle: Path, split: Path, args: argparse.Namespace, say) -> None:
    """The report, the final adapter as a PEFT folder, and a few held-out texts classified with it
    on the device runtime (its own process: what a board runs, no torch)."""
    from tomtit.cli import CliError

    summary = json.loads((out / "summary.json").read_text())
    try:
        from tomtit.run_report import write_run_report

        html = write_run_report(out)
        summary["report"] = str(html)
        say(f"report -> {html} (plots and report.md next to it)")
    except (CliError, OSError, ImportError) as e:
        say(f"no report: {e}")
    adapter = out / "final-adapter.safetensors"
    if adapter.is_file():
        summary["final_adapter"] = str(adapter)
        try:
            from export.peft_io import export_peft

            summary["peft_adapter"] = str(export_peft(bundle, out / "final-adapter-peft", adapter=adapter, force=True))
            say(f"final adapter -> {adapter}; as a Hugging Face PEFT folder -> {summary['peft_adapter']}")
        except Exception as e:  # noqa: BLE001 - the run's results stand without the PEFT copy; say why
            say(f"final adapter -> {adapter} (PEFT export failed: {e})")
        summary["inference"] = _classify_held_out(bundle, adapter, split / "test.jsonl", say)
    else:
        say(f"no final adapter (the cloud did not write {adapter}); see {out / 'logs' / 'cloud.log'}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))


def _classify_held_out(bundle: Path, adapter: Path, test_file: Path, say, per_label: int = 1) -> list[dict]:
    """`tomtit infer` with the final adapter on one held-out text per label, printed as a table."""
    from tomtit.data import load_dataset

    data = load_dataset(str(test_file))
    examples, seen = [], set()
    for text, label in zip(data.texts, data.labels):
        if label not in seen:
            seen.add(label)
            examples.append((text, label))
    examples = examples[:6]
    r = subprocess.run([sys.executable, "-m", "tomtit", "infer", "--bundle", str(bundle), "--adapter", str(adapter),
                        "--json", *[text for text, _ in examples]], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    if r.returncode != 0:
        say(f"on-device inference failed: {r.stderr.strip()[-500:]}")
        return []
    rows = []
    say("\non-device inference with the final adapter (device_runtime only), held-out texts:")
    say(f"  {'true':>14}  {'predicted':>14}  {'p':>4}  text")
    for (text, label), p in zip(examples, json.loads(r.stdout)):
        prob = p["probabilities"][p["label"]]
        mark = " " if p["label"] == label else "x"  # x: a wrong answer, shown as such
        say(f"{mark} {label:>14}  {p['label']:>14}  {prob:4.2f}  {' '.join(text.split())[:60]}")
        rows.append({"text": text[:200], "label": label, "predicted": p["label"], "probability": round(prob, 4)})
    return rows
