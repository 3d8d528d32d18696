"""What each member's row says, as strings: shared by the rich view and the plain lines, so both
show the same facts the same way. "—" stands for anything the publisher did not say (an older
agent or node lacks the newer telemetry keys) or said with the wrong type."""
from __future__ import annotations

from dataclasses import dataclass

from tomtit.monitor.state import FleetState, Member, TreeNode

DASH = "—"
SPARK = "▁▂▃▄▅▆▇█"
REASON_CHARS = 32  # a scheduler's reason can be a sentence; the row keeps its start


@dataclass(frozen=True)
class Row:
    id: str
    depth: int  # 0 for a root, +1 per level below it
    group: str  # "tree" (under a cloud) or "unattached"
    kind: str
    parent: str
    state: str
    version: str
    loss: str
    joules: str
    energy: str  # measured | emulated | estimated, with the emulated board/link
    since_sync: str
    last_interval: str
    last_reason: str
    updates: str
    age: str

    @property
    def last_sync(self) -> str:
        """ "7 (reason)"; "—" before the first sync (publishers send interval 0, reason "")."""
        if self.last_interval == DASH or (self.last_interval == "0" and self.last_reason == DASH):
            return DASH
        return f"{self.last_interval} ({self.last_reason})"

    def facts(self) -> tuple[str, ...]:
        """Everything but the age: what changed since the last look (the plain lines' trigger)."""
        return (self.kind, self.parent, self.state, self.version, self.loss, self.joules, self.energy,
                self.since_sync, self.last_interval, self.last_reason, self.updates)


@dataclass(frozen=True)
class Session:
    """What the header says besides the fleet: where we listen and since when."""

    broker: str
    job: str
    started: float
    link: str  # "connected", "connecting", or why the broker refused us


def header(session: Session, state: FleetState, now: float) -> list[tuple[str, str]]:
    """(label, value) pairs, in the order both renderers show them."""
    return [("broker", session.broker), ("job", session.job), ("link", session.link),
            ("messages", str(state.messages)), ("malformed", str(state.malformed)),
            ("members", str(len(state.members))), ("up", duration(now - session.started))]


def rows(state: FleetState, now: float) -> list[Row]:
    """Rows in tree order: each cloud and its subtree, then the unattached subtrees."""
    clouds, orphans = state.tree()
    out: list[Row] = []

    def walk(node: TreeNode, depth: int, group: str) -> None:
        out.append(row(node.member, now, depth=depth, group=group))
        for child in node.children:
            walk(child, depth + 1, group)

    for node in clouds:
        walk(node, 0, "tree")
    for node in orphans:
        walk(node, 0, "unattached")
    return out


def row(m: Member, now: float, *, depth: int = 0, group: str = "tree") -> Row:
    kind = m.kind
    is_device = kind == "device"
    version = m.get("base_version" if is_device else "version", int)
    if version is None and m.presence is not None:
        version = m.presence.version  # presence says it too, only less often
    return Row(
        id=m.id, depth=depth, group=group, kind=kind,
        parent=printable(m.parent or DASH),
        state=m.presence.state if m.presence is not None else DASH,
        version=_int(version),
        # a causal-LM cloud's loss column: its held-out loss (no node sends "loss" of its own)
        loss=_num(m.get("loss", (int, float)) if m.get("loss", (int, float)) is not None
                  else m.get("heldout_loss", (int, float)), "{:.3f}"),
        joules=_num(m.get("joules", (int, float)), "{:,.1f}"),
        energy=energy_label(m),
        since_sync=_int(m.get("steps_since_sync", int)),
        last_interval=_int(m.get("last_interval" if is_device else "last_push_interval", int)),
        last_reason=truncate(m.get("last_reason" if is_device else "last_push_reason", str)),
        updates=updates(m),
        age=age(None if m.last_seen is None else now - m.last_seen),
    )


def energy_label(m: Member) -> str:
    """measured | emulated | estimated, then the emulated board and link: "emulated:pi4/lte-m".
    Older agents say only energy_estimated; that still tells estimated from measured."""
    kind = m.get("energy_kind", str)
    if not kind:
        estimated = m.get("energy_estimated", bool)
        kind = None if estimated is None else ("estimated" if estimated else "measured")
    if kind is None:
        return DASH
    where = "/".join(x for x in (m.get("board", str), m.get("link", str)) if x)
    return printable(f"{kind}:{where}" if where else kind)


def updates(m: Member) -> str:
    """Updates in flight, by tier: a device's outbox; an edge's buffer and its own pushes up; the
    cloud's buffer and what it took in."""
    def n(key: str) -> str:
        return _int(m.get(key, int))

    kind = m.kind
    if kind == "device":
        return f"out {n('outbox')} acked {n('acked')} rej {n('rejected')}"
    if kind == "edge":
        return f"pending {n('pending')} up: out {n('up_outbox')} acked {n('up_acked')} rej {n('up_rejected')}"
    if kind in ("cloud", "node"):
        return f"pending {n('pending')} accepted {n('accepted')} rej {n('rejected')}"
    return DASH


def sparkline(values: list[float], *, lo: float = 0.0, hi: float = 1.0, width: int = 40) -> str:
    """The last `width` values as ▁..█ on a fixed [lo, hi] scale (accuracy: 0..1), so a gain
    from 0.30 to 0.33 looks small and a run's curves compare by eye. Eighths: v in
    [lo + k/8, lo + (k+1)/8) draws SPARK[k]; out-of-range values clamp."""
    out = []
    for v in values[-width:] if width > 0 else []:
        k = int((v - lo) / (hi - lo) * len(SPARK)) if hi > lo else 0
        out.append(SPARK[min(max(k, 0), len(SPARK) - 1)])
    return "".join(out)


def accuracy_lines(state: FleetState, *, width: int = 40) -> list[tuple[str, str, str, int]]:
    """(node id, sparkline, latest accuracy, number of points) per node reporting accuracy."""
    return [(ident, sparkline([p.accuracy for p in points], width=width), f"{points[-1].accuracy:.3f}", len(points))
            for ident, points in state.accuracy_series()]


def loss_lines(state: FleetState, *, width: int = 40) -> list[tuple[str, str, str, int]]:
    """(node id, sparkline, latest loss and perplexity, number of points) per node reporting a
    held-out loss (a causal-LM cloud). A loss has no fixed scale: the sparkline spans the shown
    points' own range (lowest ▁, highest █), so a falling loss draws a falling line."""
    out = []
    for ident, points in state.loss_series():
        shown = [p.loss for p in points[-width:]] if width > 0 else []
        lo, hi = (min(shown), max(shown)) if shown else (0.0, 1.0)
        spark = sparkline(shown, lo=lo, hi=hi if hi > lo else lo + 1.0, width=width)
        last = points[-1]
        latest = f"{last.loss:.3f}" + (f" ppl {last.perplexity:.1f}" if last.perplexity is not None else "")
        out.append((ident, spark, latest, len(points)))
    return out


def truncate(text: str | None, limit: int = REASON_CHARS) -> str:
    if not text:
        return DASH
    text = printable(" ".join(text.split()))  # one line, whatever the scheduler wrote
    return text if len(text) <= limit else text[:limit - 1] + "…"


def printable(text: str) -> str:
    """Publishers' strings reach the operator's terminal: an escape sequence in a reason or a
    board name must not move the cursor or recolour the screen (rich passes ESC through)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def age(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _int(value: int | None) -> str:
    return DASH if value is None else str(value)


def _num(value: float | None, fmt: str) -> str:
    return DASH if value is None else fmt.format(value)
