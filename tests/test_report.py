"""`tomtit report`: report.md, a self-contained report.html and plots from a run's summaries.

The summaries are synthetic, written here after the documented format (2 edges, a cloud with
held-out accuracy, 4 devices on different boards); every expected number is computed here from
those inputs, not by the report's code. One test opens the page in a real headless Chromium."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

try:
    import matplotlib  # noqa: F401  (the `report` extra)
except ImportError:
    if os.environ.get("CI"):  # CI installs '.[all]': a missing matplotlib must fail, not skip
        raise
    pytest.skip("matplotlib is not installed: pip install 'tomtit[report]'", allow_module_level=True)

from tomtit.cli import main  # noqa: E402

T0 = 1_700_000_000.0  # the cloud's start, epoch seconds
PLOTS = ("accuracy_vs_time.png", "energy_per_device.png", "sync_intervals.png", "bytes_per_tier.png",
         "edge_pushes.png")

# id -> (parent, board, link, energy kind, meter, watts, intervals, acked, rejected)
DEVICES = {
    "dev00": ("edge0", "pi4", "wifi", "emulated", "emulated:pi4", 4.0, [10, 14, 20], 3, 0),
    "dev01": ("edge0", "pi5", "ethernet", "emulated", "emulated:pi5", 6.5, [8, 9, 12, 15], 4, 0),
    "dev02": ("edge1", "orin-nano", "nb-iot", "emulated", "emulated:orin-nano", 9.0, [30, 25], 1, 1),
    "dev03": ("edge1", "", "", "measured", "rapl", 15.0, [5, 7, 9, 11, 13], 5, 0),
}
STEP_S = 0.1  # seconds per local step in the synthetic timelines
EDGE_PUSHES = {"edge0": [2.0, 5.5, 9.1], "edge1": [3.0, 8.0]}
ACCURACY = [(0.0, 0.27), (5.0, 0.55), (12.0, 0.91), (15.0, 0.88)]


def device_summary(dev_id: str, *, extra_steps: int = 3) -> dict:
    parent, board, link, kind, meter, watts, intervals, acked, rejected = DEVICES[dev_id]
    started = T0 + 1.0 + int(dev_id[-2:]) * 0.25
    steps = sum(intervals) + extra_steps
    sync_steps = [sum(intervals[:i + 1]) for i in range(len(intervals))]
    timeline = [[started + s * STEP_S, s, s * STEP_S * watts, 1.5 - s / 200] for s in range(0, steps + 1, 10)]
    return {
        "id": dev_id, "parent": parent, "backend": "portable", "stop_reason": "signal", "steps": steps,
        "syncs": len(intervals), "acked": acked, "rejected": rejected, "outbox": 0, "intervals": intervals,
        "reasons": ["energy budget"] * len(intervals), "sync_times": [started + s * STEP_S for s in sync_steps],
        "joules": steps * STEP_S * watts, "energy_estimated": kind == "estimated", "energy_kind": kind,
        "meter": meter, "board": board, "link": link, "started_at": started, "timeline": timeline,
        "bytes_up": 120_000 * len(intervals), "bytes_down": 150_000 * len(intervals), "base_version": 7,
        "waited_s": 0.0, "postponed": 0, "ledger": {},
    }


def node_summary(node: str) -> dict:
    cloud = node == "cloud"
    pushes = [] if cloud else EDGE_PUSHES[node]
    out = {
        "node": node, "parent": None if cloud else "cloud", "role": "cloud" if cloud else "edge",
        "started_at": T0 if cloud else T0 + 0.5, "stop_reason": "target accuracy" if cloud else "signal",
        "final_version": 10 if cloud else 6, "aggregations": 10 if cloud else 5,
        "versions": [{"t": 1.0, "version": 1}], "updates_accepted": 5 if cloud else 7, "duplicates": 1,
        "updates_rejected": {"stale": 1, "bad_signature": 2} if cloud else {},
        "bytes_in": 600_000 if cloud else 900_000 + len(pushes), "bytes_out": 400_000 if cloud else 1_300_000,
        "pushes_up": len(pushes), "push_times": pushes, "push_intervals": [3] * len(pushes),
        "push_reasons": ["loss plateau"] * len(pushes), "child_arrivals": {}, "seconds": 16.0,
    }
    if cloud:
        out["accuracy"] = [{"t": t, "version": i, "accuracy": a, "loss": 1.0} for i, (t, a) in enumerate(ACCURACY)]
    return out


def write_run(folder: Path, *, old: bool = False) -> Path:
    """A demo-like run folder; `old`: summaries from before timeline/started_at/board/sync_times."""
    folder.mkdir(parents=True, exist_ok=True)
    new_keys = ("timeline", "started_at", "board", "link", "sync_times", "energy_kind", "parent", "bytes_down")
    for dev_id in DEVICES:
        s = device_summary(dev_id)
        if old:
            s = {k: v for k, v in s.items() if k not in new_keys}
        (folder / f"{dev_id}.json").write_text(json.dumps(s))
    for node in ("cloud", "edge0", "edge1"):
        s = node_summary(node)
        if old:
            s = {k: v for k, v in s.items() if k not in ("started_at", "role")}
        (folder / f"{node}.json").write_text(json.dumps(s))
    # the demo's own roll-up and its logs: not process summaries, and never touched
    (folder / "summary.json").write_text(json.dumps({"cloud": {"stop_reason": "target accuracy"}, "edges": {},
                                                     "devices": {}}))
    (folder / "logs").mkdir(exist_ok=True)
    (folder / "logs" / "cloud.log").write_text("started\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def table_row(md: str, first_cell: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.fixture
def report(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    before = snapshot(run)
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    return run, before, printed


def test_writes_md_html_and_readable_plots(report):
    from PIL import Image as PILImage
    import numpy as np

    run, _, printed = report
    assert str(run / "report.html") in printed and "report.md" in printed
    for name in ("report.md", "report.html", *PLOTS):
        assert (run / name).is_file(), name
    for name in PLOTS:
        with PILImage.open(run / name) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert 600 <= w <= 2000 and 300 <= h <= 1500, (name, im.size)
            pixels = np.asarray(im.convert("RGB"), dtype=float)
        assert pixels.std() > 10, f"{name} looks blank"
        assert (pixels < 200).any(axis=2).mean() > 0.01, f"{name} has hardly any ink"


def test_input_files_are_left_as_they_were(report):
    run, before, _ = report
    after = snapshot(run)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"report.md", "report.html", *PLOTS}


def test_device_table_numbers(report):
    md = (report[0] / "report.md").read_text()
    header = table_row(md, "device")
    assert header == ["device", "parent", "board", "link", "energy", "steps", "syncs", "mean sync interval (steps)",
                      "mean sync interval (s)", "energy (J)", "acked / rejected"]
    for dev_id, (parent, board, link, kind, _, watts, intervals, acked, rejected) in DEVICES.items():
        steps = sum(intervals) + 3
        row = dict(zip(header, table_row(md, dev_id)))
        assert row == {
            "device": dev_id, "parent": parent, "board": board or "not emulated", "link": link or "not emulated",
            "energy": kind, "steps": str(steps), "syncs": str(len(intervals)),
            "mean sync interval (steps)": f"{statistics.mean(intervals):.1f}",
            # the syncs fall every `interval` steps of STEP_S seconds: the mean gap skips the first cycle
            "mean sync interval (s)": f"{statistics.mean(intervals[1:]) * STEP_S:.1f}",
            "energy (J)": f"{steps * STEP_S * watts:.1f}", "acked / rejected": f"{acked} / {rejected}",
        }, dev_id


def test_node_table_cloud_and_bytes(report):
    md = (report[0] / "report.md").read_text()
    header = table_row(md, "node")
    for edge, pushes in EDGE_PUSHES.items():
        row = dict(zip(header, table_row(md, edge)))
        assert (row["role"], row["parent"], row["pushes up"], row["aggregations"], row["accepted"],
                row["rejected"]) == ("edge", "cloud", str(len(pushes)), "5", "7", "0")
    cloud = dict(zip(header, table_row(md, "cloud")))
    assert (cloud["role"], cloud["accepted"], cloud["rejected"], cloud["final version"],
            cloud["stop reason"]) == ("cloud", "5", "3", "10", "target accuracy")
    best_t, best = max(ACCURACY, key=lambda p: p[1])
    assert f"{ACCURACY[0][1]:.3f} -> best {best:.3f} (at {best_t:.1f} s)" in md
    assert "stopped: target accuracy" in md
    # bytes per tier, summed here from the inputs
    dev_up = sum(device_summary(d)["bytes_up"] for d in DEVICES)
    edges_out = sum(node_summary(e)["bytes_out"] for e in EDGE_PUSHES)
    assert table_row(md, "devices up") == ["devices up", f"{dev_up / 1e6:.3f}"]
    assert table_row(md, "edges out") == ["edges out", f"{edges_out / 1e6:.3f}"]
    assert table_row(md, "cloud in") == ["cloud in", f"{600_000 / 1e6:.3f}"]
    for name in PLOTS:
        assert f"]({name})" in md
    assert "`summary.json`" in md  # the demo's roll-up: named as left out


def test_html_is_self_contained(report):
    run = report[0]
    page = (run / "report.html").read_text()
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(u) for u in uris) == sorted((run / p).read_bytes() for p in PLOTS)
    assert len(re.findall(r"<img\b", page)) == len(PLOTS)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|<link\b|<script\b|@import|url\(", page, re.I)
    assert "<table>" in page and "<style>" in page and "dev02" in page


def test_label_says_board_link_and_energy_kind():
    from tomtit.run_plots import device_label
    from tomtit.run_summaries import device_from_summary

    def label(dev_id: str) -> str:
        return device_label(device_from_summary(device_summary(dev_id), f"{dev_id}.json"))

    assert label("dev00") == "dev00 (pi4, wifi) — emulated"
    assert label("dev03") == "dev03 (not emulated) — measured"


def test_times_share_the_clouds_origin():
    from tomtit.run_plots import Timebase
    from tomtit.run_summaries import Run, device_from_summary, node_from_summary

    devices = (device_from_summary(device_summary("dev01"), "x"),)
    edge = node_from_summary(node_summary("edge0"), "edge0.json")
    with_cloud = Run(Path("."), devices, (node_from_summary(node_summary("cloud"), "c"), edge), ())
    assert Timebase.of(with_cloud).origin == T0
    without_cloud = Run(Path("."), devices, (edge,), ())
    assert Timebase.of(without_cloud).origin == T0 + 0.5  # the edge started first


def test_older_summaries_give_a_report_with_notes(tmp_path, capsys):
    run = write_run(tmp_path / "old", old=True)
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert not (tmp_path / "rep" / "energy_per_device.png").exists()
    assert not (tmp_path / "rep" / "sync_intervals.png").exists()
    assert (tmp_path / "rep" / "accuracy_vs_time.png").is_file()
    assert (tmp_path / "rep" / "edge_pushes.png").is_file()  # each edge from its own start: no started_at
    assert "energy vs time: no device summary has a `timeline`" in md
    assert "no `board` in any device summary" in md
    header = table_row(md, "device")
    assert "board" not in header and "link" not in header and "parent" not in header
    # energy kind inferred from the meter's name when the summary predates `energy_kind`
    assert dict(zip(header, table_row(md, "dev00")))["energy"] == "emulated"
    assert dict(zip(header, table_row(md, "dev03")))["energy"] == "measured"
    assert dict(zip(header, table_row(md, "dev01")))["mean sync interval (steps)"] == "11.0"
    assert len(re.findall(r"data:image/png;base64,", (tmp_path / "rep" / "report.html").read_text())) == 3


def test_out_folder_leaves_the_run_alone(tmp_path):
    run = write_run(tmp_path / "run")
    before = snapshot(run)
    assert main(["report", str(run), "--out", str(tmp_path / "a" / "b")]) == 0
    assert snapshot(run) == before
    assert (tmp_path / "a" / "b" / "report.html").is_file()


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tomtit report: error: "), err
    return err


def test_missing_folder_is_a_clear_error_and_is_not_created(tmp_path, capsys):
    err = _error(capsys, ["report", str(tmp_path / "nope")])
    assert f"{tmp_path / 'nope'}: no such folder" in err
    assert not (tmp_path / "nope").exists()


def test_folder_without_summaries_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text('{"hello": 1}')
    err = _error(capsys, ["report", str(tmp_path / "empty")])
    assert "no device or node summaries" in err and str(tmp_path / "empty") in err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["notes.json"]


def test_corrupt_summary_names_the_file(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    (run / "dev01.json").write_text('{"id": "dev01", "steps": 4')  # cut off mid-write
    before = snapshot(run)
    err = _error(capsys, ["report", str(run)])
    assert f"{run / 'dev01.json'}: corrupt JSON" in err
    assert snapshot(run) == before and not (run / "report.html").exists()


def test_a_file_instead_of_a_folder(tmp_path, capsys):
    (tmp_path / "f.json").write_text("{}")
    assert "not a folder" in _error(capsys, ["report", str(tmp_path / "f.json")])


def test_missing_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    err = _error(capsys, ["report", str(write_run(tmp_path / "run"))])
    assert "tomtit report needs matplotlib: pip install 'tomtit[report]'" in err


# ---- a `tomtit simulate` output folder -----------------------------------------------------------

def simulate_summary() -> dict:
    def run(method: str, setting: str, speed: float) -> dict:
        return {"method": method, "setting": setting, "seed": 0,
                "accuracy": [{"t": t * speed, "accuracy": a, "device_j": t * 40.0} for t, a in ACCURACY],
                "devices": [{"board": b, "sync_times": [5.0, 11.0, 20.0], "intervals": [10, 12, 9]}
                            for b in ("pi4", "pi5")],
                "bytes": {"device_up": 2e6, "device_down": 3e6, "edge_up": 1e6, "edge_down": 1.5e6}}

    def method(setting: str, t: float | None) -> dict:
        reached = t is not None
        return {"best_setting": setting,
                "median": {"reached": int(reached), "seeds": 1, "time_to_target_s": t, "device_energy_j": 900.0,
                           "bytes_device_up": 2e6, "syncs": 12, "final_accuracy": 0.9},
                "grid_seed0": [{"setting": setting, "reached": reached, "time_to_target_s": t, "best_accuracy": 0.9}]}

    return {"bundle": "b", "data": "tiny", "seeds": 1, "workers": 1, "wall_s": 3.0,
            "central": {"best_accuracy": 0.95, "steps": 100},
            "scenarios": {"tiny": {
                "target": {"target_accuracy": 0.9, "fraction": 0.95, "central_accuracy": 0.95},
                "scenario": {"devices": 2, "edges": 1, "alpha": 0.5, "boards": "pi4:1,pi5:1", "links": "wifi:2"},
                "methods": {"ours": method("ours", 12.0), "fedavg": method("fedavg tau=10", None)},
                "ratios": {"fedavg": {"time": None, "energy": None}},
                "runs": [run("ours", "ours", 1.0), run("fedavg", "fedavg tau=10", 2.0)]}}}


def test_simulate_folder_gets_an_html_page(tmp_path):
    out = tmp_path / "sim"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps(simulate_summary()))
    assert main(["report", str(out)]) == 0
    pngs = sorted((out / "tiny").glob("*.png"))
    assert {p.name for p in pngs} == {"accuracy_vs_time.png", "accuracy_vs_energy.png", "sync_intervals.png",
                                      "bytes_per_tier.png"}
    page = (out / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(u) for u in uris) == sorted(p.read_bytes() for p in pngs)
    assert "<h1>tomtit simulate</h1>" in page and "<h2>tiny</h2>" in page
    assert "<td>fedavg tau=10</td>" in page and "<code>pi4:1,pi5:1</code>" in page
    assert "<li>ours: ours: 12 s</li>" in page


def test_incomplete_simulate_summary_is_a_clear_error(tmp_path, capsys):
    broken = simulate_summary()
    del broken["scenarios"]["tiny"]["target"]
    (tmp_path / "summary.json").write_text(json.dumps(broken))
    err = _error(capsys, ["report", str(tmp_path)])
    assert f"{tmp_path / 'summary.json'}: not a complete `tomtit simulate` summary" in err


def test_markdown_subset_round_trips():
    from tomtit.report_doc import Bullets, Heading, Image, Paragraph, Table, parse_markdown, to_markdown

    blocks = [Heading("Run", 1), Paragraph("a `b` c"), Table(("x", "y|z"), (("1", "a|b"),)),
              Bullets(("one", "two")), Image("p.png", "alt"), Paragraph("#5 is not a heading")]
    assert parse_markdown(to_markdown(blocks)) == blocks


# ---- the page in a real browser ------------------------------------------------------------------

CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.target.src || e)), true);
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  const m = document.createElement("pre");
  m.id = "tomtit-check";
  m.textContent = "images " + ok.length + "/" + imgs.length + " errors " + window.__errors.length;
  document.body.appendChild(m);
});
</script>"""


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    msg = "chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CI"):  # CI installs it (.ci/run): a browser test must never pass by not running
        pytest.fail(msg)
    pytest.skip(msg)


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(tmp_path)))


def test_page_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image as PILImage
    import numpy as np

    run = report[0]
    page = (run / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))

    dom = chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path)
    marker = re.search(r'<pre id="tomtit-check">([^<]*)</pre>', dom.stdout)
    assert marker, f"no check marker: rc {dom.returncode}\n{dom.stdout[-1500:]}\n{dom.stderr[-3000:]}"
    assert marker.group(1) == f"images {len(PLOTS)}/{len(PLOTS)} errors 0"
    assert "Uncaught" not in dom.stderr, dom.stderr[-3000:]

    shot = tmp_path / "shot.png"
    r = chromium([f"--screenshot={shot}", "--window-size=1200,2000", (run / "report.html").as_uri()], tmp_path)
    assert shot.is_file(), f"rc {r.returncode}\n{r.stderr[-3000:]}"
    with PILImage.open(shot) as im:
        assert im.size == (1200, 2000)
        pixels = np.asarray(im.convert("RGB"), dtype=float)
    assert pixels.std() > 20, "the screenshot is blank"
    assert (pixels < 200).any(axis=2).mean() > 0.02, "hardly anything drawn on the page"
    # the plots' coloured lines and bars: pixels far from grey
    assert (pixels.max(axis=2) - pixels.min(axis=2) > 80).mean() > 0.001, "no coloured plot visible"
