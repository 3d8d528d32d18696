"""Topic names: built and parsed in one place, never concatenated ad hoc."""
from __future__ import annotations

from dataclasses import dataclass

from tomtit.wire.errors import _ID_RE, WireError, check_id


@dataclass(frozen=True)
class Topics:
    """All topics of one job. Topics are built and parsed here only, never concatenated ad hoc."""

    job: str

    def __post_init__(self) -> None:
        check_id(self.job, "job")

    @property
    def root(self) -> str:
        return f"tomtit/{self.job}"

    def up(self, node: str, child: str) -> str:
        return f"{self.root}/node/{check_id(node, 'node')}/up/{check_id(child, 'child')}"

    def up_filter(self, node: str) -> str:
        return f"{self.root}/node/{check_id(node, 'node')}/up/+"

    def down(self, node: str) -> str:
        return f"{self.root}/node/{check_id(node, 'node')}/down"

    def ack(self, node: str, child: str) -> str:
        return f"{self.root}/node/{check_id(node, 'node')}/ack/{check_id(child, 'child')}"

    def status(self, ident: str) -> str:
        return f"{self.root}/status/{check_id(ident)}"

    def status_filter(self) -> str:
        return f"{self.root}/status/+"

    def telemetry(self, ident: str) -> str:
        return f"{self.root}/telemetry/{check_id(ident)}"

    def telemetry_filter(self) -> str:
        return f"{self.root}/telemetry/+"

    def errors(self, ident: str) -> str:
        return f"{self.root}/errors/{check_id(ident)}"

    def run(self) -> str:
        """Where the cloud publishes the job's RunConfig, retained."""
        return f"{self.root}/run"

    def parse_up(self, topic: str) -> tuple[str, str]:
        """`tomtit/{job}/node/{node}/up/{child}` -> (node, child)."""
        return self._parse_node_topic(topic, "up")

    def parse_ack(self, topic: str) -> tuple[str, str]:
        """`tomtit/{job}/node/{node}/ack/{child}` -> (node, child)."""
        return self._parse_node_topic(topic, "ack")

    def parse_status(self, topic: str) -> str:
        """`tomtit/{job}/status/{id}` -> id."""
        return self._parse_leaf_topic(topic, "status")

    def parse_telemetry(self, topic: str) -> str:
        """`tomtit/{job}/telemetry/{id}` -> id."""
        return self._parse_leaf_topic(topic, "telemetry")

    def _parse_leaf_topic(self, topic: str, kind: str) -> str:
        parts = topic.split("/") if isinstance(topic, str) else []
        if (len(parts) != 4 or parts[:3] != ["tomtit", self.job, kind]
                or _ID_RE.fullmatch(parts[3]) is None):
            raise WireError("bad_topic", f"{topic!r} is not a {kind} topic of job {self.job!r}")
        return parts[3]

    def _parse_node_topic(self, topic: str, leaf: str) -> tuple[str, str]:
        parts = topic.split("/") if isinstance(topic, str) else []
        if (len(parts) != 6 or parts[:3] != ["tomtit", self.job, "node"] or parts[4] != leaf
                or _ID_RE.fullmatch(parts[3]) is None or _ID_RE.fullmatch(parts[5]) is None):
            raise WireError("bad_topic", f"{topic!r} is not a {leaf} topic of job {self.job!r}")
        return parts[3], parts[5]
