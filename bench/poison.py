"""What one poisoning device does to a federation, and what norm bounds and robust aggregation do.

    python bench/poison.py --bundle runs/evaluation/bundle [--scenario mixed] [--seeds 1] [--json OUT]
    python bench/poison.py --cases "fedbuff/none,trimmed/flip,fedbuff+clip2/scale:30"

A poisoned device has valid credentials and sends well-formed messages; only its update is hostile:
from t = 0 it sends factor x its true update ("flip": -1 x, "scale:F": F x) on every sync, while its
own bookkeeping stays honest (tomtit/sim/engine.py, `_poison`). Each case runs *ours* in the real
simulator (device agents, edges and cloud are the real node core) with the edges aggregating their
devices' updates by STRATEGY, optionally with every update's L2 norm clipped to C before combining
("+clipC"); every node keeps its default absolute bound (`max_update_norm` 100: larger deltas are
refused with reason `norm`). A run stops at the scenario's target (0.95 x centralised accuracy) or
after `--max-device-steps` real training steps.

Case syntax: STRATEGY[+clipC]/ATTACK, where STRATEGY is fedbuff | fednova | median | trimmed and
ATTACK is none | flip | scale:F. The defaults are the study in README "Deploying to the field".
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CASES = ("fedbuff/none,fedbuff/flip,fedbuff/scale:30,fedbuff/scale:1000,"
                 "fedbuff+clip2/none,fedbuff+clip2/flip,fedbuff+clip2/scale:30,"
                 "trimmed/none,trimmed/flip,trimmed/scale:30,"
                 "median/none,median/flip,median/scale:30")


@dataclasses.dataclass(frozen=True)
class Case:
    strategy: str  # the edges' aggregation of device updates
    clip_norm: float | None  # each update's L2 norm clipped to this before combining (None: off)
    attack: str  # "none" | "flip" | "scale:F"

    @property
    def label(self) -> str:
        clip = f"+clip{self.clip_norm:g}" if self.clip_norm is not None else ""
        return f"{self.strategy}{clip}/{self.attack}"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def parse_case(text: str) -> Case:
    strategy, sep, attack = text.strip().partition("/")
    if not sep or not attack:
        raise SystemExit(f"--cases: {text!r} is not STRATEGY[+clipC]/ATTACK")
    strategy, _, clip = strategy.partition("+")
    clip_norm = None
    if clip:
        try:
            if not clip.startswith("clip"):
                raise ValueError
            clip_norm = float(clip[len("clip"):])
        except ValueError:
            raise SystemExit(f"--cases: {text!r}: write the clip as +clipC, e.g. +clip2") from None
    return Case(strategy, clip_norm, attack)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="runs/evaluation/bundle", help="a portable bundle (tomtit simulate exports one)")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--scenario", default="mixed")
    ap.add_argument("--device", default="d00", help="the poisoned device")
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--max-device-steps", type=int, default=1500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write every run's result here")
    args = ap.parse_args()

    from tomtit.sim.config import Event, load_profiles, load_scenario
    from tomtit.sim.methods import OURS
    from tomtit.sim.runner import Pool, cached_central, build_world, central_reference

    profiles = load_profiles()
    cases = [parse_case(c) for c in args.cases.split(",") if c.strip()]
    base = dataclasses.replace(load_scenario(args.scenario, profiles), max_device_steps=args.max_device_steps)
    scenarios = []
    for c in cases:  # check every case before the first run, so a typo costs nothing
        events = () if c.attack == "none" else (Event(t=0.0, kind="poison", device=args.device, value=c.attack),)
        scenarios.append(dataclasses.replace(base, name=c.label, strategy=c.strategy, clip_norm=c.clip_norm,
                                             events=base.events + events).check(profiles))

    def reference() -> dict:
        world = build_world(args.bundle, args.data, test_fraction=base.test_fraction, eval_examples=base.eval_examples)
        return central_reference(world, base)

    central = cached_central(args.bundle, args.data, base, reference)
    target = round(base.target_fraction * central["best_accuracy"], 4)
    print(f"target {target} (0.95 x centralised {central['best_accuracy']:.4f}); poisoned: {args.device} of "
          f"{base.devices}; {len(cases)} cases x {args.seeds} seed(s)", file=sys.stderr)
    tasks = [(sc, OURS, seed, target, False) for sc in scenarios for seed in range(args.seeds)]
    pool = Pool(args.workers, (args.bundle, args.data, base.test_fraction, base.eval_examples))
    t0 = time.perf_counter()
    try:
        runs = pool.map(tasks, lambda r: print(f"  {r['scenario']:<26} seed {r['seed']}: "
                                               + (f"target at {r['time_to_target_s']:.1f} s" if r["reached"]
                                                  else f"not reached, best {_acc(r['best_accuracy'])}")
                                               + f" [{r['wall_s']:.0f} s]", file=sys.stderr, flush=True))
    finally:
        pool.close()

    rows = []
    for (sc, _, seed, _, _), r in zip(tasks, runs):
        poisoned = next(d for d in r["devices"] if d["id"] == args.device)
        rejected = dict(sum((collections.Counter(per_node) for per_node in r["rejected"].values()),
                            collections.Counter()))
        rows.append({"case": sc.name, "seed": seed, "reached": r["reached"], "time_to_target_s": r["time_to_target_s"],
                     "best_accuracy": r["best_accuracy"], "final_accuracy": r["final_accuracy"],
                     "poisoned_syncs": poisoned["syncs"], "rejected": rejected, "real_steps": r["real_steps"],
                     "end_s": r["end_s"], "wall_s": r["wall_s"]})
    print(f"| case | seed | time to target {target}, s | best accuracy | final accuracy | {args.device}'s updates "
          f"| refused at the nodes (reason: count) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ttt = f"{row['time_to_target_s']:.1f}" if row["reached"] else f"not reached in {row['end_s']:.0f} s"
        refused = ", ".join(f"{k}: {v}" for k, v in sorted(row["rejected"].items())) or "none"
        print(f"| {row['case']} | {row['seed']} | {ttt} | {_acc(row['best_accuracy'])} | {_acc(row['final_accuracy'])} "
              f"| {row['poisoned_syncs']} | {refused} |")
    print(f"({time.perf_counter() - t0:.0f} s wall, {args.workers} workers)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"target": target, "scenario": args.scenario, "device": args.device,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
