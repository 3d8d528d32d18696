"""`tomtit report RUN_DIR`: report.md, a self-contained report.html and plots from a run's summaries."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="a run's folder: a demo's or field run's (device and node summary JSONs), "
                        "or a `tomtit simulate` output (summary.json)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write the report here instead of into RUN_DIR")


def run(args: argparse.Namespace) -> int:
    from tomtit.run_report import write_run_report

    html = write_run_report(args.run_dir, args.out)
    print(f"wrote {html} (self-contained: open it in a browser)")
    print(f"  and {html.with_name('report.md')} with its PNG plots in {html.parent}")
    return 0
