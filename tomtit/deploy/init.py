"""`deploy init`: a whole secured deployment for Mosquitto brokers, written into one folder.

    DIR/topology.toml                 the topology, to edit and re-run with --topology
    DIR/ca/ca.crt, ca.key             the deployment's CA (keep ca.key off the brokers)
    DIR/brokers/NAME/mosquitto.conf   one per broker: TLS listener, password file, ACL, persistence
                    server.crt/.key, passwd, acl, data/
    DIR/credentials/ID.toml, ca.crt   one per cloud, edge, device, `monitor` and `operator`

Everything is written into a staging folder next to DIR and moved into place at the end, so DIR
is either the old deployment or the complete new one. Secrets (keys, passwords, the configs that
hold a bridge password) are created 0600 from the start, never chmod-ed afterwards.
"""
from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from tomtit.deploy import mosquitto_conf as mc
from tomtit.deploy.credentials import Credentials, render_credentials
from tomtit.deploy.errors import DeployError
from tomtit.deploy.pki import make_ca, make_server_cert, make_signing_key
from tomtit.deploy.topology import MONITOR_USER, OPERATOR_USER, Broker, Topology
from tomtit.wire import Topics

CA_NAME = "ca.crt"


@dataclass(frozen=True)
class Identity:
    id: str
    role: str  # device | edge | cloud
    parent: str | None
    broker: Broker  # the broker it connects to
    children: tuple[str, ...] = ()


@dataclass(frozen=True)
class BrokerWritten:
    name: str
    url: str
    conf: Path
    users: tuple[str, ...]
    bridged_to: str | None  # the cloud broker's URL, for an edge broker


@dataclass(frozen=True)
class Deployment:
    """What `init_deployment` wrote (paths only: no secret is ever held here)."""

    out: Path
    job: str
    ca_cert: Path
    ca_key: Path
    brokers: tuple[BrokerWritten, ...]
    credentials: dict[str, Path] = field(default_factory=dict)  # id -> credential file
    roles: dict[str, str] = field(default_factory=dict)  # id -> role
    parents: dict[str, str] = field(default_factory=dict)  # id -> parent id


def identities(topo: Topology) -> list[Identity]:
    out = [Identity(topo.cloud, "cloud", None, topo.cloud_broker, tuple(e.id for e in topo.edges))]
    for e in topo.edges:
        broker = topo.broker_of_edge(e)
        out.append(Identity(e.id, "edge", topo.cloud, broker, e.devices))
        out += [Identity(d, "device", e.id, broker) for d in e.devices]
    return out


def _password() -> str:
    return secrets.token_urlsafe(32)  # 256 bits; URL-safe base64 never contains ':' or spaces


def _write(path: Path, data: str | bytes, *, secret: bool) -> None:
    """Create `path` (never overwrite) with mode 0600 (secret) or 0644, from the first byte."""
    data = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _file_owner() -> str | None:
    """The user Mosquitto should run as when started as root: the owner of the 0600 files."""
    if os.name != "posix":
        return None
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DeployError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DeployError(f"--out {out} is not empty: give --force to replace it "
                          f"(its keys, passwords and broker data are lost)")


def init_deployment(topo: Topology, out: str | Path, *, force: bool = False) -> Deployment:
    out = Path(os.path.abspath(out))
    check_out_dir(out, force)
    if any(e.broker is not None for e in topo.edges) and ":" in topo.cloud_broker.host:
        raise DeployError(f"cloud.host = {topo.cloud_broker.host!r}: an IPv6 literal cannot be a Mosquitto "
                          f"bridge address; give the cloud's broker a DNS name")
    out.parent.mkdir(parents=True, exist_ok=True)
    from tomtit.fsutil import publish_dir, staging_dir

    tmp = staging_dir(out)
    try:
        result = _write_all(topo, tmp, out)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def broker_users(topo: Topology, broker: Broker, t: Topics, passwords: dict[str, str],
                 bridge_passwords: dict[str, str]) -> list[tuple[str, str, str, list[mc.Rule]]]:
    """(user, password, comment, ACL rules) of everyone who logs in to `broker`: on the cloud's,
    the cloud, the edges without a broker of their own and their devices, and one bridge user per
    edge broker; on an edge's, the edge and its devices. The monitor and the operator everywhere."""
    users = []
    if broker.name == topo.cloud:
        users.append((topo.cloud, passwords[topo.cloud], f"cloud node {topo.cloud}",
                      mc.node_rules(t, topo.cloud, None)))
        for e in topo.edges:
            if e.broker is None:
                users.append((e.id, passwords[e.id], f"edge node {e.id}", mc.node_rules(t, e.id, topo.cloud)))
                users += [(d, passwords[d], f"device {d} of edge {e.id}", mc.device_rules(t, d, e.id))
                          for d in e.devices]
            else:
                users.append((e.id, bridge_passwords[e.id], f"the bridge from edge {e.id}'s broker",
                              mc.bridge_rules(t, e.id, topo.cloud, e.devices)))
    else:
        e = next(x for x in topo.edges if x.id == broker.name)
        users.append((e.id, passwords[e.id], f"edge node {e.id}", mc.node_rules(t, e.id, topo.cloud)))
        users += [(d, passwords[d], f"device {d}", mc.device_rules(t, d, e.id)) for d in e.devices]
    users.append((MONITOR_USER, passwords[MONITOR_USER], "read-only monitor: presence and telemetry",
                  mc.monitor_rules(t)))
    users.append((OPERATOR_USER, passwords[OPERATOR_USER], "inference client: requests to devices, their replies",
                  mc.operator_rules(t)))
    return users


def _write_all(topo: Topology, tmp: Path, out: Path) -> Deployment:
    t = Topics(topo.job)
    people = identities(topo)
    passwords = {p.id: _password() for p in people}
    passwords[MONITOR_USER] = _password()
    passwords[OPERATOR_USER] = _password()
    bridge_passwords = {e.id: _password() for e in topo.edges if e.broker is not None}
    keys = {p.id: make_signing_key() for p in people}

    # the CA
    ca = make_ca(f"tomtit {topo.job} deployment CA")
    for d in ("ca", "brokers", "credentials"):
        (tmp / d).mkdir(mode=0o700)
    _write(tmp / "ca" / "ca.crt", ca.cert_pem, secret=False)
    _write(tmp / "ca" / "ca.key", ca.key_pem, secret=True)
    _write(tmp / "credentials" / CA_NAME, ca.cert_pem, secret=False)
    _write(tmp / "topology.toml", topo.to_toml(), secret=False)
    ca_final = out / "ca" / "ca.crt"

    # one Mosquitto per broker: who logs in there, with which rights
    written = []
    for broker in topo.brokers:
        users = broker_users(topo, broker, t, passwords, bridge_passwords)
        bridge = None
        if broker.name != topo.cloud:  # an edge's own broker, bridged to the cloud's
            e = next(x for x in topo.edges if x.id == broker.name)
            bridge = mc.Bridge(name=f"tomtit-{topo.job}-bridge-{e.id}",
                               address=f"{topo.cloud_broker.host}:{topo.cloud_broker.port}",
                               cafile=ca_final, username=e.id, password=bridge_passwords[e.id],
                               topics=tuple(mc.bridge_topics(t, e.id, topo.cloud, e.devices)))

        here, final = tmp / "brokers" / broker.name, out / "brokers" / broker.name
        here.mkdir(mode=0o700)
        (here / "data").mkdir(mode=0o700)
        server = make_server_cert(ca, broker.host)
        _write(here / "server.crt", server.cert_pem, secret=False)
        _write(here / "server.key", server.key_pem, secret=True)
        _write(here / "passwd", mc.render_passwd((u, pw) for u, pw, _, _ in users), secret=True)
        _write(here / "acl", mc.render_acl((u, c, r) for u, _, c, r in users), secret=True)
        files = mc.BrokerFiles(conf=final / "mosquitto.conf", cafile=ca_final, certfile=final / "server.crt",
                               keyfile=final / "server.key", password_file=final / "passwd",
                               acl_file=final / "acl", persistence_dir=final / "data")
        conf = mc.render_conf(name=broker.name, job=topo.job, port=broker.port, files=files,
                              user=_file_owner(), bridge=bridge)
        _write(here / "mosquitto.conf", conf, secret=True)  # a bridge's conf holds its password
        written.append(BrokerWritten(broker.name, broker.url, files.conf, tuple(u for u, *_ in users),
                                     topo.cloud_broker.url if bridge else None))

    # one credential file per identity
    creds: dict[str, Path] = {}
    for p in people:
        peers = ((p.parent,) if p.parent else ()) + p.children
        c = Credentials(id=p.id, role=p.role, job=topo.job, parent=p.parent, broker=p.broker.url,
                        username=p.id, password=passwords[p.id], ca_file=ca_final,
                        signing_key=keys[p.id].private_b64,
                        verify_keys=MappingProxyType({q: keys[q].public_b64 for q in peers}))
        _write(tmp / "credentials" / f"{p.id}.toml",
               render_credentials(c, ca_file=CA_NAME, hint=_run_hint(p, topo.job)), secret=True)
        creds[p.id] = out / "credentials" / f"{p.id}.toml"
    monitor = Credentials(id=MONITOR_USER, role="monitor", job=topo.job, parent=None,
                          broker=topo.cloud_broker.url, username=MONITOR_USER,
                          password=passwords[MONITOR_USER], ca_file=ca_final)
    _write(tmp / "credentials" / f"{MONITOR_USER}.toml",
           render_credentials(monitor, ca_file=CA_NAME,
                              hint="read-only: status/+ and telemetry/+ on any broker of the job"), secret=True)
    creds[MONITOR_USER] = out / "credentials" / f"{MONITOR_USER}.toml"
    operator = Credentials(id=OPERATOR_USER, role="operator", job=topo.job, parent=None,
                           broker=topo.cloud_broker.url, username=OPERATOR_USER,
                           password=passwords[OPERATOR_USER], ca_file=ca_final)
    _write(tmp / "credentials" / f"{OPERATOR_USER}.toml",
           render_credentials(operator, ca_file=CA_NAME,
                              hint="use: tomtit infer --credentials operator.toml --remote DEVICE TEXT... "
                                   "(asks any device of the job; a device's own broker reaches it too)"), secret=True)
    creds[OPERATOR_USER] = out / "credentials" / f"{OPERATOR_USER}.toml"

    return Deployment(out=out, job=topo.job, ca_cert=ca_final, ca_key=out / "ca" / "ca.key",
                      brokers=tuple(written), credentials=creds,
                      roles={**{p.id: p.role for p in people}, MONITOR_USER: "monitor", OPERATOR_USER: "operator"},
                      parents={p.id: p.parent for p in people if p.parent})


def _run_hint(p: Identity, job: str) -> str:
    # the file supplies broker, login, CA, keys and --id/--parent/--job
    if p.role == "device":
        return f"use: tomtit device run --credentials {p.id}.toml --bundle B --data F"
    if p.role == "edge" and len(p.children) >= 3:
        # In the field a credentialed device may be compromised: a trimmed mean withstood a sign-flip
        # and a x30 device at no cost to an honest run (bench/poison.py; README, Deploying to the field)
        # (K = min(5, children): with 4 children the mean of the middle 2 of 4, as studied)
        k = min(5, len(p.children))
        return f"use: tomtit node run --credentials {p.id}.toml --bundle B --strategy trimmed --k {k}"
    return f"use: tomtit node run --credentials {p.id}.toml --bundle B"
