"""One identity's credential file (TOML): who it is, how it reaches its broker, its keys.

    [identity]   id, role (device | edge | cloud | monitor | operator), job, parent (device and edge only)
    [mqtt]       broker (mqtts://host:port), username, password, ca_file (relative to the file)
    [keys]       signing_key: its Ed25519 private key, base64 of the raw 32 bytes
    [keys.verify] id = base64 raw Ed25519 public key, for each peer whose messages it checks
                 (a device: its parent; an edge: its parent and children; the cloud: its children)

The monitor and the operator (the served-inference client) have no [keys]. `load_credentials`
refuses a file that group or others can read or write, as ssh does with a private key: a warning
scrolls by in a board's log while the password stays exposed (or replaceable); a refusal is
noticed at once and fixed with one `chmod 600`.
"""
from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from tomtit.deploy._toml import read_toml, toml_str
from tomtit.deploy.errors import DeployError

ROLES = ("device", "edge", "cloud", "monitor", "operator")
_WITHOUT_KEYS = ("monitor", "operator")  # they sign nothing and check no model
_WITH_PARENT = ("device", "edge")
_SECTIONS = {"identity": ("id", "role", "job", "parent"),
             "mqtt": ("broker", "username", "password", "ca_file"),
             "keys": ("signing_key", "verify")}
_REQUIRED = {"identity": ("id", "role", "job"), "mqtt": ("broker", "username", "password", "ca_file"),
             "keys": ("signing_key", "verify")}


@dataclass(frozen=True)
class Credentials:
    id: str
    role: str  # device | edge | cloud | monitor | operator
    job: str
    parent: str | None  # device and edge; None for the cloud and the monitor
    broker: str  # mqtts://host:port
    username: str
    password: str = field(repr=False)
    ca_file: Path  # absolute: the deployment's CA certificate, to check the broker's
    signing_key: str | None = field(repr=False, default=None)  # base64 raw Ed25519 private key
    verify_keys: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # id -> public key
    source: Path | None = field(default=None, compare=False)  # the file it was loaded from

    def private_key(self):
        """The Ed25519 key this identity signs its messages with (cryptography's object)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if self.signing_key is None:
            raise DeployError(f"{self.source or self.id}: the {self.role} has no signing key")
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(self.signing_key))

    def public_key(self, ident: str):
        """The Ed25519 public key of peer `ident` (its parent or one of its children)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if ident not in self.verify_keys:
            raise DeployError(f"{self.source or self.id}: no public key for {ident!r} "
                              f"(known: {', '.join(sorted(self.verify_keys)) or 'none'})")
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.verify_keys[ident]))


def render_credentials(c: Credentials, *, ca_file: str, hint: str = "") -> str:
    """The file's text; `ca_file` as written (relative to the credential file's folder)."""
    lines = [f"# tomtit credentials of {c.role} {c.id!r} in job {c.job!r}.",
             "# SECRET: keep it mode 0600; never commit, print or share it."]
    if hint:
        lines.append(f"# {hint}")
    lines += ["", "[identity]", f"id = {toml_str(c.id)}", f"role = {toml_str(c.role)}", f"job = {toml_str(c.job)}"]
    if c.parent is not None:
        lines.append(f"parent = {toml_str(c.parent)}")
    lines += ["", "[mqtt]", f"broker = {toml_str(c.broker)}", f"username = {toml_str(c.username)}",
              f"password = {toml_str(c.password)}", f"ca_file = {toml_str(ca_file)}  # relative to this file"]
    if c.signing_key is not None:
        lines += ["", "[keys]", "# Ed25519, base64 of the raw 32-byte keys",
                  f"signing_key = {toml_str(c.signing_key)}", "", "[keys.verify]"]
        lines += [f"{toml_str(k)} = {toml_str(v)}" for k, v in c.verify_keys.items()]
    return "\n".join(lines) + "\n"


def _check_private(path: Path) -> None:
    if os.name != "posix":
        return  # no POSIX modes to check
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise DeployError(f"cannot read credentials {path}: {e.strerror}") from None
    if mode & 0o077:
        raise DeployError(f"credentials {path} are accessible to group or others "
                          f"(mode {stat.filemode(mode)}): they hold a password and a private key; "
                          f"run `chmod 600 {path}`")


def _key32(value: object, where: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise DeployError(f"{where} must be base64 of a raw 32-byte Ed25519 key")
    return value


def load_credentials(path: str | Path) -> Credentials:
    """Read and validate one identity's credential file (errors name the file and field)."""
    from tomtit.mqtt import BrokerConfigError, parse_broker_url
    from tomtit.wire import WireError, check_id

    path = Path(path)
    _check_private(path)
    raw = read_toml(path, "credentials")

    def table(name: str, required: bool) -> dict:
        if name not in raw:
            if required:
                raise DeployError(f"{path}: [{name}] is missing")
            return {}
        t = raw[name]
        if not isinstance(t, dict):
            raise DeployError(f"{path}: {name} must be a table")
        for key in t:
            if key not in _SECTIONS[name]:
                raise DeployError(f"{path}: {name}.{key}: unknown key (allowed: {', '.join(_SECTIONS[name])})")
        for key in _REQUIRED[name]:
            if key not in t:
                raise DeployError(f"{path}: {name}.{key}: missing")
        return t

    def text(t: dict, section: str, key: str) -> str:
        value = t[key]
        if not isinstance(value, str) or not value:
            raise DeployError(f"{path}: {section}.{key} must be a non-empty string")
        return value

    def ident(t: dict, section: str, key: str) -> str:
        try:
            return check_id(t[key], f"{section}.{key}")
        except WireError as e:
            raise DeployError(f"{path}: {e.detail}") from None

    for key in raw:
        if key not in _SECTIONS:
            raise DeployError(f"{path}: {key}: unknown key (allowed: {', '.join(_SECTIONS)})")
    idt = table("identity", True)
    role = text(idt, "identity", "role")
    if role not in ROLES:
        raise DeployError(f"{path}: identity.role = {role!r}: choose {', '.join(ROLES)}")
    if role in _WITH_PARENT and "parent" not in idt:
        raise DeployError(f"{path}: identity.parent: missing (a {role} has a parent)")
    if role not in _WITH_PARENT and "parent" in idt:
        raise DeployError(f"{path}: identity.parent: a {role} has no parent")
    mq = table("mqtt", True)
    broker = text(mq, "mqtt", "broker")
    try:
        url = parse_broker_url(broker)
    except BrokerConfigError as e:
        raise DeployError(f"{path}: mqtt.broker: {e}") from None
    if not url.tls:
        raise DeployError(f"{path}: mqtt.broker = {broker!r} must be mqtts:// (the password crosses it)")
    ca_file = path.parent / text(mq, "mqtt", "ca_file")
    if not ca_file.is_file():
        raise DeployError(f"{path}: mqtt.ca_file: {ca_file} does not exist (copy it next to the credentials)")
    keys = table("keys", role not in _WITHOUT_KEYS)
    signing_key, verify = None, {}
    if keys:
        signing_key = _key32(keys["signing_key"], f"{path}: keys.signing_key")
        if not isinstance(keys["verify"], dict):
            raise DeployError(f"{path}: keys.verify must be a table of id = public key")
        for peer, pub in keys["verify"].items():
            try:
                check_id(peer, "keys.verify")
            except WireError as e:
                raise DeployError(f"{path}: {e.detail}") from None
            verify[peer] = _key32(pub, f"{path}: keys.verify.{peer}")
    return Credentials(
        id=ident(idt, "identity", "id"), role=role, job=ident(idt, "identity", "job"),
        parent=ident(idt, "identity", "parent") if "parent" in idt else None,
        broker=broker, username=text(mq, "mqtt", "username"), password=text(mq, "mqtt", "password"),
        ca_file=ca_file.resolve(), signing_key=signing_key, verify_keys=MappingProxyType(verify), source=path)
