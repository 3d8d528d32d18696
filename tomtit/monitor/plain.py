"""Plain lines for logs, pipes and scripts (stdout not a terminal, or --plain): every line starts
with the time and who it is about, then labelled fields, so `grep dev03` or `awk` can follow one
member:

    12:00:03 dev00 device online v5 loss 0.812 energy 12.3 J emulated:pi4 since-sync 3 last 7 (reason) \
out 0 acked 4 rej 0 age 1s parent edge0
    12:00:03 cloud accuracy ▁▃▅▆ 0.812 (4 models)
    12:00:03 cloud held-out loss █▆▃▁ 3.412 ppl 30.3 (4 models)      (a causal-LM run)
    12:00:03 monitor broker mqtt://… job J link connected messages 120 malformed 0 members 4 up 00:00:30

Live, a tick prints only what changed since the last one; a snapshot (--once) prints everything.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tomtit.monitor.rows import DASH, Row, Session, accuracy_lines, header, loss_lines, rows
from tomtit.monitor.state import FleetState


def clock(now: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(now))


def row_line(r: Row, now: float) -> str:
    energy = DASH if r.joules == DASH and r.energy == DASH else f"{r.joules} J {r.energy}"
    return (f"{clock(now)} {r.id} {r.kind} {r.state} v{r.version} loss {r.loss} energy {energy} "
            f"since-sync {r.since_sync} last {r.last_sync} {r.updates} age {r.age} parent {r.parent}")


def header_line(session: Session, state: FleetState, now: float) -> str:
    return f"{clock(now)} monitor " + " ".join(f"{k} {v}" for k, v in header(session, state, now))


def accuracy_line(now: float, ident: str, spark: str, latest: str, points: int) -> str:
    return f"{clock(now)} {ident} accuracy {spark} {latest} ({points} models)"


def loss_line(now: float, ident: str, spark: str, latest: str, points: int) -> str:
    return f"{clock(now)} {ident} held-out loss {spark} {latest} ({points} models)"


def snapshot(session: Session, state: FleetState, now: float) -> list[str]:
    return ([header_line(session, state, now)]
            + [accuracy_line(now, *a) for a in accuracy_lines(state)]
            + [loss_line(now, *a) for a in loss_lines(state)]
            + [row_line(r, now) for r in rows(state, now)])


class PlainSink:
    """Prints, at each tick, the lines whose facts changed since the last tick (ages alone do
    not count: a quiet fleet prints nothing)."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self._seen_rows: dict[str, tuple[str, ...]] = {}
        self._seen_accuracy: dict[str, str] = {}
        self._seen_loss: dict[str, str] = {}
        self._seen_header: tuple[str, ...] = ()

    def __enter__(self) -> "PlainSink":
        return self

    def __exit__(self, *exc) -> None:
        self.out.flush()

    def tick(self, session: Session, state: FleetState, now: float) -> None:
        lines = []
        facts = (session.link, str(state.malformed), str(len(state.members)))
        if facts != self._seen_header:
            self._seen_header = facts
            lines.append(header_line(session, state, now))
        for a in accuracy_lines(state):
            if self._seen_accuracy.get(a[0]) != a[2] + str(a[3]):
                self._seen_accuracy[a[0]] = a[2] + str(a[3])
                lines.append(accuracy_line(now, *a))
        for a in loss_lines(state):
            if self._seen_loss.get(a[0]) != a[2] + str(a[3]):
                self._seen_loss[a[0]] = a[2] + str(a[3])
                lines.append(loss_line(now, *a))
        for r in rows(state, now):
            if self._seen_rows.get(r.id) != r.facts():
                self._seen_rows[r.id] = r.facts()
                lines.append(row_line(r, now))
        if lines:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()  # a pipe is block-buffered: a reader would see nothing for minutes
