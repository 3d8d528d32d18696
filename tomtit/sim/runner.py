"""`tomtit simulate`: every method on the same split, seeds and bundle, in one invocation.

Protocol (written into summary.json):
1. The target: `target_fraction` x the best held-out accuracy of centralised fine-tuning of the
   same adapter on the union of the devices' data (same batch, learning rate), computed once.
2. Tuning: each baseline runs its whole grid on the first seed; its best setting (reached the
   target, then shortest time, then least energy) runs the remaining seeds. Ours runs every seed
   with its one default. Medians over seeds are compared.
Runs go to a pool of worker processes (one per core by default); each worker opens the bundle
once and runs every simulated device on one shared ORT session.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tomtit.sim.config import Profiles, Scenario, load_profiles
from tomtit.sim.engine import Setting, World, run_setting
from tomtit.sim.methods import METHODS, grids

log = logging.getLogger("tomtit.sim")


# ---------------------------------------------------------------------------------------------
# The world a worker builds once


def build_world(bundle_path: str, data_spec: str, *, test_fraction: float, eval_examples: int) -> World:
    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier
    from device_runtime.local_data import encode_dataset
    from device_runtime.text import TextEncoder
    from device_runtime.trainer import PortableBackend, TrainerConfig, open_training_bundle
    from edge_broker.observers import Evaluator
    from tomtit.data import load_dataset

    bundle, _ = open_training_bundle(bundle_path, "portable")
    m = bundle.manifest
    ds = load_dataset(data_spec)
    data = encode_dataset(ds, TextEncoder(bundle.path("tokenizer"), m.max_length), m)
    # A held-out set fixed across seeds and scenarios (stratified, seed 0), so the centralised
    # reference and every run are scored on the same examples.
    rng = np.random.default_rng(0)
    test: list[int] = []
    for c in np.unique(data.labels):
        idx = np.flatnonzero(data.labels == c)
        rng.shuffle(idx)
        test.extend(idx[: int(round(len(idx) * test_fraction))].tolist())
    test_idx = np.array(sorted(test))
    train_idx = np.setdiff1d(np.arange(len(data)), test_idx)
    eval_idx = rng.permutation(test_idx)[:eval_examples]
    base = PortableBackend(bundle, TrainerConfig(threads=1, memory="fast"))
    clf = Classifier(open_bundle(bundle_path, roles=("inference_model", "tokenizer")), threads=1)
    evaluator = Evaluator(clf, data.input_ids[eval_idx], data.attention_mask[eval_idx], data.labels[eval_idx])
    return World(bundle=bundle, base_trainer=base, data=data, label_ids=data.labels, test_idx=test_idx,
                 train_idx=train_idx, evaluator=evaluator)


def device_shards(world: World, sc: Scenario, seed: int) -> list[np.ndarray]:
    from tomtit.data import dirichlet_split

    labels = [str(y) for y in world.label_ids[world.train_idx]]
    split = dirichlet_split(labels, devices=sc.devices, alpha=sc.alpha, seed=seed, test_fraction=0.0)
    return [world.train_idx[np.array(d, dtype=np.int64)] for d in split.device_indices]


def central_reference(world: World, sc: Scenario) -> dict[str, Any]:
    """Centralised fine-tuning of the same adapter on all devices' data: its best evaluation."""
    from device_runtime.local_data import BatchStream

    tr = world.trainer(sc.lr)
    stream = BatchStream(world.subset(world.train_idx), sc.batch, seed=0)
    curve = []
    for step in range(1, sc.central_steps + 1):
        tr.step(*stream.next())
        if step % 20 == 0 or step == sc.central_steps:
            curve.append((step, float(world.evaluator(tr.get_adapter())[0])))
    best = max(a for _, a in curve)
    return {"steps": sc.central_steps, "best_accuracy": best, "curve": curve}


# ---------------------------------------------------------------------------------------------
# Workers

_WORLD: World | None = None


def _init_worker(bundle: str, data: str, test_fraction: float, eval_examples: int, quiet: bool = True) -> None:
    global _WORLD
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if quiet:  # a spawned worker: rejections and the like are counted in each run's result; its
        # log lines would only interleave on the terminal (inline, the caller's logging stands)
        logging.getLogger("tomtit").addHandler(logging.NullHandler())
        logging.getLogger("tomtit").propagate = False
    _WORLD = build_world(bundle, data, test_fraction=test_fraction, eval_examples=eval_examples)


def _run_task(task: tuple) -> dict[str, Any]:
    sc, setting, seed, target, trace = task
    profiles = load_profiles()
    t0 = time.perf_counter()
    res = run_setting(_WORLD, sc, profiles, setting, seed, device_shards(_WORLD, sc, seed), target, trace=trace)
    res["scenario"] = sc.name
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    return res


class Pool:
    """Runs tasks on `workers` processes (spawned: ORT sessions do not survive fork), or inline.

    concurrent.futures rather than multiprocessing.Pool: a worker that dies or fails to start
    raises BrokenProcessPool here instead of being replaced for ever (a silent hang)."""

    def __init__(self, workers: int, init_args: tuple) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self._pool = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                             initargs=init_args)
        else:
            _init_worker(*init_args, quiet=False)

    def map(self, tasks: list[tuple], progress: Callable[[dict], None]) -> list[dict]:
        from concurrent.futures import as_completed

        out: list[dict | None] = [None] * len(tasks)
        if self._pool is None:
            for i, t in enumerate(tasks):
                out[i] = _run_task(t)
                progress(out[i])
            return out  # type: ignore[return-value]
        futures = {self._pool.submit(_run_task, t): i for i, t in enumerate(tasks)}
        for f in as_completed(futures):
            out[futures[f]] = f.result()
            progress(out[futures[f]])
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The comparison


def cached_central(bundle: str, data: str, sc: Scenario, compute: Callable[[], dict]) -> dict:
    """The centralised reference depends on the bundle, data and training knobs only: computed once
    and kept beside the bundle, so a run per scenario does not pay for it again."""
    import hashlib

    from tomtit.fsutil import atomic_write_bytes

    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    key = hashlib.sha256(json.dumps([manifest.get("bundle_id"), data, sc.test_fraction, sc.eval_examples,
                                     sc.batch, sc.lr, sc.central_steps]).encode()).hexdigest()[:16]
    path = Path(bundle) / f"central-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    central = compute()
    try:
        atomic_write_bytes(path, json.dumps(central).encode())
    except OSError:
        pass  # a read-only bundle: recompute next time
    return central


def _key(r: dict) -> tuple:
    """Best run first: reached the target (then less time, then less energy), else the higher
    best accuracy."""
    if r["reached"]:
        return (0, r["time_to_target_s"], r["device_energy_j"])
    return (1, -(r["best_accuracy"] or 0.0), r["device_energy_j"])


def _median(xs: list[float | None]) -> float | None:
    """Median over seeds, a seed that never reached the target counting as infinitely late (a
    censored value): 2 of 3 seeds reaching it give a median; fewer give None ("not reached")."""
    if not xs:
        return None
    med = statistics.median([float("inf") if x is None else x for x in xs])
    return float(med) if med != float("inf") else None


def simulate(scenarios: list[Scenario], *, bundle: str, data: str, out: Path, seeds: int, workers: int,
             methods: tuple[str, ...] = METHODS, trace: bool = True,
             progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    profiles = load_profiles()
    out.mkdir(parents=True, exist_ok=True)
    first = scenarios[0]
    for sc in scenarios[1:]:
        if (sc.test_fraction, sc.eval_examples, sc.batch, sc.lr, sc.central_steps) != (
                first.test_fraction, first.eval_examples, first.batch, first.lr, first.central_steps):
            from tomtit.sim.config import ScenarioError
            raise ScenarioError(f"scenarios {first.name!r} and {sc.name!r} differ in test_fraction/eval_examples/"
                                f"batch/lr/central_steps: run them separately (they need different references)")
    init = (bundle, data, first.test_fraction, first.eval_examples)
    t0 = time.perf_counter()
    pool = Pool(workers, init)
    try:
        def reference() -> dict:  # only when not cached: the parent then opens the bundle once more
            world = _WORLD if workers == 1 else build_world(bundle, data, test_fraction=first.test_fraction,
                                                            eval_examples=first.eval_examples)
            return central_reference(world, first)

        central = cached_central(bundle, data, first, reference)
        progress(f"centralised reference: best held-out accuracy {central['best_accuracy']:.4f} "
                 f"in {central['steps']} steps")
        seed_list = list(range(seeds))

        def report(r: dict) -> None:
            progress(f"  {r['scenario']:>12} seed {r['seed']} {r['setting']:<34} "
                     + (f"target at {r['time_to_target_s']:8.1f} s, {r['device_energy_j']:9.1f} J"
                        if r["reached"] else f"not reached ({r['stop_reason']}), best {r['best_accuracy']:.3f}")
                     + f"  [{r['real_steps']} steps, {r['wall_s']:.0f} s]")

        targets = {sc.name: round(sc.target_fraction * central["best_accuracy"], 4) for sc in scenarios}
        grid_of = {sc.name: grids(max(1, sc.devices // sc.edges), sc.edges) for sc in scenarios}
        # phase 1: every grid on the first seed, ours on every seed
        tasks = []
        for sc in scenarios:
            for m in methods:
                for s in grid_of[sc.name][m]:
                    for seed in (seed_list if m == "ours" else seed_list[:1]):
                        tasks.append((sc, s, seed, targets[sc.name], trace))
        progress(f"phase 1: {len(tasks)} runs (every grid setting on seed 0, ours on {seeds} seed(s))")
        runs = pool.map(tasks, report)
        # phase 2: each baseline's best setting on the remaining seeds
        best: dict[tuple[str, str], Setting] = {}
        for sc in scenarios:
            for m in methods:
                cands = [r for r in runs if r["scenario"] == sc.name and r["method"] == m and r["seed"] == 0]
                label = min(cands, key=_key)["setting"]
                best[(sc.name, m)] = next(s for s in grid_of[sc.name][m] if s.label == label)
        tasks = [(sc, best[(sc.name, m)], seed, targets[sc.name], trace)
                 for sc in scenarios for m in methods if m != "ours" for seed in seed_list[1:]]
        if tasks:
            progress(f"phase 2: {len(tasks)} runs (each baseline's best setting on the other seeds)")
            runs += pool.map(tasks, report)
    finally:
        pool.close()
    wall = time.perf_counter() - t0
    summary = {"bundle": bundle, "data": data, "seeds": seeds, "workers": workers, "wall_s": round(wall, 1),
               "central": central, "scenarios": {}}
    for sc in scenarios:
        summary["scenarios"][sc.name] = _scenario_summary(sc, profiles, [r for r in runs if r["scenario"] == sc.name],
                                                          best, grid_of[sc.name], targets[sc.name], central, methods)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=False))
    from tomtit.sim.report import write_reports

    write_reports(out, summary)
    return summary


def _scenario_summary(sc: Scenario, profiles: Profiles, runs: list[dict], best: dict, grid: dict, target: float,
                      central: dict, methods: tuple[str, ...]) -> dict[str, Any]:
    res: dict[str, Any] = {
        "scenario": asdict(sc),  # recursive: events become dicts too
        "devices": [{"id": f"d{i:02d}", "board": sc.board_of(i, profiles).name, "link": sc.link_of(i, profiles).name,
                     "edge": f"e{sc.edge_of(i)}"} for i in range(sc.devices)],
        "target": {"central_accuracy": central["best_accuracy"], "fraction": sc.target_fraction,
                   "target_accuracy": target},
        "protocol": "grid on seed 0 per baseline; best setting (reached, then time, then energy) on the other "
                    "seeds; ours: one default, every seed",
        "grid": {m: [s.label for s in grid[m]] for m in methods},
        "methods": {}, "ratios": {}, "runs": [],
    }
    for m in methods:
        label = best[(sc.name, m)].label
        mine = sorted((r for r in runs if r["method"] == m and r["setting"] == label), key=lambda r: r["seed"])
        per_seed = [{k: r[k] for k in ("seed", "reached", "time_to_target_s", "device_energy_j", "end_s",
                                       "final_accuracy", "best_accuracy", "syncs", "bytes", "global_versions",
                                       "real_steps", "stop_reason")} for r in mine]
        res["methods"][m] = {
            "best_setting": label, "per_seed": per_seed,
            "median": {"time_to_target_s": _median([r["time_to_target_s"] for r in mine]),
                       "device_energy_j": _median([r["device_energy_j"] if r["reached"] else None for r in mine]),
                       "bytes_device_up": _median([r["bytes"]["device_up"] for r in mine]),
                       "syncs": _median([r["syncs"] for r in mine]),
                       "final_accuracy": _median([r["final_accuracy"] for r in mine]),
                       "reached": sum(r["reached"] for r in mine), "seeds": len(mine)},
            "grid_seed0": [{"setting": r["setting"], "reached": r["reached"], "time_to_target_s": r["time_to_target_s"],
                            "device_energy_j": r["device_energy_j"], "best_accuracy": r["best_accuracy"]}
                           for r in runs if r["method"] == m and r["seed"] == 0],
        }
    ours = res["methods"].get("ours", {}).get("median", {})
    for m in methods:
        if m == "ours":
            continue
        theirs = res["methods"][m]["median"]
        res["ratios"][m] = {
            "time": _ratio(ours.get("time_to_target_s"), theirs["time_to_target_s"]),
            "energy": _ratio(ours.get("device_energy_j"), theirs["device_energy_j"]),
        }
    res["runs"] = runs
    return res


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None
