"""The per-process summary files a run leaves (device and node JSONs), read into typed records.

Summaries come from producers of several ages: a key an older producer did not write, or a value
of the wrong type, becomes None ("unknown") here, so the report can say what it could not show
instead of failing. A file that is not JSON at all is an error naming the file: the report
would otherwise silently leave out a process."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tomtit.cli import CliError


class RunReportError(CliError):
    """Bad input for `tomtit report`: printed as one line naming the folder or file."""


@dataclass(frozen=True)
class DeviceRun:
    id: str
    source: str  # file name, for notes
    parent: str | None
    board: str | None  # "" = not emulated (this machine); None = the summary predates the key
    link: str | None
    energy_kind: str | None  # measured | emulated | estimated
    steps: int | None
    syncs: int | None
    acked: int | None
    rejected: int | None
    intervals: tuple[int, ...]  # local steps of each sync cycle
    sync_times: tuple[float, ...] | None  # epoch seconds, one per interval
    joules: float | None
    started_at: float | None  # epoch seconds
    timeline: tuple[tuple[float, float], ...] | None  # (epoch seconds, cumulative joules)
    bytes_up: int | None
    bytes_down: int | None

    @property
    def mean_interval(self) -> float | None:
        return sum(self.intervals) / len(self.intervals) if self.intervals else None

    @property
    def mean_interval_s(self) -> float | None:
        """Mean wall seconds between two syncs (None with fewer than two)."""
        t = self.sync_times
        return (t[-1] - t[0]) / (len(t) - 1) if t and len(t) >= 2 else None


@dataclass(frozen=True)
class NodeRun:
    node: str
    source: str
    role: str  # cloud | edge
    parent: str | None
    started_at: float | None  # epoch seconds; every other time of a node is relative to it
    stop_reason: str | None
    final_version: int | None
    aggregations: int | None
    accepted: int | None
    duplicates: int | None
    rejected: int | None  # summed over reasons
    bytes_in: int | None
    bytes_out: int | None
    pushes_up: int | None
    push_times: tuple[float, ...] | None  # seconds since started_at
    accuracy: tuple[tuple[float, float], ...] | None  # (seconds since started_at, held-out accuracy)
    seconds: float | None
    # a causal-LM run: (seconds since started_at, held-out mean token cross-entropy in nats), and the
    # unigram F1 of generations where the cloud scored them; None for classifier runs and older summaries
    heldout_loss: tuple[tuple[float, float], ...] | None = None
    unigram_f1: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class Run:
    folder: Path
    devices: tuple[DeviceRun, ...]
    nodes: tuple[NodeRun, ...]
    ignored: tuple[str, ...]  # JSON files that are no process summary (e.g. the demo's summary.json)

    @property
    def clouds(self) -> tuple[NodeRun, ...]:
        return tuple(n for n in self.nodes if n.role == "cloud")

    @property
    def edges(self) -> tuple[NodeRun, ...]:
        return tuple(n for n in self.nodes if n.role == "edge")


def read_json(path: Path) -> Any:
    """The parsed file, or a RunReportError naming it (never a traceback)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RunReportError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise RunReportError(f"{path}: not a JSON file (not UTF-8 text)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunReportError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                             "was its process stopped while writing it? Move it away to report the rest") from None


def load_run(folder: Path) -> Run:
    """Every device and node summary directly in `folder`."""
    if not folder.exists():
        raise RunReportError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise RunReportError(f"{folder}: not a folder (give the run's folder, e.g. runs/demo)")
    devices, nodes, ignored = [], [], []
    for path in sorted(folder.glob("*.json")):
        raw = read_json(path)
        if isinstance(raw, dict) and isinstance(raw.get("node"), str):
            nodes.append(node_from_summary(raw, path.name))
        elif isinstance(raw, dict) and isinstance(raw.get("id"), str) and "steps" in raw:
            devices.append(device_from_summary(raw, path.name))
        else:
            ignored.append(path.name)
    if not devices and not nodes:
        raise RunReportError(f"{folder}: no device or node summaries in it (*.json with \"id\" and \"steps\", "
                             "or \"node\") and no `tomtit simulate` summary.json")
    nodes.sort(key=lambda n: (n.role != "cloud", n.node))
    devices.sort(key=lambda d: d.id)
    return Run(folder=folder, devices=tuple(devices), nodes=tuple(nodes), ignored=tuple(ignored))


def device_from_summary(raw: dict, source: str) -> DeviceRun:
    intervals = _numbers(raw, "intervals") or ()
    return DeviceRun(
        id=raw["id"], source=source, parent=_str(raw, "parent"), board=_str(raw, "board"), link=_str(raw, "link"),
        energy_kind=_energy_kind(raw), steps=_int(raw, "steps"), syncs=_int(raw, "syncs"),
        acked=_int(raw, "acked"), rejected=_int(raw, "rejected"), intervals=tuple(int(i) for i in intervals),
        sync_times=_numbers(raw, "sync_times"), joules=_float(raw, "joules"), started_at=_float(raw, "started_at"),
        timeline=_energy_timeline(raw.get("timeline")), bytes_up=_int(raw, "bytes_up"),
        bytes_down=_int(raw, "bytes_down"))


def node_from_summary(raw: dict, source: str) -> NodeRun:
    parent = _str(raw, "parent")
    role = raw.get("role") if raw.get("role") in ("cloud", "edge") else ("edge" if parent else "cloud")
    rejected = raw.get("updates_rejected")
    if isinstance(rejected, dict):  # {reason: n}
        rejected = sum(v for v in rejected.values() if _is_number(v))
    return NodeRun(
        node=raw["node"], source=source, role=role, parent=parent, started_at=_float(raw, "started_at"),
        stop_reason=_str(raw, "stop_reason"), final_version=_int(raw, "final_version"),
        aggregations=_int(raw, "aggregations"), accepted=_int(raw, "updates_accepted"),
        duplicates=_int(raw, "duplicates"), rejected=int(rejected) if _is_number(rejected) else None,
        bytes_in=_int(raw, "bytes_in"), bytes_out=_int(raw, "bytes_out"), pushes_up=_int(raw, "pushes_up"),
        push_times=_numbers(raw, "push_times"), accuracy=_accuracy(raw.get("accuracy")),
        seconds=_float(raw, "seconds"), heldout_loss=_series(raw.get("heldout_loss"), "loss"),
        unigram_f1=_series(raw.get("heldout_loss"), "unigram_f1") or None)


def _energy_kind(raw: dict) -> str | None:
    kind = _str(raw, "energy_kind")
    if kind:
        return kind
    # Older device summaries: infer it from the meter's name and the estimated flag.
    meter = _str(raw, "meter") or ""
    if meter.startswith("emulated:"):
        return "emulated"
    estimated = raw.get("energy_estimated")
    return {True: "estimated", False: "measured"}.get(estimated) if isinstance(estimated, bool) else None


def _energy_timeline(points: Any) -> tuple[tuple[float, float], ...] | None:
    """(time, cumulative joules) from [[t_epoch, step, joules, loss], ...]; malformed points dropped."""
    if not isinstance(points, list):
        return None
    return tuple((float(p[0]), float(p[2])) for p in points
                 if isinstance(p, (list, tuple)) and len(p) >= 3 and _is_number(p[0]) and _is_number(p[2]))


def _accuracy(points: Any) -> tuple[tuple[float, float], ...] | None:
    return _series(points, "accuracy")


def _series(points: Any, key: str) -> tuple[tuple[float, float], ...] | None:
    """(t, value) of each well-formed {"t": ..., key: ...} point; None when there is no list."""
    if not isinstance(points, list):
        return None
    return tuple((float(p["t"]), float(p[key])) for p in points
                 if isinstance(p, dict) and _is_number(p.get("t")) and _is_number(p.get(key)))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(raw: dict, key: str) -> int | None:
    x = raw.get(key)
    return int(x) if _is_number(x) else None


def _float(raw: dict, key: str) -> float | None:
    x = raw.get(key)
    return float(x) if _is_number(x) else None


def _str(raw: dict, key: str) -> str | None:
    x = raw.get(key)
    return x if isinstance(x, str) else None


def _numbers(raw: dict, key: str) -> tuple[float, ...] | None:
    x = raw.get(key)
    if not isinstance(x, list):
        return None
    return tuple(float(v) for v in x if _is_number(v))
