"""MQTT brokers we start ourselves: an embedded amqtt (the pip-only default) and Mosquitto.

Everything else in tomtit takes `--broker mqtt://host:port`, so a user's own broker (Mosquitto,
EMQX, HiveMQ, AWS IoT) works the same. amqtt speaks MQTT 3.1.1 only and is 3-4x slower than
Mosquitto; it is the demo's zero-install default, never the production path. The device and edge
outboxes make either safe: amqtt 0.12.1 was seen to drop QoS 1 messages queued for an offline
persistent session.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tomtit.errors import TomtitError

log = logging.getLogger("tomtit.broker")


class BrokerError(TomtitError):
    """A broker could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass(frozen=True)
class MosquittoConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing a broker is a deliberate choice
    port: int = 1883
    persistence_dir: Path | None = None  # queues and retained messages survive a restart when set
    message_size_limit: int = 64 << 20  # bytes; larger publishes are dropped by the broker
    max_queued_messages: int = 10_000  # per offline persistent client (Mosquitto's default is 1000)
    allow_anonymous: bool = True  # loopback demo; a field deployment sets password_file + ACLs
    password_file: Path | None = None
    acl_file: Path | None = None
    # Started as root, mosquitto switches to the `mosquitto` user and then cannot read the files
    # we wrote into private temp folders (password file, persistence). We stay the invoking user.
    user: str | None = "root" if hasattr(os, "geteuid") and os.geteuid() == 0 else None

    def render(self) -> str:
        lines = [
            "# written by `tomtit broker run --mosquitto`",
            f"listener {self.port} {self.host}",
            "protocol mqtt",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"message_size_limit {self.message_size_limit}",
            f"max_queued_messages {self.max_queued_messages}",
            "max_inflight_messages 20",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if self.persistence_dir is not None:
            lines += ["persistence true", f"persistence_location {self.persistence_dir}/", "autosave_interval 1"]
        else:
            lines += ["persistence false"]
        if self.user is not None:
            lines.append(f"user {self.user}")
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        return "\n".join(lines) + "\n"


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise BrokerError("mosquitto is not installed: `sudo apt-get install mosquitto` (or use the embedded broker)")


class MosquittoProcess:
    """A Mosquitto child process with a generated config: `with MosquittoProcess(cfg) as m:`."""

    def __init__(self, config: MosquittoConfig, workdir: Path | None = None):
        self.config = config
        self.binary = find_mosquitto()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tomtit-mosquitto-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.config.host}:{self.config.port}"

    def start(self, timeout: float = 10.0) -> "MosquittoProcess":
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config.render())
        if self.config.persistence_dir is not None:
            Path(self.config.persistence_dir).mkdir(parents=True, exist_ok=True)
        self._log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=self._log, stderr=subprocess.STDOUT)
        if not wait_for_port(self.config.host, self.config.port, timeout):
            self.stop()
            tail = (self.workdir / "mosquitto.log").read_text(errors="replace")[-1000:]
            raise BrokerError(f"mosquitto did not start on {self.config.host}:{self.config.port}: {tail}")
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "MosquittoProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def amqtt_config(host: str, port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve_embedded(host: str, port: int, stop: asyncio.Event) -> None:
    """Run an amqtt broker until `stop` is set."""
    try:
        from amqtt.broker import Broker
    except ImportError:
        raise BrokerError("the embedded broker needs amqtt: pip install 'tomtit[edge]'") from None
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    broker = Broker(amqtt_config(host, port))
    await broker.start()
    log.info("embedded amqtt broker on mqtt://%s:%d (MQTT 3.1.1)", host, port)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()
