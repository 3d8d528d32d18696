"""`tomtit simulate`: the virtual-clock testbed (real training steps, virtual time and energy)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import logging


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", default="mixed",
                   help="a shipped scenario (mixed, skewed, costly-links, equal, churn, many, tiny), "
                        "several comma-separated, 'all' (every shipped one but tiny), or a .toml file")
    p.add_argument("--seeds", type=int, help="seeds per method (default: the scenario's, 3)")
    p.add_argument("--alpha", type=float, help="override: Dirichlet label skew")
    p.add_argument("--devices", type=int, help="override: number of devices")
    p.add_argument("--edges", type=int, help="override: number of edges")
    p.add_argument("--profiles", help="override: board mix, e.g. pi4:4,pi5:2,orin-nano:1")
    p.add_argument("--links", help="override: link mix, e.g. wifi:3,nb-iot:1")
    p.add_argument("--target-fraction", type=float, help="override: target = this x centralised accuracy")
    p.add_argument("--max-device-steps", type=int, help="override: compute cap per run (real steps)")
    p.add_argument("--model", default="minilm-l6", help="bundle folder, or a model to export (minilm-l6 | PATH)")
    p.add_argument("--data", default="bbc-news", help="bbc-news | PATH.jsonl | PATH.csv")
    p.add_argument("--max-len", type=int, default=32, help="tokens per text when exporting the bundle")
    p.add_argument("--methods", default="fedavg,hierfavg,adaptive,async-fixed,ours",
                   help="comma-separated subset of fedavg,hierfavg,adaptive,async-fixed,ours")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (one per core)")
    p.add_argument("--out", type=Path, default=Path("runs/simulate"),
                   help="output folder: summary.json, report.md, one folder of plots per scenario")
    p.add_argument("--json", action="store_true", help="print the summary's ratios as JSON on stdout")
    p.add_argument("--verbose", "-v", action="store_true")


def _bundle(args: argparse.Namespace) -> str:
    """A bundle folder as given, or one exported (portable step) into the output folder."""
    path = Path(args.model)
    if (path / "manifest.json").is_file():
        return str(path)
    out = args.out / "bundle"
    source = {"model": args.model, "data": args.data, "max_len": args.max_len}
    marker = args.out / "bundle-source.json"
    if (out / "manifest.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == source:
        return str(out)  # exported by an earlier run with the same model, data and length
    from export.bundle_builder import ExportConfig, export_bundle
    from tomtit.cli import CliError

    if args.model != "minilm-l6" and not path.is_dir():
        raise CliError(f"--model {args.model}: neither a bundle folder nor a model folder (or minilm-l6)")
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"exporting {args.model} (max {args.max_len} tokens) to {out} ...", file=sys.stderr)
    export_bundle(ExportConfig(model=args.model, data=args.data, out=out, max_length=args.max_len,
                               backend="portable", force=True), log=lambda *a: None)
    marker.write_text(json.dumps(source))
    return str(out)


def run(args: argparse.Namespace) -> int:
    from tomtit.cli import CliError
    from tomtit.sim.config import load_profiles, load_scenario, shipped_scenarios
    from tomtit.sim.methods import METHODS
    from tomtit.sim.runner import simulate

    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    profiles = load_profiles()
    names = [s.strip() for s in args.scenario.split(",") if s.strip()]
    if not names:
        raise CliError(f"--scenario {args.scenario!r} names no scenario")
    if names == ["all"]:
        names = [n for n in shipped_scenarios() if n != "tiny"]
    overrides = dict(alpha=args.alpha, devices=args.devices, edges=args.edges, boards=args.profiles,
                     links=args.links, target_fraction=args.target_fraction, max_device_steps=args.max_device_steps)
    scenarios = [load_scenario(n, profiles, **overrides) for n in names]
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CliError(f"--methods: unknown {bad[0] if bad else '(empty)'!r}; choose from {', '.join(METHODS)}")
    if args.seeds is not None and args.seeds < 1:
        raise CliError("--seeds must be >= 1")
    if args.workers < 1:
        raise CliError("--workers must be >= 1")
    seeds = args.seeds or scenarios[0].seeds
    bundle = _bundle(args)
    summary = simulate(scenarios, bundle=bundle, data=args.data, out=args.out, seeds=seeds, workers=args.workers,
                       methods=methods, progress=lambda s: print(s, file=sys.stderr, flush=True))
    ratios = {n: s["ratios"] for n, s in summary["scenarios"].items()}
    if args.json:
        print(json.dumps({"out": str(args.out), "ratios": ratios, "wall_s": summary["wall_s"]}, indent=1))
    else:
        print(f"wrote {args.out}/summary.json, report.md and plots ({summary['wall_s']:.0f} s)")
        for n, r in ratios.items():
            print(f"  {n}: ours / best baseline -> " + ", ".join(
                f"{m}: time {v['time']}, energy {v['energy']}" for m, v in r.items()))
    return 0
