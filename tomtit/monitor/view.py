"""The rich dashboard: a header, the cloud's accuracy sparkline (a causal LM: its held-out loss),
and one table row per member in tree order (cloud -> edges -> devices, then "unattached"). Only
this module imports rich (the `monitor` extra); the plain lines work without it."""
from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tomtit.monitor.rows import Row, Session, accuracy_lines, header, loss_lines, rows, truncate
from tomtit.monitor.state import FleetState

STATE_STYLE = {"online": "bold green", "offline": "bold red", "finished": "bold blue"}
# "since": local steps since the last sync; "last": steps in the last sync cycle and the
# scheduler's reason for ending it (an edge: updates absorbed per push, and why it pushed)
COLUMNS = ("node", "role", "state", "ver", "loss", "joules", "meter", "since", "last (reason)", "updates", "age")
NUMERIC = ("ver", "loss", "joules", "since")
# On a narrow terminal these give up width first (cut with "…", never wrapped: one line per member);
# the id, state and numbers keep theirs.
SHRINKS_FIRST = ("meter", "last (reason)", "updates")
MALFORMED_CHARS = 160


def render(session: Session, state: FleetState, now: float) -> RenderableType:
    return Group(_header(session, state, now), *_malformed(state), *_accuracy(state), *_loss(state),
                 _table(rows(state, now)))


def _header(session: Session, state: FleetState, now: float) -> Text:
    text = Text("tomtit monitor", style="bold")
    for label, value in header(session, state, now):
        style = ""
        if label == "link" and value != "connected":
            style = "bold red"
        elif label == "malformed" and value != "0":
            style = "yellow"
        text.append("  ·  ")
        text.append(f"{label} ", style="dim")
        text.append(value, style=style)
    return text


def _malformed(state: FleetState) -> list[Text]:
    # which topic sent garbage, and why it was refused: where an operator starts looking
    if not state.malformed:
        return []
    return [Text(f"last malformed: {truncate(state.last_malformed, MALFORMED_CHARS)}", style="yellow")]


def _accuracy(state: FleetState) -> list[Text]:
    out = []
    for ident, spark, latest, points in accuracy_lines(state):
        line = Text(f"{ident} accuracy ", style="dim")
        line.append(spark, style="cyan")
        line.append(f" {latest}", style="bold")
        line.append(f"  ({points} models)", style="dim")
        out.append(line)
    return out


def _loss(state: FleetState) -> list[Text]:
    out = []
    for ident, spark, latest, points in loss_lines(state):
        line = Text(f"{ident} held-out loss ", style="dim")
        line.append(spark, style="cyan")
        line.append(f" {latest}", style="bold")
        line.append(f"  ({points} models)", style="dim")
        out.append(line)
    return out


def _table(table_rows: list[Row]) -> Table:
    table = Table(expand=False, pad_edge=False, show_edge=False, header_style="bold")
    for name in COLUMNS:
        table.add_column(_cut(name), no_wrap=name not in SHRINKS_FIRST, overflow="ellipsis",
                         justify="right" if name in NUMERIC else "left")
    group = "tree"
    for r in table_rows:
        if r.group != group:  # the members no cloud's subtree reaches
            table.add_section()
            table.add_row(Text("unattached", style="dim italic"))
            group = r.group
        indent = "  " * r.depth + ("└ " if r.depth else "")
        table.add_row(Text(indent + r.id, style="bold" if r.depth == 0 else ""), r.kind,
                      Text(r.state, style=STATE_STYLE.get(r.state, "dim")), r.version, r.loss, r.joules,
                      _cut(r.energy), r.since_sync, _cut(r.last_sync), _cut(r.updates), r.age)
    return table


def _cut(text: str) -> Text:
    return Text(text, no_wrap=True, overflow="ellipsis")


class RichSink:
    """Redraws the dashboard on each tick, from the caller's thread (rich's own refresh thread
    would render while the loop mutates the state). Uses the alternate screen, so a fleet taller
    than the terminal is cropped, not scrolled; on close it prints the last frame to the normal
    screen, so the operator keeps it after Ctrl-C."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self._live: Live | None = None
        self._last: RenderableType | None = None

    def __enter__(self) -> "RichSink":
        self._live = Live(console=self.console, auto_refresh=False, screen=True, transient=True,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()
        return self

    def tick(self, session: Session, state: FleetState, now: float) -> None:
        self._last = render(session, state, now)
        if self._live is not None:
            self._live.update(self._last, refresh=True)

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._last is not None:
            self.console.print(self._last)


def print_snapshot(session: Session, state: FleetState, now: float, console: Console | None = None) -> None:
    """One frame, printed (for --once on a terminal)."""
    (console or Console()).print(render(session, state, now))
