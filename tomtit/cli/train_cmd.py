"""`tomtit train`: local fine-tuning on the device (no torch)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--data", required=True, help="a JSONL/CSV file with text and label (causal-LM bundle: JSONL with "
                                                  "prompt/response or text)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory", choices=["lean", "fast"], default="lean",
                   help="ORT session profile: lean (default; ~0.4x PyTorch's peak RSS, ~5% slower steps) or "
                        "fast (ORT's defaults: weight pre-packing, constant folding, memory pattern)")
    p.add_argument("--backend", default="auto", help="auto | ort-training | portable (plain onnxruntime)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", type=Path, help="start from this adapter (safetensors) instead of the bundle's")
    p.add_argument("--save-adapter", type=Path, help="write the trained adapter (safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from device_runtime.adapter import load_adapter, save_adapter
    from device_runtime.local_data import BatchStream, encode_for_bundle
    from device_runtime.trainer import TrainerConfig, make_trainer, open_training_bundle
    from tomtit.cli import CliError

    if args.steps < 1 or args.batch < 1 or args.threads < 1:
        raise CliError("--steps, --batch and --threads must be >= 1")
    if args.save_adapter and not args.save_adapter.parent.is_dir():
        raise CliError(f"folder of --save-adapter ({args.save_adapter.parent}) does not exist")
    bundle, backend = open_training_bundle(args.bundle, args.backend)
    m = bundle.manifest
    data = encode_for_bundle(args.data, bundle)  # classifier: text+label; causal LM: prompt/response or text
    trainer = make_trainer(bundle, TrainerConfig(threads=args.threads, learning_rate=args.lr, memory=args.memory), backend)
    if args.adapter:
        trainer.set_adapter(load_adapter(args.adapter, m))
    stream = BatchStream(data, args.batch, seed=args.seed)
    losses: list[float] = []
    say = (lambda *_: None) if args.json else print
    say(f"bundle {m.bundle_id} ({m.base_model}), {len(data)} examples, backend {trainer.backend}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, mask, y = stream.next()
        losses.append(trainer.step(ids, mask, y))
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            say(f"step {step:5d}  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - t0
    if args.save_adapter:
        save_adapter(args.save_adapter, trainer.get_adapter(), m, steps=str(args.steps))
    k = max(1, min(10, len(losses) // 4))  # mean of first/last few steps: single minibatch losses are noisy
    result = {
        "bundle_id": m.bundle_id,
        "backend": trainer.backend,
        "steps": args.steps,
        "batch": args.batch,
        "examples": len(data),
        "epochs": stream.epoch,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first_mean": sum(losses[:k]) / k,
        "loss_last_mean": sum(losses[-k:]) / k,
        "ms_per_step": 1000 * seconds / args.steps,
        "samples_per_s": args.steps * args.batch / seconds,
        "threads": args.threads,
        "adapter": str(args.save_adapter) if args.save_adapter else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"loss {result['loss_first_mean']:.4f} -> {result['loss_last_mean']:.4f} (mean of {k} steps), "
            f"{result['ms_per_step']:.1f} ms/step, {result['samples_per_s']:.1f} samples/s"
        )
        if args.save_adapter:
            print(f"adapter -> {args.save_adapter}")
    return 0
