"""The run report's figures (matplotlib, Agg: no display needed), one function per figure.

Each function returns the PNG's file name, or None when the summaries lack what it needs (an older
producer); `skipped` then says why, for the report's notes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tomtit.run_summaries import DeviceRun, Run

FIGSIZE = (8.0, 4.5)  # inches; at DPI this is 880 x 495 px, readable in a page and on a laptop
DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend; a CliError naming the extra when it is missing."""
    from tomtit.cli import CliError

    try:
        import matplotlib
    except ImportError:
        raise CliError("tomtit report needs matplotlib: pip install 'tomtit[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class Timebase:
    """One origin for every absolute (epoch) time of a run, so the plots line up."""
    origin: float | None
    label: str  # x-axis label

    @classmethod
    def of(cls, run: Run) -> "Timebase":
        clouds = [n.started_at for n in run.clouds if n.started_at is not None]
        if clouds:
            return cls(min(clouds), "time since the cloud started (s)")
        starts = [p.started_at for p in (*run.devices, *run.nodes) if p.started_at is not None]
        if starts:
            return cls(min(starts), "time since the first process started (s)")
        # the oldest summaries: only the events' own epoch times
        firsts = [d.sync_times[0] for d in run.devices if d.sync_times]
        firsts += [d.timeline[0][0] for d in run.devices if d.timeline]
        return cls(min(firsts) if firsts else None, "time since the first recorded event (s)")


def device_label(d: DeviceRun) -> str:
    where = ", ".join(x for x in (d.board, d.link) if x) or ("not emulated" if d.board == "" else "board unknown")
    return f"{d.id} ({where}) — {d.energy_kind or 'energy kind unknown'}"


class Figures:
    """Draws into `folder`; `skipped` collects one line per figure it could not draw."""

    def __init__(self, run: Run, folder: Path):
        self.run, self.folder = run, folder
        self.plt = pyplot()
        self.time = Timebase.of(run)
        self.skipped: list[str] = []

    def all(self) -> list[tuple[str, str]]:
        """(file name, caption) of every figure drawn."""
        drawn = []
        # a causal-LM run has no accuracy: its cloud reports held-out loss instead
        causal = any(c.heldout_loss for c in self.run.clouds) and not any(c.accuracy for c in self.run.clouds)
        first = ((self.heldout_loss, "held-out loss of the cloud's model over time") if causal
                 else (self.accuracy, "global accuracy of the cloud's model over time"))
        for draw, caption in (first,
                              (self.energy, "cumulative energy per device over time"),
                              (self.sync_intervals, "each device's sync interval, one marker per sync"),
                              (self.bytes_per_tier, "bytes moved per tier"),
                              (self.edge_pushes, "each edge's pushes to its parent over time")):
            name = draw()
            if name:
                drawn.append((name, caption))
        return drawn

    def _board_styles(self) -> dict[str, tuple[object, str]]:
        """device id -> (colour, line style): one colour per board, styles tell its devices apart."""
        cmap = self.plt.get_cmap("tab10")
        boards = sorted({d.board or "" for d in self.run.devices})
        styles, seen = {}, {}
        for d in self.run.devices:
            b = d.board or ""
            n = seen[b] = seen.get(b, -1) + 1
            styles[d.id] = (cmap(boards.index(b) % 10), ("-", "--", ":", "-.")[n % 4])
        return styles

    def accuracy(self) -> str | None:
        points = [(c, c.accuracy) for c in self.run.clouds if c.accuracy]
        if not points:
            self.skipped.append("accuracy vs time: no cloud summary with an `accuracy` list (cloud ran without "
                                "--eval-data, or an older summary)")
            return None
        fig, ax = self.plt.subplots(figsize=FIGSIZE)
        for cloud, acc in points:
            ax.plot([t for t, _ in acc], [a for _, a in acc], marker="o", ms=3, label=f"{cloud.node} (held-out)")
        ax.set(title="Global model: held-out accuracy", xlabel="time since the cloud started (s)",
               ylabel="accuracy (fraction correct)")
        ax.legend(loc="lower right")
        return self._save(fig, ax, "accuracy_vs_time.png")

    def heldout_loss(self) -> str | None:
        """A causal LM: held-out mean token cross-entropy (and unigram F1, when scored) over time."""
        points = [c for c in self.run.clouds if c.heldout_loss]
        if not points:
            self.skipped.append("held-out loss vs time: no cloud summary with a `heldout_loss` list")
            return None
        fig, ax = self.plt.subplots(figsize=FIGSIZE)
        for cloud in points:
            ax.plot([t for t, _ in cloud.heldout_loss], [v for _, v in cloud.heldout_loss], marker="o", ms=3,
                    label=f"{cloud.node} (held-out loss)")
        ax.set(title="Global model: held-out loss (mean token cross-entropy)",
               xlabel="time since the cloud started (s)", ylabel="loss (nats per token)")
        scored = [c for c in points if c.unigram_f1]
        if scored:  # the overlap score on its own axis: 0..1, rising while the loss falls
            ax2 = ax.twinx()
            for cloud in scored:
                ax2.plot([t for t, _ in cloud.unigram_f1], [v for _, v in cloud.unigram_f1], color="tab:green",
                         ls="--", marker=".", ms=3, label=f"{cloud.node} (unigram F1 of generations)")
            ax2.set(ylabel="unigram F1 (ROUGE-1)", ylim=(0, 1))
            ax2.legend(loc="lower left")
        ax.legend(loc="upper right")
        return self._save(fig, ax, "heldout_loss_vs_time.png")

    def energy(self) -> str | None:
        devices = [d for d in self.run.devices if d.timeline]
        if not devices or self.time.origin is None:
            self.skipped.append("energy vs time: no device summary has a `timeline` (older producers)")
            return None
        styles = self._board_styles()
        fig, ax = self.plt.subplots(figsize=FIGSIZE)
        for d in devices:
            colour, ls = styles[d.id]
            ax.plot([t - self.time.origin for t, _ in d.timeline], [j for _, j in d.timeline],
                    color=colour, ls=ls, label=device_label(d))
        ax.set(title="Energy spent by each device (cumulative)", xlabel=self.time.label, ylabel="energy (J)")
        ax.legend(fontsize=7, loc="upper left", title="device (board, link) — energy", title_fontsize=7)
        return self._save(fig, ax, "energy_per_device.png")

    def sync_intervals(self) -> str | None:
        devices = [d for d in self.run.devices if d.sync_times and d.intervals]
        if not devices or self.time.origin is None:
            self.skipped.append("sync intervals over time: no device summary has `sync_times` (older producers)")
            return None
        styles = self._board_styles()
        fig, ax = self.plt.subplots(figsize=FIGSIZE)
        for d in devices:
            colour, ls = styles[d.id]
            pairs = list(zip(d.sync_times, d.intervals))
            ax.plot([t - self.time.origin for t, _ in pairs], [i for _, i in pairs], color=colour, ls=ls,
                    marker="o", ms=4, label=device_label(d))
        ax.set(title="Each device's sync interval (a marker = one sync decided by the device)",
               xlabel=self.time.label, ylabel="local steps since the previous sync")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="best")
        return self._save(fig, ax, "sync_intervals.png")

    def bytes_per_tier(self) -> str | None:
        tiers = bytes_per_tier(self.run)
        if not tiers:
            self.skipped.append("bytes per tier: no summary has byte counts")
            return None
        fig, ax = self.plt.subplots(figsize=FIGSIZE)
        names, mb = list(tiers), [v / 1e6 for v in tiers.values()]
        bars = ax.bar(names, mb, color=["#1f77b4", "#aec7e8", "#2ca02c", "#98df8a", "#d62728", "#ff9896"][:len(names)])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in mb], fontsize=8)
        ax.set(title="Bytes moved per tier, whole run", ylabel="MB (10^6 bytes)")
        ax.tick_params(axis="x", labelsize=8)
        return self._save(fig, ax, "bytes_per_tier.png", grid_axis="y")

    def edge_pushes(self) -> str | None:
        edges = [e for e in self.run.edges if e.push_times is not None]
        if not edges:
            self.skipped.append("edge pushes: no edge summary has `push_times`")
            return None
        # Align with the other plots when every edge says when it started; else each from its own start.
        aligned = self.time.origin is not None and all(e.started_at is not None for e in edges)
        fig, ax = self.plt.subplots(figsize=FIGSIZE)
        for e in edges:
            shift = e.started_at - self.time.origin if aligned else 0.0
            times = sorted(t + shift for t in e.push_times)
            ax.step([shift, *times], range(len(times) + 1), where="post", marker="|", ms=10,
                    label=f"{e.node} ({len(times)} pushes)")
        ax.set(title="Pushes of each edge to its parent (cumulative; a tick = one push)",
               xlabel=self.time.label if aligned else "time since each edge started (s)",
               ylabel="pushes so far")
        from matplotlib.ticker import MaxNLocator  # matplotlib is loaded: pyplot() ran in __init__

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # pushes are whole
        ax.legend(loc="upper left")
        return self._save(fig, ax, "edge_pushes.png")

    def _save(self, fig, ax, name: str, grid_axis: str = "both") -> str:
        ax.grid(alpha=0.3, axis=grid_axis)
        fig.tight_layout()
        fig.savefig(self.folder / name, dpi=DPI)
        self.plt.close(fig)
        return name


def bytes_per_tier(run: Run) -> dict[str, int]:
    """tier label -> bytes, for the tiers some summary reports (device up = sum of devices' bytes_up, ...)."""
    sources = (("devices up", run.devices, "bytes_up"), ("devices down", run.devices, "bytes_down"),
               ("edges in", run.edges, "bytes_in"), ("edges out", run.edges, "bytes_out"),
               ("cloud in", run.clouds, "bytes_in"), ("cloud out", run.clouds, "bytes_out"))
    out = {}
    for label, procs, key in sources:
        values = [getattr(p, key) for p in procs if getattr(p, key) is not None]
        if values:
            out[label] = sum(values)
    return out
