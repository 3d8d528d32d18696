"""`tomtit data split`: per-device non-IID JSONL files and a held-out test file."""
from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    s = sub.add_parser("split", help="Dirichlet(alpha) label-skewed device files + test.jsonl")
    s.add_argument("--data", required=True, help="bbc-news | PATH.jsonl | PATH.csv; causal LM: bbc-headlines | "
                                                  "PATH.jsonl (prompt/response or text; skewed over its category field)")
    s.add_argument("--devices", type=int, required=True)
    s.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration: 0.1 = strong skew, 100 = ~IID")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test-fraction", type=float, default=0.2)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--force", action="store_true", help="replace an existing --out folder")
    s.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from tomtit.cli import CliError
    from tomtit.data import dirichlet_split, load_dataset, write_jsonl

    out: Path = args.out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CliError(f"--out {out} exists and is not an empty folder (pass --force to replace it)")
    if not out.parent.is_dir():
        raise CliError(f"the parent of --out ({out.parent}) does not exist")
    from tomtit.lm_data import is_lm_data

    if is_lm_data(args.data):
        return _split_lm(args, out)
    ds = load_dataset(args.data, min_classes=2)
    split = dirichlet_split(ds.labels, devices=args.devices, alpha=args.alpha, seed=args.seed,
                            test_fraction=args.test_fraction)
    summary = {"data": ds.source, "alpha": args.alpha, "seed": args.seed, "labels": list(ds.label_names)}
    write = lambda path, idx: write_jsonl(path, [ds.texts[i] for i in idx], [ds.labels[i] for i in idx])  # noqa: E731
    return _write_split(args, out, split, ds.labels, summary, write)


def _write_split(args: argparse.Namespace, out: Path, split, groups, summary: dict, write) -> int:
    """The device files and test.jsonl (written by `write(path, indices)`) and split.json, staged
    and published in one rename; `groups[i]` is what each file's counts are of (label or group)."""
    from tomtit.fsutil import publish_dir, staging_dir

    tmp = staging_dir(out)
    try:
        width = max(2, len(str(args.devices - 1)))
        summary = {**summary, "devices": {}, "test": None}
        for d, idx in enumerate(split.device_indices):
            name = f"device-{d:0{width}d}.jsonl"
            write(tmp / name, idx)
            summary["devices"][name] = dict(sorted(Counter(groups[i] for i in idx).items()))
        write(tmp / "test.jsonl", split.test_indices)
        summary["test"] = dict(sorted(Counter(groups[i] for i in split.test_indices).items()))
        (tmp / "split.json").write_text(json.dumps(summary, indent=2))
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(summary))
    else:
        for name, counts in summary["devices"].items():
            print(f"{name}: {sum(counts.values()):4d}  {counts}")
        print(f"test.jsonl: {sum(summary['test'].values()):4d}  {summary['test']}")
    return 0


def _split_lm(args: argparse.Namespace, out: Path) -> int:
    """Causal-LM data has no labels: the Dirichlet skew is over each example's group (the BBC
    category for bbc-headlines, a row's "category"/"label" field, else one group)."""
    from tomtit.data import dirichlet_split
    from tomtit.lm_data import load_lm_dataset, write_lm_jsonl

    ds = load_lm_dataset(args.data)
    split = dirichlet_split(ds.groups, devices=args.devices, alpha=args.alpha, seed=args.seed,
                            test_fraction=args.test_fraction)
    summary = {"data": ds.source, "task": "causal-lm", "alpha": args.alpha, "seed": args.seed,
               "groups": sorted(set(ds.groups))}
    return _write_split(args, out, split, ds.groups, summary, lambda path, idx: write_lm_jsonl(path, ds, idx))
