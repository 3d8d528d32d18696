"""`tomtit infer`: classify texts on the device (plain ONNX Runtime, no torch)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--adapter", type=Path, help="adapter safetensors (default: the bundle's initial adapter)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("texts", nargs="+", metavar="TEXT")


def run(args: argparse.Namespace) -> int:
    from device_runtime.adapter import load_adapter
    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier

    bundle = open_bundle(args.bundle, roles=("inference_model", "tokenizer", "initial_adapter"))
    adapter = load_adapter(args.adapter or bundle.path("initial_adapter"), bundle.manifest)
    preds = Classifier(bundle, threads=args.threads).predict(args.texts, adapter)
    if args.json:
        print(json.dumps([{"text": p.text, "label": p.label, "probabilities": p.probabilities} for p in preds]))
    else:
        for p in preds:
            top = sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:3]
            print(f"{p.label:>15}  ({', '.join(f'{k} {v:.2f}' for k, v in top)})  {p.text[:70]}")
    return 0
