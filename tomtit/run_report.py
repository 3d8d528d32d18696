"""`tomtit report`: report.md, a self-contained report.html and PNG plots from what a run left.

Two kinds of folder: a run's (demo or field deployment: one summary JSON per process, read by
`tomtit.run_summaries`) and a `tomtit simulate` output (summary.json with "scenarios", whose
Markdown and plots `tomtit.sim.report` already writes; here it only gains the HTML page).
Input files are only read, never rewritten."""
from __future__ import annotations

from pathlib import Path

from tomtit.report_doc import (Block, Bullets, Heading, Image, Paragraph, Table, parse_markdown, to_html,
                               to_markdown)
from tomtit.run_plots import Figures, bytes_per_tier, pyplot
from tomtit.run_summaries import DeviceRun, NodeRun, Run, RunReportError, load_run, read_json

UNKNOWN = "—"  # a value the summary does not have (older producer)


def write_run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write report.md, report.html and the plots into `out` (default: `run_dir`); the HTML's path."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    pyplot()  # fail on a missing matplotlib before writing anything
    if not run_dir.is_dir():  # before anything else: with out == run_dir it would be created
        raise RunReportError(f"{run_dir}: no such folder" if not run_dir.exists() else f"{run_dir}: not a folder")
    simulate_summary = _simulate_summary(run_dir)
    run = None if simulate_summary is not None else load_run(run_dir)  # all input errors before any output
    _make_folder(out)
    try:
        if simulate_summary is not None:
            return _write_simulate_html(simulate_summary, run_dir, out)
        return _write_run_html(run, out)
    except OSError as e:  # a full disk or a read-only --out: one line, not a traceback
        raise RunReportError(f"{e.filename or out}: cannot write the report ({e.strerror or e})") from None


def _write_run_html(run: Run, out: Path) -> Path:
    figures = Figures(run, out)
    drawn = figures.all()
    blocks = report_blocks(run, drawn, figures.skipped)
    (out / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(to_html(blocks, out, f"tomtit run report: {run.folder.resolve().name}"), encoding="utf-8")
    return html_path


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunReportError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    if not out.is_dir():
        raise RunReportError(f"{out}: not a folder")


def _simulate_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    raw = read_json(path)
    return raw if isinstance(raw, dict) and "scenarios" in raw else None


def _write_simulate_html(summary: dict, run_dir: Path, out: Path) -> Path:
    from tomtit.sim.report import write_reports

    try:
        write_reports(out, summary)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # the simulate report indexes the summary directly: name the file, not a traceback
        raise RunReportError(f"{run_dir / 'summary.json'}: not a complete `tomtit simulate` summary "
                             f"({type(e).__name__}: {e})") from None
    blocks = parse_markdown((out / "report.md").read_text(encoding="utf-8"))
    html_path = out / "report.html"
    html_path.write_text(to_html(blocks, out, f"tomtit simulate report: {run_dir.resolve().name}"), encoding="utf-8")
    return html_path


# ---- the report's content --------------------------------------------------------------------

def report_blocks(run: Run, drawn: list[tuple[str, str]], skipped: list[str]) -> list[Block]:
    blocks: list[Block] = [
        Heading(f"tomtit run report: {run.folder.resolve().name}", 1),
        Paragraph(f"From `{run.folder}`: {len(run.devices)} device and {len(run.nodes)} node summaries "
                  f"({len(run.clouds)} cloud, {len(run.edges)} edges)."),
    ]
    notes = list(skipped)
    blocks += cloud_blocks(run.clouds)
    blocks += [Heading("Devices"), *device_blocks(run.devices, notes)]
    blocks += [Heading("Nodes"), nodes_table(run.nodes)]
    tiers = bytes_per_tier(run)
    if tiers:
        blocks += [Heading("Bytes per tier"),
                   Table(("tier", "MB"), tuple((name, f"{b / 1e6:.3f}") for name, b in tiers.items())),
                   Paragraph("Devices up/down: the devices' own counts; edges and cloud in/out: everything the "
                             "node received or sent, its children's traffic and its parent's included.")]
    if drawn:
        blocks.append(Heading("Plots"))
        for name, caption in drawn:
            blocks += [Paragraph(caption[0].upper() + caption[1:] + "."), Image(name, caption)]
    if len(run.clouds) > 1:
        notes.append(f"{len(run.clouds)} cloud summaries ({', '.join(c.node for c in run.clouds)}): "
                     "all are shown; was this folder shared by several runs?")
    if run.ignored:
        notes.append("not process summaries, left out: " + ", ".join(f"`{f}`" for f in run.ignored))
    if notes:
        blocks += [Heading("Notes"), Bullets(tuple(notes))]
    return blocks


def cloud_blocks(clouds: tuple[NodeRun, ...]) -> list[Block]:
    if not clouds:
        return [Heading("Cloud"), Paragraph("No cloud summary in this folder.")]
    blocks: list[Block] = [Heading("Cloud")]
    for c in clouds:
        if c.heldout_loss and not c.accuracy:
            blocks.append(Bullets(_causal_cloud_lines(c)))
            continue
        acc = c.accuracy or ()
        if acc:
            best_t, best = max(acc, key=lambda p: p[1])
            accuracy = f"{acc[0][1]:.3f} -> best {best:.3f} (at {best_t:.1f} s), last {acc[-1][1]:.3f}"
        else:
            accuracy = "not evaluated (no `accuracy` in its summary)"
        blocks.append(Bullets((
            f"`{c.node}` stopped: {c.stop_reason or UNKNOWN}, after {_num(c.seconds, 1)} s",
            f"held-out accuracy: {accuracy}",
            f"final global version {_num(c.final_version)}, {_num(c.aggregations)} aggregations, "
            f"{_num(c.accepted)} updates accepted, {_num(c.rejected)} rejected",
        )))
    return blocks


def _causal_cloud_lines(c: NodeRun) -> tuple[str, ...]:
    """A causal-LM cloud: held-out loss (and perplexity) from the base model to the best and last."""
    import math

    loss = c.heldout_loss
    best_t, best = min(loss, key=lambda p: p[1])
    ppl = lambda x: math.exp(min(x, 700.0))  # noqa: E731
    lines = [f"`{c.node}` stopped: {c.stop_reason or UNKNOWN}, after {_num(c.seconds, 1)} s",
             f"held-out loss (mean token cross-entropy): {loss[0][1]:.3f} "
             f"(base model, perplexity {ppl(loss[0][1]):.1f})"
             f" -> best {best:.3f} (at {best_t:.1f} s, perplexity {ppl(best):.1f}), last {loss[-1][1]:.3f}"]
    if c.unigram_f1:
        f1 = c.unigram_f1
        lines.append(f"unigram F1 of generated text: {f1[0][1]:.3f} -> best {max(v for _, v in f1):.3f}, "
                     f"last {f1[-1][1]:.3f}")
    lines.append(f"final global version {_num(c.final_version)}, {_num(c.aggregations)} aggregations, "
                 f"{_num(c.accepted)} updates accepted, {_num(c.rejected)} rejected")
    return tuple(lines)


def device_blocks(devices: tuple[DeviceRun, ...], notes: list[str]) -> list[Block]:
    if not devices:
        return [Paragraph("No device summary in this folder.")]
    columns = [("device", lambda d: d.id), ("parent", lambda d: d.parent or UNKNOWN),
               ("board", lambda d: d.board if d.board else ("not emulated" if d.board == "" else UNKNOWN)),
               ("link", lambda d: d.link if d.link else ("not emulated" if d.link == "" else UNKNOWN)),
               ("energy", lambda d: d.energy_kind or UNKNOWN),
               ("steps", lambda d: _num(d.steps)), ("syncs", lambda d: _num(d.syncs)),
               ("mean sync interval (steps)", lambda d: _num(d.mean_interval, 1)),
               ("mean sync interval (s)", lambda d: _num(d.mean_interval_s, 1)),
               ("energy (J)", lambda d: _num(d.joules, 1)),
               ("acked / rejected", lambda d: f"{_num(d.acked)} / {_num(d.rejected)}")]
    # A column no summary fills (all older producers) is dropped, and the notes say so.
    optional = {"parent": "parent", "board": "board", "link": "link"}
    kept = []
    for header, cell in columns:
        key = optional.get(header)
        if key and all(getattr(d, key) is None for d in devices):
            notes.append(f"devices table: no `{key}` in any device summary (older producers): column left out")
            continue
        kept.append((header, cell))
    return [Table(tuple(h for h, _ in kept), tuple(tuple(cell(d) for _, cell in kept) for d in devices))]


def nodes_table(nodes: tuple[NodeRun, ...]) -> Block:
    if not nodes:
        return Paragraph("No node summary in this folder.")
    header = ("node", "role", "parent", "pushes up", "aggregations", "accepted", "duplicates", "rejected",
              "final version", "stop reason")
    rows = tuple((n.node, n.role, n.parent or ("none" if n.role == "cloud" else UNKNOWN),
                  _num(n.pushes_up) if n.role == "edge" else "n/a", _num(n.aggregations), _num(n.accepted),
                  _num(n.duplicates), _num(n.rejected), _num(n.final_version), n.stop_reason or UNKNOWN)
                 for n in nodes)
    return Table(header, rows)


def _num(x: float | int | None, digits: int = 0) -> str:
    if x is None:
        return UNKNOWN
    return f"{x:.{digits}f}" if digits else f"{x:d}" if isinstance(x, int) else f"{x:.0f}"
