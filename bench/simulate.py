"""Is the simulator the bottleneck? Simulated steps/s against a bare loop of the same ORT steps,
and the memory a simulated device costs on the shared session.

    python bench/simulate.py [--bundle B] [--steps 600] [--devices 50]

1. bare: one PortableBackend, `--steps` steps on the same batches (batch 8), nothing else.
2. simulated: the `mixed` scenario, ours, until `--steps` real steps have run: every device's
   agent, scheduler, messages (encode, validate, decode), edges, aggregation and checkpoints,
   the virtual network. The cloud's evaluations are timed apart and reported both ways: they
   are extra ORT work (inference on the held-out set), not simulator overhead.
3. memory: resident set growth for `--devices` trainers sharing one session (each holds its
   adapter and two Adam moments as OrtValues), after one step each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="runs/simulate/bundle", help="a portable bundle (tomtit simulate exports one)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--devices", type=int, default=50)
    args = ap.parse_args()

    import dataclasses

    from device_runtime.local_data import BatchStream
    from tomtit.sim.config import load_profiles, load_scenario
    from tomtit.sim.engine import run_setting
    from tomtit.sim.methods import OURS
    from tomtit.sim.runner import build_world, device_shards

    profiles = load_profiles()
    sc = dataclasses.replace(load_scenario("mixed", profiles), max_device_steps=args.steps, target_fraction=1.0)
    world = build_world(args.bundle, "bbc-news", test_fraction=sc.test_fraction, eval_examples=sc.eval_examples)

    # 1. bare loop
    tr = world.trainer(sc.lr)
    stream = BatchStream(world.subset(world.train_idx), sc.batch, seed=0)
    batches = [stream.next() for _ in range(args.steps)]
    for b in batches[:5]:
        tr.step(*b)
    t0 = time.perf_counter()
    for b in batches:
        tr.step(*b)
    bare = args.steps / (time.perf_counter() - t0)

    # 2. the simulator (evaluations timed apart)
    spent = [0.0]
    real_eval = world.evaluator

    def timed_eval(adapter):
        t = time.perf_counter()
        out = real_eval(adapter)
        spent[0] += time.perf_counter() - t
        return out

    world.evaluator = timed_eval
    t0 = time.perf_counter()
    res = run_setting(world, sc, profiles, OURS, 0, device_shards(world, sc, 0), None)
    wall = time.perf_counter() - t0
    steps = res["real_steps"]
    sim_all = steps / wall
    sim_no_eval = steps / (wall - spent[0])

    # 3. memory per simulated device
    before = rss_mb()
    trainers = [world.trainer(sc.lr) for _ in range(args.devices)]
    for t in trainers:
        t.step(*batches[0])
    per_device = (rss_mb() - before) / args.devices
    adapter_mb = world.bundle.manifest.buffer_size * 4 / 2**20

    print(f"bare ORT loop:           {bare:6.2f} steps/s ({1000 / bare:.1f} ms/step, batch {sc.batch} x "
          f"{world.bundle.manifest.max_length} tokens, 1 thread)")
    print(f"simulator, all included: {sim_all:6.2f} steps/s -> {sim_all / bare:.2f} of bare "
          f"({steps} steps, {len(res['accuracy'])} evaluations taking {spent[0]:.1f} of {wall:.1f} s)")
    print(f"simulator, without evals:{sim_no_eval:6.2f} steps/s -> {sim_no_eval / bare:.2f} of bare")
    print(f"memory per simulated device: {per_device:.2f} MB (adapter {adapter_mb:.2f} MB: params + 2 Adam "
          f"moments = {3 * adapter_mb:.2f} MB), over {args.devices} devices on one session")
    return 0


if __name__ == "__main__":
    sys.exit(main())
