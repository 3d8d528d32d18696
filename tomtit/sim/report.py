"""Plots (matplotlib, Agg) and report.md for a `tomtit simulate` output folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"ours": "#d62728", "async-fixed": "#1f77b4", "adaptive": "#9467bd", "hierfavg": "#2ca02c",
          "fedavg": "#7f7f7f"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _best_runs(s: dict, seed: int = 0) -> dict[str, dict]:
    out = {}
    for m, info in s["methods"].items():
        for r in s["runs"]:
            if r["method"] == m and r["setting"] == info["best_setting"] and r["seed"] == seed:
                out[m] = r
    return out


def plot_scenario(folder: Path, name: str, s: dict) -> list[str]:
    plt = _plt()
    runs = _best_runs(s)
    target = s["target"]["target_accuracy"]
    files = []

    def accuracy_plot(x_of, xlabel: str, title: str, filename: str) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for m, r in runs.items():
            ax.plot([x_of(p) for p in r["accuracy"]], [p["accuracy"] for p in r["accuracy"]], label=r["setting"],
                    color=COLORS.get(m), lw=2 if m == "ours" else 1.2)
        ax.axhline(target, ls="--", color="k", lw=0.8, label=f"target {target:.3f}")
        ax.set(title=f"{name}: {title} (seed 0)", xlabel=xlabel, ylabel="held-out accuracy")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        files.append(_save(fig, folder / filename))

    accuracy_plot(lambda p: p["t"], "virtual time (s)", "accuracy of the global model", "accuracy_vs_time.png")
    accuracy_plot(lambda p: p["device_j"] / 1000, "device energy, all devices (kJ)",
                  "accuracy against device energy spent", "accuracy_vs_energy.png")

    if "ours" in runs:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        boards = sorted({d["board"] for d in runs["ours"]["devices"]})
        cmap = plt.get_cmap("tab10")
        for d in runs["ours"]["devices"]:
            c = cmap(boards.index(d["board"]))
            ax.plot(d["sync_times"], d["intervals"], marker="o", ms=3, lw=0.8, color=c, alpha=0.8)
        for b in boards:
            ax.plot([], [], color=cmap(boards.index(b)), marker="o", label=b)
        ax.set(title=f"{name}: each device's sync interval, ours (seed 0)", xlabel="virtual time (s)",
               ylabel="local steps since the previous sync")
        ax.legend(fontsize=7, title="board")
        ax.grid(alpha=0.3)
        files.append(_save(fig, folder / "sync_intervals.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    tiers = ("device_up", "device_down", "edge_up", "edge_down")
    ms = list(runs)
    width = 0.8 / len(tiers)
    for j, tier in enumerate(tiers):
        ax.bar([i + j * width for i in range(len(ms))], [runs[m]["bytes"][tier] / 1e6 for m in ms], width,
               label=tier.replace("_", " "))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ms))], ms)
    ax.set(title=f"{name}: bytes moved until the run stopped (seed 0)", ylabel="MB")
    ax.legend(fontsize=7)
    files.append(_save(fig, folder / "bytes_per_tier.png"))
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def _fmt(x: Any, unit: str = "", digits: int = 1) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}{unit}"


def scenario_markdown(name: str, s: dict, plots: list[str]) -> str:
    t = s["target"]
    lines = [f"## {name}", "",
             f"Target accuracy {t['target_accuracy']:.3f} = {t['fraction']} x centralised {t['central_accuracy']:.3f}. "
             f"{s['scenario']['devices']} devices, {s['scenario']['edges']} edges, alpha {s['scenario']['alpha']}, "
             f"boards `{s['scenario']['boards']}`, links `{s['scenario']['links']}`.", "",
             "| method | setting (best of grid) | reached | time to target (s) | device energy (J) | "
             "device MB up | syncs | final acc. | ours/it time | ours/it energy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, info in s["methods"].items():
        med = info["median"]
        r = s["ratios"].get(m, {})
        lines.append(f"| {m} | {info['best_setting']} | {med['reached']}/{med['seeds']} | "
                     f"{_fmt(med['time_to_target_s'])} | {_fmt(med['device_energy_j'], digits=0)} | "
                     f"{_fmt((med['bytes_device_up'] or 0) / 1e6, digits=2)} | {_fmt(med['syncs'], digits=0)} | "
                     f"{_fmt(med['final_accuracy'], digits=3)} | {_fmt(r.get('time'), digits=2)} | "
                     f"{_fmt(r.get('energy'), digits=2)} |")
    lines += ["", "Medians over seeds; energy only where every seed reached the target. Grid (seed 0):", ""]
    for m, info in s["methods"].items():
        cells = ", ".join(f"{g['setting']}: " + (f"{g['time_to_target_s']:.0f} s" if g["reached"]
                                                  else f"not reached ({g['best_accuracy']:.3f})")
                          for g in info["grid_seed0"])
        lines.append(f"- {m}: {cells}")
    lines.append("")
    lines += [f"![{p}]({name}/{p})" for p in plots]
    lines.append("")
    return "\n".join(lines)


def write_reports(out: Path, summary: dict) -> None:
    parts = ["# tomtit simulate", "",
             f"Bundle `{summary['bundle']}`, data `{summary['data']}`, {summary['seeds']} seed(s), "
             f"{summary['workers']} worker(s), {summary['wall_s']:.0f} s of wall time. Centralised reference: "
             f"{summary['central']['best_accuracy']:.4f} in {summary['central']['steps']} steps.", ""]
    for name, s in summary["scenarios"].items():
        folder = out / name
        folder.mkdir(exist_ok=True)
        plots = plot_scenario(folder, name, s)
        md = scenario_markdown(name, s, plots)
        (folder / "report.md").write_text(md.replace(f"]({name}/", "]("))
        parts.append(md)
    (out / "report.md").write_text("\n".join(parts))


def evaluation_markdown(root: Path) -> str:
    """The tables of docs/evaluation.md from every `<root>/<scenario>/summary.json`
    (`python -m tomtit.sim.report runs/evaluation`)."""
    rows = ["| scenario | target | method | best setting | reached | time to target (s) | device energy (J) | "
            "ours / it: time | ours / it: energy |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(root.glob("*/summary.json")):
        summary = __import__("json").loads(path.read_text())
        for name, s in summary["scenarios"].items():
            for m, info in s["methods"].items():
                med, r = info["median"], s["ratios"].get(m, {})
                rows.append(f"| {name} | {s['target']['target_accuracy']:.3f} | {m} | {info['best_setting']} | "
                            f"{med['reached']}/{med['seeds']} | {_fmt(med['time_to_target_s'])} | "
                            f"{_fmt(med['device_energy_j'], digits=0)} | {_fmt(r.get('time'), digits=2)} | "
                            f"{_fmt(r.get('energy'), digits=2)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    print(evaluation_markdown(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/evaluation")))
