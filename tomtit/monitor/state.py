"""The monitor's picture of the fleet: a fold of (topic, payload, now) messages into `FleetState`.

No I/O and no clock: the caller says when each message arrived, so the same messages always give
the same state, and tests feed synthetic payloads. Nothing a publisher sends can raise out of
`apply`: a payload that does not decode is counted as malformed and otherwise ignored (an operator's
dashboard must not die of one broken or hostile message).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tomtit.wire import Presence, TelemetryValue, Topics, WireError, decode_presence, decode_telemetry

# Roles a node's telemetry names itself by; devices and older nodes do not say (see Member.kind).
NODE_TIERS = ("cloud", "edge")
MAX_ACCURACY_POINTS = 512  # a sparkline shows the last few dozen; the rest only costs memory


@dataclass(frozen=True)
class AccuracyPoint:
    seen: float  # when the monitor received it
    version: int | None  # the model version it was measured on, when the node says
    accuracy: float


@dataclass(frozen=True)
class LossPoint:
    seen: float  # when the monitor received it
    version: int | None
    loss: float  # a causal LM's held-out mean token cross-entropy (nats)
    perplexity: float | None


@dataclass
class Member:
    """One device or node of the job, as its last messages describe it."""

    id: str
    presence: Presence | None = None  # last retained status/{id}; None until one arrives or after a clear
    telemetry: dict[str, TelemetryValue] = field(default_factory=dict)  # the latest message, whole
    last_seen: float | None = None  # when the monitor last received anything from it
    accuracy: list[AccuracyPoint] = field(default_factory=list)  # the cloud's held-out accuracy over time
    heldout_loss: list[LossPoint] = field(default_factory=list)  # a causal-LM cloud's held-out loss over time

    def get(self, key: str, kind: type | tuple[type, ...]) -> TelemetryValue | None:
        """A telemetry value of the expected type, else None: old publishers lack new keys, and a
        publisher that sends a string where a number belongs shows "—", not a crash."""
        value = self.telemetry.get(key)
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            return None  # JSON true is an int to Python; never show it as 1
        return value if isinstance(value, kind) else None

    @property
    def kind(self) -> str:
        """cloud | edge | device | node (a node of unknown tier) | ? (nothing says yet)."""
        role = self.get("role", str)
        if role in NODE_TIERS:
            return role
        if (self.presence is not None and self.presence.role == "device") or "step" in self.telemetry:
            return "device"
        if (self.presence is not None and self.presence.role == "node") or "aggregations" in self.telemetry:
            return "node"
        return "?"

    @property
    def parent(self) -> str | None:
        """The id it reports to, from its telemetry; None for the cloud ("") and when unknown."""
        return self.get("parent", str) or None


@dataclass(frozen=True)
class TreeNode:
    member: Member
    children: tuple["TreeNode", ...] = ()


@dataclass
class FleetState:
    job: str
    members: dict[str, Member] = field(default_factory=dict)
    messages: int = 0  # every message received, malformed ones included
    malformed: int = 0
    last_malformed: str = ""  # the latest one's reason, for the header

    def __post_init__(self) -> None:
        self._topics = Topics(self.job)  # validates the job id once

    # -- the fold ------------------------------------------------------------------------------
    def apply(self, topic: str, payload: bytes, now: float) -> str | None:
        """Fold one message in; returns the id of the member it changed (None if malformed)."""
        self.messages += 1
        try:
            if topic.startswith(f"{self._topics.root}/status/"):
                return self._apply_status(self._topics.parse_status(topic), payload, now)
            if topic.startswith(f"{self._topics.root}/telemetry/"):
                return self._apply_telemetry(self._topics.parse_telemetry(topic), payload, now)
            raise WireError("bad_topic", f"{topic!r} is neither a status nor a telemetry topic")
        except WireError as e:
            self.malformed += 1
            # the topic is the publisher's to choose: escaped, it cannot drive the terminal
            self.last_malformed = f"{topic if topic.isprintable() else ascii(topic)}: {e}"
            return None

    def _apply_status(self, ident: str, payload: bytes, now: float) -> str:
        if not payload:  # an empty retained message clears the status: the member left the job
            member = self.members.get(ident)
            if member is not None:
                member.presence = None
                if not member.telemetry:
                    del self.members[ident]
            return ident
        presence = decode_presence(payload)
        if presence.id != ident:  # a client speaking for another: trust neither
            raise WireError("bad_schema", f"presence of {presence.id!r} on the status topic of {ident!r}")
        member = self._member(ident, now)
        member.presence = presence
        return ident

    def _apply_telemetry(self, ident: str, payload: bytes, now: float) -> str:
        values = decode_telemetry(payload)
        member = self._member(ident, now)
        member.telemetry = values  # each message is complete: a key it drops is no longer true
        self._note_accuracy(member, now)
        self._note_loss(member, now)
        return ident

    def _note_accuracy(self, member: Member, now: float) -> None:
        # Nodes repeat their latest accuracy every few seconds; a point per new (version, accuracy)
        # makes the sparkline a history of models, not of telemetry ticks.
        acc = member.get("accuracy", (int, float))
        if acc is None:
            return
        version = member.get("version", int)
        last = member.accuracy[-1] if member.accuracy else None
        if last is None or (last.version, last.accuracy) != (version, float(acc)):
            member.accuracy.append(AccuracyPoint(now, version, float(acc)))
            del member.accuracy[:-MAX_ACCURACY_POINTS]

    def _note_loss(self, member: Member, now: float) -> None:
        # a causal-LM cloud reports held-out loss instead of accuracy: one point per new model, likewise
        loss = member.get("heldout_loss", (int, float))
        if loss is None:
            return
        version = member.get("version", int)
        last = member.heldout_loss[-1] if member.heldout_loss else None
        if last is None or (last.version, last.loss) != (version, float(loss)):
            ppl = member.get("perplexity", (int, float))
            member.heldout_loss.append(LossPoint(now, version, float(loss), None if ppl is None else float(ppl)))
            del member.heldout_loss[:-MAX_ACCURACY_POINTS]

    def _member(self, ident: str, now: float) -> Member:
        member = self.members.setdefault(ident, Member(ident))
        member.last_seen = now
        return member

    # -- views of the state --------------------------------------------------------------------
    def tree(self) -> tuple[list[TreeNode], list[TreeNode]]:
        """(clouds with their subtrees, unattached subtrees). A member hangs under the parent its
        telemetry names when that parent is known; clouds are roots; anything else whose parent is
        unknown (old publishers, or a parent not heard from yet) roots a subtree of its own under
        "unattached". Ids sort within each level."""
        children: dict[str, list[str]] = {}
        for ident in sorted(self.members):
            parent = self.members[ident].parent
            if parent is not None and parent in self.members and parent != ident:
                children.setdefault(parent, []).append(ident)
        placed: set[str] = set()

        def build(ident: str) -> TreeNode:
            placed.add(ident)
            kids = [build(c) for c in children.get(ident, []) if c not in placed]  # no cycles
            return TreeNode(self.members[ident], tuple(kids))

        clouds = [build(i) for i in sorted(self.members) if self.members[i].kind == "cloud"]
        orphans = [build(i) for i in sorted(self.members)
                   if i not in placed and (self.members[i].parent not in self.members)]
        # what is left sits on a cycle of parents (a misconfiguration): show it rather than hide it
        orphans += [build(i) for i in sorted(self.members) if i not in placed]
        return clouds, orphans

    def accuracy_series(self) -> list[tuple[str, list[AccuracyPoint]]]:
        """(node id, its accuracy history) for every node that reports accuracy (the cloud)."""
        return [(i, m.accuracy) for i, m in sorted(self.members.items()) if m.accuracy]

    def loss_series(self) -> list[tuple[str, list[LossPoint]]]:
        """(node id, its held-out loss history) for every node that reports one (a causal-LM cloud)."""
        return [(i, m.heldout_loss) for i, m in sorted(self.members.items()) if m.heldout_loss]
