"""`tomtit peft export`: a bundle's adapter as a Hugging Face PEFT LoRA folder (workstation)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    e = sub.add_parser("export", help="write adapter_model.safetensors + adapter_config.json (+ head)")
    e.add_argument("--bundle", required=True, type=Path)
    e.add_argument("--adapter", type=Path, help="trained adapter (default: the bundle's initial one)")
    e.add_argument("--base", help="base model (minilm-l6 or folder) if not where the export found it")
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--force", action="store_true")


def run(args: argparse.Namespace) -> int:
    from export.peft_io import export_peft

    out = export_peft(args.bundle, args.out, adapter=args.adapter, base=args.base, force=args.force)
    print(f"PEFT adapter -> {out} (load with PeftModel.from_pretrained(base_model, '{out}'))")
    return 0
