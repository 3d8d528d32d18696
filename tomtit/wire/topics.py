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

    # served inference (tomtit.wire.infer): a client asks a device, the device answers on a reply
    # topic under its own name, so a broker ACL can let each device write only its own replies
    def infer_request(self, device: str) -> str:
        return f"{self.root}/infer/{check_id(device, 'device')}/request"

    def infer_request_filter(self) -> str:
        """Requests to any device of the job (a client's ACL)."""
        return f"{self.root}/infer/+/request"

    def infer_reply(self, device: str, token: str) -> str:
        """Where `device` answers the client that chose `token` (one per client or per request)."""
        return f"{self.root}/infer/{check_id(device, 'device')}/reply/{check_id(token, 'reply token')}"

    def infer_reply_filter(self, device: str | None = None) -> str:
        """Replies of `device` (its ACL), or of every device (None: a client's ACL)."""
        return f"{self.root}/infer/{'+' if device is None else check_id(device, 'device')}/reply/+"

    def parse_infer_reply(self, topic: str) -> tuple[str, str]:
        """`tomtit/{job}/infer/{device}/reply/{token}` -> (device, token)."""
        parts = topic.split("/") if isinstance(topic, str) else []
        if (len(parts) != 6 or parts[:3] != ["tomtit", self.job, "infer"] or parts[4] != "reply"
                or _ID_RE.fullmatch(parts[3]) is None or _ID_RE.fullmatch(parts[5]) is None):
            raise WireError("bad_reply_topic", f"{topic!r} is not an inference reply topic of job {self.job!r}")
        return parts[3], parts[5]

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
