"""`tomtit peft export|import`: a bundle's adapter as a Hugging Face PEFT LoRA folder, and back
(workstation; a classifier or a causal-LM bundle)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    e = sub.add_parser("export", help="write adapter_model.safetensors + adapter_config.json (+ head)")
    e.add_argument("--bundle", required=True, type=Path)
    e.add_argument("--adapter", type=Path, help="trained adapter (default: the bundle's initial one)")
    e.add_argument("--base", help="base model (minilm-l6, smollm2-135m or a folder / .gguf) if not where the "
                                  "export found it")
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--force", action="store_true")
    i = sub.add_parser("import", help="a PEFT LoRA folder -> a tomtit adapter file for this bundle "
                                      "(same rank, alpha and target modules)")
    i.add_argument("--bundle", required=True, type=Path)
    i.add_argument("--peft", required=True, type=Path,
                   help="folder with adapter_config.json + adapter_model.safetensors")
    i.add_argument("--out", required=True, type=Path, help="adapter file to write (.safetensors)")
    i.add_argument("--force", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.action == "import":
        from export.peft_io import import_peft

        out = import_peft(args.bundle, args.peft, args.out, force=args.force)
        print(f"tomtit adapter -> {out} (use with --adapter, e.g. tomtit train / generate / infer)")
        return 0
    from export.peft_io import export_peft

    out = export_peft(args.bundle, args.out, adapter=args.adapter, base=args.base, force=args.force)
    print(f"PEFT adapter -> {out} (load with PeftModel.from_pretrained(base_model, '{out}'))")
    return 0
