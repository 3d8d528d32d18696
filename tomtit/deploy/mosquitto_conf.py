"""Mosquitto 2.0 files for one broker: `mosquitto.conf`, the password file and the ACL file.

Everything here is text rendering from typed inputs; `init.py` decides what goes where and
writes the files.
"""
from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tomtit.wire import Topics

# Mosquitto's own hash (mosquitto_passwd 2.0 writes and the broker reads exactly this):
#   user:$7$<iterations>$<base64 12-byte salt>$<base64 PBKDF2-HMAC-SHA512(password, salt, iterations)>
# The passwords are 256-bit random tokens, so the work factor protects nothing a guesser could
# try; mosquitto_passwd's default of 101 keeps each CONNECT cheap.
PW_ITERATIONS = 101
PW_SALT_BYTES = 12

# Updates are chunked at 1 MB (DeviceConfig/NodeConfig.chunk_bytes); a node's model on `down` is
# one message, ~300 KB for MiniLM-L6 + LoRA. 16 MiB leaves room for larger models; a client that
# sends a bigger packet is disconnected (visible in both logs) rather than silently dropped.
MAX_PACKET_BYTES = 16 << 20
MAX_QUEUED_MESSAGES = 10_000  # per offline persistent session (Mosquitto's default is 1000)

READ, WRITE = "read", "write"
Rule = tuple[str, str]  # (access, topic filter)


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = PW_ITERATIONS) -> str:
    salt = os.urandom(PW_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def render_passwd(users: Iterable[tuple[str, str]]) -> str:
    """`user:hash` lines for (user, password) pairs."""
    return "".join(f"{user}:{password_hash(pw)}\n" for user, pw in users)


# -- ACL rules: who may publish (write) or subscribe (read) what ------------------------------
def _level_filter(topic: str) -> str:
    """`a/b/c` -> `a/b/+`: a filter over one Topics builder's last level, so the layout stays
    defined in tomtit.wire.Topics only."""
    return topic.rsplit("/", 1)[0] + "/+"


def device_rules(t: Topics, device: str, parent: str) -> list[Rule]:
    return [
        (WRITE, t.up(parent, device)),  # its own updates (and their chunks: same topic)
        (WRITE, t.status(device)),  # presence, retained, and its last will
        (WRITE, t.telemetry(device)),
        (READ, t.down(parent)),  # the parent's model
        (READ, t.ack(parent, device)),  # acks for its own updates only
        (READ, t.status(parent)),  # to stop when the parent has finished
        (READ, t.run()),  # the run configuration the cloud retains
        (READ, t.infer_request(device)),  # served inference: requests to it
        (WRITE, t.infer_reply_filter(device)),  # and its answers, under its own name only
    ]


def node_rules(t: Topics, node: str, parent: str | None) -> list[Rule]:
    """An edge (with `parent`) or the cloud (without): its children's tier below, its parent's above."""
    rules = [
        (READ, t.up_filter(node)),  # its children's updates
        (WRITE, t.down(node)),  # its model, retained
        (WRITE, _level_filter(t.ack(node, "x"))),  # acks to its children
        (WRITE, t.errors(node)),
        (WRITE, t.status(node)),
        (WRITE, t.telemetry(node)),
        (READ, t.status_filter()),  # a node tracks the presence of everyone in the job
    ]
    if parent is None:
        rules.append((WRITE, t.run()))  # the cloud publishes the run configuration, retained
    else:
        rules += [
            (WRITE, t.up(parent, node)),
            (READ, t.down(parent)),
            (READ, t.ack(parent, node)),
            (READ, t.run()),
        ]
    return rules


def bridge_rules(t: Topics, edge: str, cloud: str, devices: Sequence[str]) -> list[Rule]:
    """On the cloud's broker, for the bridge of an edge that runs its own broker: exactly what
    `bridge_topics` forwards."""
    return [(READ if direction == "in" else WRITE, topic)
            for topic, direction, _ in bridge_topics(t, edge, cloud, devices)]


def monitor_rules(t: Topics) -> list[Rule]:
    return [(READ, t.status_filter()), (READ, _level_filter(t.telemetry("x")))]


def operator_rules(t: Topics) -> list[Rule]:
    """The served-inference client (`tomtit infer --remote`): asks any device, reads the answers.
    Nothing else: it cannot touch models, updates, acks or presence."""
    return [(WRITE, t.infer_request_filter()), (READ, t.infer_reply_filter())]


def bridge_topics(t: Topics, edge: str, cloud: str, devices: Sequence[str]) -> list[tuple[str, str, int]]:
    """(topic, direction, qos) an edge broker forwards to and from the cloud's."""
    out = [(t.up(cloud, edge), "out", 1), (t.errors(edge), "out", 1)]
    for who in (edge, *devices):  # presence and telemetry of the edge's subtree, for the monitor
        out += [(t.status(who), "out", 1), (t.telemetry(who), "out", 0)]
    for d in devices:  # served inference: an operator on the cloud's broker asks the edge's devices
        out += [(t.infer_request(d), "in", 1), (t.infer_reply_filter(d), "out", 0)]
    return out + [(t.down(cloud), "in", 1), (t.ack(cloud, edge), "in", 1), (t.run(), "in", 1),
                  (t.status(cloud), "in", 1)]


def render_acl(users: Iterable[tuple[str, str, Sequence[Rule]]]) -> str:
    """(user, comment, rules) -> Mosquitto 2.0 ACL text. Anything not granted is denied; lines
    before the first `user` would apply to anonymous clients, and there are none."""
    lines = ["# written by `tomtit deploy init`: anything not listed is denied", ""]
    for user, comment, rules in users:
        lines += [f"# {comment}", f"user {user}"]
        lines += [f"topic {access} {topic}" for access, topic in rules]
        lines.append("")
    return "\n".join(lines)


# -- mosquitto.conf ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Bridge:
    """An edge broker's connection to the cloud's broker. `password` is secret."""

    name: str  # the connection name: also the client ids on both sides
    address: str  # host:port of the cloud's broker
    cafile: Path
    username: str
    password: str = field(repr=False)
    topics: tuple[tuple[str, str, int], ...] = ()


@dataclass(frozen=True)
class BrokerFiles:
    """Absolute paths the config points to (where they will be after `deploy init` finishes)."""

    conf: Path
    cafile: Path
    certfile: Path
    keyfile: Path
    password_file: Path
    acl_file: Path
    persistence_dir: Path


def render_conf(*, name: str, job: str, port: int, files: BrokerFiles, user: str | None,
                bridge: Bridge | None = None) -> str:
    lines = [
        f"# written by `tomtit deploy init`: broker {name!r} of job {job!r}",
        f"# start: mosquitto -c {files.conf}",
        "per_listener_settings false",
        "",
        "# MQTT over TLS on every interface; clients check the server certificate against the",
        "# deployment's CA and log in with a user name and password (no client certificates).",
        f"listener {port}",
        "protocol mqtt",
        f"cafile {files.cafile}",
        f"certfile {files.certfile}",
        f"keyfile {files.keyfile}",
        "require_certificate false",
        "",
        "allow_anonymous false",
        f"password_file {files.password_file}",
        f"acl_file {files.acl_file}",
        "",
        "# queued QoS 1 messages of offline devices and retained models survive a restart",
        "persistence true",
        f"persistence_location {files.persistence_dir}/",
        "autosave_interval 60",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        "max_inflight_messages 20",
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    if user is not None:
        lines += ["",
                  "# Started as root, mosquitto switches to this user: the owner of the 0600 key,",
                  "# password and ACL files. To run as `mosquitto`, chown this folder and edit this line.",
                  f"user {user}"]
    if bridge is not None:
        lines += [
            "",
            "# the bridge to the cloud's broker: it carries this edge's traffic up and the cloud's down",
            f"connection {bridge.name}",
            f"address {bridge.address}",
            f"bridge_cafile {bridge.cafile}",
            "bridge_insecure false",
            "bridge_protocol_version mqttv311",
            f"remote_clientid {bridge.name}",
            f"local_clientid {bridge.name}.local",
            f"remote_username {bridge.username}",
            f"remote_password {bridge.password}",
            "cleansession false",
            "try_private true",
            "notifications false",
            "start_type automatic",
            "restart_timeout 2 30",
        ]
        lines += [f"topic {topic} {direction} {qos}" for topic, direction, qos in bridge.topics]
    return "\n".join(lines) + "\n"
