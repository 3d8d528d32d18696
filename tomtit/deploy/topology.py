"""Who talks to whom through which broker: the cloud, its edges, their devices.

A topology is either counts (`--devices N --edges E`: devices d00.. dealt to edges e0.. in
contiguous blocks, as `tomtit simulate` does, all behind the cloud's broker) or a TOML file:

    job = "default"            # optional: every topic lives under tomtit/JOB/

    [cloud]
    id = "cloud"               # optional, default "cloud"
    host = "cloud.example.org" # the name or address clients and bridges connect to
    port = 8883                # optional, default 8883

    [[edges]]
    id = "e0"
    devices = ["d00", "d01"]
    host = "10.0.0.5"          # optional: this edge runs its own Mosquitto, bridged to the cloud's;
    port = 8883                # without it the edge and its devices use the cloud's broker

Validated at load: one `DeployError` naming the bad field; unknown keys are errors.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path

from tomtit.deploy.errors import DeployError

DEFAULT_PORT = 8883  # MQTT over TLS
DEFAULT_JOB = "default"
DEFAULT_CLOUD_ID = "cloud"
MONITOR_USER = "monitor"  # the read-only observer: a reserved name, not a node or device id
OPERATOR_USER = "operator"  # the served-inference client (`tomtit infer --remote`): reserved likewise
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # what tomtit.wire's check_id accepts (checked there too)
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class Broker:
    """One Mosquitto: `name` is the node that runs it (its folder under brokers/)."""

    name: str
    host: str  # what clients connect to; the server certificate is issued for it
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return f"mqtts://{host}:{self.port}"


@dataclass(frozen=True)
class Edge:
    id: str
    devices: tuple[str, ...]
    broker: Broker | None  # its own Mosquitto (bridged to the cloud's), or None: the cloud's


@dataclass(frozen=True)
class Topology:
    job: str
    cloud: str
    cloud_broker: Broker
    edges: tuple[Edge, ...]

    def with_job(self, job: str) -> "Topology":
        """The same tree under another job id (`--job` over the file's)."""
        return replace(self, job=_check_id(job, "--job"))

    def broker_of_edge(self, edge: Edge) -> Broker:
        return edge.broker or self.cloud_broker

    @property
    def brokers(self) -> tuple[Broker, ...]:
        return (self.cloud_broker,) + tuple(e.broker for e in self.edges if e.broker is not None)

    def to_toml(self) -> str:
        """The topology as a file `--topology` reads back (no secrets in it)."""
        from tomtit.deploy._toml import toml_str

        lines = [f"job = {toml_str(self.job)}", "", "[cloud]", f"id = {toml_str(self.cloud)}",
                 f"host = {toml_str(self.cloud_broker.host)}", f"port = {self.cloud_broker.port}"]
        for e in self.edges:
            lines += ["", "[[edges]]", f"id = {toml_str(e.id)}",
                      f"devices = [{', '.join(toml_str(d) for d in e.devices)}]"]
            if e.broker is not None:
                lines += [f"host = {toml_str(e.broker.host)}", f"port = {e.broker.port}"]
        return "\n".join(lines) + "\n"


def check_host(value: object, where: str) -> str:
    """A DNS name or an IP address (what goes into the certificate's SAN and the URL)."""
    if not isinstance(value, str) or not value:
        raise DeployError(f"{where} = {value!r}: give a host name or IP address")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise DeployError(f"{where} = {value!r} is neither an IP address nor a valid DNS name")
    return value


def check_port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise DeployError(f"{where} = {value!r} must be an integer port in 1..65535")
    return value


def _check_id(value: object, where: str) -> str:
    from tomtit.wire import WireError, check_id

    try:
        check_id(value, where)
    except WireError:
        raise DeployError(f"{where} = {value!r} must match [A-Za-z0-9_.-]{{1,64}} "
                          f"(it is one MQTT topic level and a file name)") from None
    if value == MONITOR_USER:
        raise DeployError(f"{where} = {value!r} is reserved for the read-only monitor user")
    if value == OPERATOR_USER:
        raise DeployError(f"{where} = {value!r} is reserved for the inference client user")
    return value


def _check_keys(table: object, allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> dict:
    if not isinstance(table, dict):
        raise DeployError(f"{where} must be a table, got {type(table).__name__}")
    for key in table:
        if key not in allowed:
            raise DeployError(f"{where}.{key}: unknown key (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in table:
            raise DeployError(f"{where}.{key}: missing")
    return table


def _unique(ids: list[tuple[str, str]]) -> None:
    seen: dict[str, str] = {}
    for where, ident in ids:
        if ident in seen:
            raise DeployError(f"{where} = {ident!r} is already used by {seen[ident]}: every id must be unique")
        seen[ident] = where


def _unique_endpoints(brokers: list[tuple[str, Broker]]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for where, b in brokers:
        key = (b.host.lower(), b.port)
        if key in seen:
            raise DeployError(f"{where}: {b.host}:{b.port} is already the broker of {seen[key]}; "
                              f"two brokers cannot share a host and port")
        seen[key] = where


def topology_from_dict(raw: dict, source: str = "topology") -> Topology:
    raw = _check_keys(raw, ("job", "cloud", "edges"), ("cloud", "edges"), source)
    job = _check_id(raw.get("job", DEFAULT_JOB), f"{source}: job")
    cloud_t = _check_keys(raw["cloud"], ("id", "host", "port"), ("host",), f"{source}: cloud")
    cloud = _check_id(cloud_t.get("id", DEFAULT_CLOUD_ID), f"{source}: cloud.id")
    cloud_broker = Broker(cloud, check_host(cloud_t["host"], f"{source}: cloud.host"),
                          check_port(cloud_t.get("port", DEFAULT_PORT), f"{source}: cloud.port"))
    edges_raw = raw["edges"]
    if not isinstance(edges_raw, list) or not edges_raw:
        raise DeployError(f"{source}: edges must be a non-empty array of tables ([[edges]])")
    ids: list[tuple[str, str]] = [("cloud.id", cloud)]
    endpoints: list[tuple[str, Broker]] = [("cloud", cloud_broker)]
    edges = []
    for i, t in enumerate(edges_raw):
        where = f"{source}: edges[{i}]"
        t = _check_keys(t, ("id", "devices", "host", "port"), ("id", "devices"), where)
        eid = _check_id(t["id"], f"{where}.id")
        ids.append((f"edges[{i}].id", eid))
        devices = t["devices"]
        if not isinstance(devices, list) or not devices:
            raise DeployError(f"{where}.devices must be a non-empty array of device ids")
        for j, d in enumerate(devices):
            ids.append((f"edges[{i}].devices[{j}]", _check_id(d, f"{where}.devices[{j}]")))
        broker = None
        if "host" in t:
            broker = Broker(eid, check_host(t["host"], f"{where}.host"),
                            check_port(t.get("port", DEFAULT_PORT), f"{where}.port"))
            endpoints.append((f"edges[{i}]", broker))
        elif "port" in t:
            raise DeployError(f"{where}.port is given without {where}.host: an edge broker needs both "
                              f"(without them the edge uses the cloud's broker)")
        edges.append(Edge(eid, tuple(devices), broker))
    _unique(ids)
    _unique_endpoints(endpoints)
    return Topology(job=job, cloud=cloud, cloud_broker=cloud_broker, edges=tuple(edges))


def load_topology(path: str | Path) -> Topology:
    from tomtit.deploy._toml import read_toml

    path = Path(path)
    raw = read_toml(path, "topology")
    return topology_from_dict(raw, str(path))


def topology_from_counts(devices: int, edges: int, *, host: str, port: int = DEFAULT_PORT,
                         job: str = DEFAULT_JOB, cloud: str = DEFAULT_CLOUD_ID) -> Topology:
    """d00.. dealt to e0.. in contiguous blocks (device i -> edge i*E//N), one broker: the cloud's."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise DeployError(f"--devices = {devices!r} must be >= 1")
    if isinstance(edges, bool) or not isinstance(edges, int) or not 1 <= edges <= devices:
        raise DeployError(f"--edges = {edges!r} must be between 1 and --devices ({devices}): "
                          f"every edge needs a device")
    check_host(host, "--host")
    check_port(port, "--port")
    _check_id(job, "--job")
    names = [f"d{i:02d}" for i in range(devices)]
    groups: list[list[str]] = [[] for _ in range(edges)]
    for i, name in enumerate(names):
        groups[i * edges // devices].append(name)
    raw = {"job": job, "cloud": {"id": cloud, "host": host, "port": port},
           "edges": [{"id": f"e{e}", "devices": g} for e, g in enumerate(groups)]}
    return topology_from_dict(raw, "command line")
