"""`tomtit export`: workstation-side; imports torch lazily through `export`."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="minilm-l6 | PATH to a local Hugging Face BERT-family folder; "
                                                   "with --task causal-lm: smollm2-135m | PATH (HF causal-LM folder or .gguf)")
    p.add_argument("--data", required=True, help="bbc-news | PATH.jsonl | PATH.csv (text,label): sets the label set; "
                                                  "with --task causal-lm: bbc-headlines | PATH.jsonl (prompt/response or text)")
    p.add_argument("--task", default="classify", choices=["classify", "causal-lm"],
                   help="sequence classification (default) or causal language modelling (experimental)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default=None, help="comma-separated module names to adapt "
                                                    "(default query,value; q_proj,v_proj for causal-lm)")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--opset", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-adapter", type=Path, help="seed the adapter from a PEFT LoRA folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--backend", default=None, choices=["ort-training", "portable", "both"],
                   help="training graphs to build: ORT training artifacts (onnxruntime-training, x86), the portable "
                        "step (plain onnxruntime, aarch64 boards too), or both (default; causal-lm: portable only)")


def run(args: argparse.Namespace) -> int:
    from export.bundle_builder import ExportConfig, export_bundle

    cfg = ExportConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=tuple(t.strip() for t in (args.targets or ("q_proj,v_proj" if args.task == "causal-lm" else "query,value")).split(",") if t.strip()),
        max_length=args.max_len,
        opset=args.opset,
        seed=args.seed,
        init_adapter=args.init_adapter,
        force=args.force,
        backend=args.backend or ("portable" if args.task == "causal-lm" else "both"),
        task=args.task,
    )
    export_bundle(cfg)
    return 0
