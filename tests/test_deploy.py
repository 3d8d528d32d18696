"""`tomtit deploy init`: the files it writes, and the brokers they configure, checked against a real
Mosquitto started on a free port with the generated config (password hashes, TLS, ACLs, bridge)."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import queue
import shutil
import ssl
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tomtit.cli import CliError, main

JOB = "default"


# -- helpers ----------------------------------------------------------------------------------
def deploy(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["deploy", "init", *args])
    return rc, out.getvalue(), err.getvalue()


def read_creds(dep: Path, ident: str) -> dict:
    from tomtit.deploy._toml import tomllib

    return tomllib.loads((dep / "credentials" / f"{ident}.toml").read_text())


def mosquitto_binary() -> str:
    from edge_broker.brokers import BrokerError, find_mosquitto

    try:
        return find_mosquitto()
    except BrokerError as e:
        if os.environ.get("CI"):  # CI installs mosquitto: a broker test must never pass by not running
            pytest.fail(str(e))
        pytest.skip(str(e))


@contextlib.contextmanager
def run_broker(conf: Path, port: int, log: Path):
    from edge_broker.brokers import wait_for_port

    binary = mosquitto_binary()
    with log.open("ab") as fh:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        if not wait_for_port("127.0.0.1", port, 10):
            pytest.fail(f"mosquitto did not start on {port}: {log.read_text()[-1500:]}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Client:
    """A paho client over TLS whose CONNACK, SUBACKs and messages the test can wait for."""

    def __init__(self, port: int, user: str | None, password: str | None, ca: Path):
        import paho.mqtt.client as paho

        self.inbox: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{time.monotonic_ns()}")
        if user is not None:
            self.c.username_pw_set(user, password)
        self.c.tls_set(ca_certs=str(ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.c.on_connect = lambda c, u, flags, rc, props=None: self.connack.put(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, props=None: self.subacks.put(rcs)
        self.c.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", port)  # the TLS handshake happens here
        self.c.loop_start()
        self.rc = self.connack.get(timeout=10)

    def subscribe(self, topic: str) -> None:
        self.c.subscribe(topic, qos=1)
        self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=10)

    def until(self, topic: str, payload: bytes, timeout: float = 10) -> list:
        """Messages received up to and including (topic, payload); fails if it never comes."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append(msg)
            if msg == (topic, payload):
                return seen
        pytest.fail(f"{(topic, payload[:40])} never arrived; got {[(t, p[:40]) for t, p in seen]}")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# -- a deployment and its broker, shared by the module ------------------------------------
@pytest.fixture(scope="module")
def dep(tmp_path_factory) -> tuple[Path, int, str]:
    from edge_broker.brokers import free_port

    port = free_port()
    out = tmp_path_factory.mktemp("deploy") / "dep"
    rc, stdout, err = deploy("--out", str(out), "--devices", "4", "--edges", "2", "--host", "127.0.0.1",
                             "--port", str(port))
    assert rc == 0, err
    return out, port, stdout


@pytest.fixture(scope="module")
def broker(dep):
    out, port, _ = dep
    with run_broker(out / "brokers" / "cloud" / "mosquitto.conf", port, out.parent / "cloud.log"):
        yield


@pytest.fixture
def connect(dep, broker):
    out, port, _ = dep
    clients = []

    def make(ident: str | None, password: str | None = None, ca: Path | None = None) -> Client:
        if ident is not None and password is None:
            password = read_creds(out, ident)["mqtt"]["password"]
        c = Client(port, ident, password, ca or out / "ca" / "ca.crt")
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def topic(kind: str, *levels: str) -> str:
    from tomtit.wire import Topics

    return getattr(Topics(JOB), kind)(*levels)


# -- the files --------------------------------------------------------------------------------
def test_files_secret_modes_and_summary(dep):
    out, port, stdout = dep
    secrets_ = [out / "ca" / "ca.key", *(out / "brokers" / "cloud" / f for f in
                                         ("server.key", "passwd", "acl", "mosquitto.conf")),
                *(out / "credentials").glob("*.toml")]
    assert len(list((out / "credentials").glob("*.toml"))) == 1 + 2 + 4 + 2  # cloud, edges, devices, monitor, operator
    for f in secrets_:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for f in (out / "ca" / "ca.crt", out / "credentials" / "ca.crt", out / "brokers" / "cloud" / "server.crt"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0o044, f
    assert f"mosquitto -c {out}/brokers/cloud/mosquitto.conf" in stdout
    for f in (out / "credentials").glob("*.toml"):  # no secret is printed
        c = read_creds(out, f.stem)
        assert c["mqtt"]["password"] not in stdout
        if "keys" in c:
            assert c["keys"]["signing_key"] not in stdout
    # the devices are dealt to edges in contiguous blocks, as tomtit simulate does (i*E//N)
    assert [read_creds(out, f"d{i:02d}")["identity"]["parent"] for i in range(4)] == ["e0", "e0", "e1", "e1"]
    conf = (out / "brokers" / "cloud" / "mosquitto.conf").read_text().splitlines()
    for line in (f"listener {port}", "allow_anonymous false", "require_certificate false", "persistence true"):
        assert line in conf


def test_server_certificate_names_the_host(dep):
    from cryptography import x509

    out, _, _ = dep
    cert = x509.load_pem_x509_certificate((out / "brokers" / "cloud" / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_refuses_a_non_empty_out_without_force(tmp_path):
    out = tmp_path / "dep"
    out.mkdir()
    (out / "keep").write_text("x")
    rc, _, err = deploy("--out", str(out), "--devices", "2", "--edges", "1")
    assert rc == 2 and "--force" in err and (out / "keep").exists()
    rc, _, err = deploy("--out", str(out), "--devices", "2", "--edges", "1", "--force")
    assert rc == 0, err
    assert not (out / "keep").exists() and (out / "credentials" / "d01.toml").exists()


GOOD = {"cloud": 'id = "cloud"\nhost = "cloud.example.org"',
        "e0": 'id = "e0"\ndevices = ["d00", "d01"]', "e1": 'id = "e1"\ndevices = ["d02"]'}


@pytest.mark.parametrize("change, field", [
    ({"e0": 'id = "e0"\ndevices = ["d00"]\nprot = 1'}, "edges[0].prot"),
    ({"e1": 'id = "e1"\ndevices = ["d/2"]'}, "edges[1].devices[0]"),
    ({"e1": 'id = "e1"\ndevices = ["d01"]'}, "edges[1].devices[0]"),
    ({"cloud": 'id = "cloud"'}, "cloud.host"),
    ({"cloud": 'host = "cloud..example"'}, "cloud.host"),
    ({"e0": 'id = "e0"\ndevices = ["d00"]\nhost = "10.0.0.5"\nport = 70000'}, "edges[0].port"),
    ({"e1": 'id = "monitor"\ndevices = ["d02"]'}, "edges[1].id"),
    ({"e1": 'id = "e1"\ndevices = ["operator"]'}, "edges[1].devices[0]"),
])
def test_a_bad_topology_is_one_error_naming_the_field(tmp_path, change, field):
    parts = {**GOOD, **change}
    path = tmp_path / "topology.toml"
    path.write_text(f"[cloud]\n{parts['cloud']}\n\n[[edges]]\n{parts['e0']}\n\n[[edges]]\n{parts['e1']}\n")
    rc, out, err = deploy("--out", str(tmp_path / "dep"), "--topology", str(path))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and field in err, err
    assert not (tmp_path / "dep").exists()


# -- the credential files ---------------------------------------------------------------------
def test_credentials_load_and_keys_pair_up(dep, tmp_path):
    from tomtit.deploy.credentials import load_credentials

    out, port, _ = dep
    d00, e0, cloud = (load_credentials(out / "credentials" / f"{i}.toml") for i in ("d00", "e0", "cloud"))
    assert (d00.id, d00.role, d00.parent, d00.job, d00.username) == ("d00", "device", "e0", JOB, "d00")
    assert d00.broker == f"mqtts://127.0.0.1:{port}" and d00.ca_file == (out / "credentials" / "ca.crt").resolve()
    assert "password" not in repr(d00) and d00.password not in repr(d00)
    assert set(d00.verify_keys) == {"e0"} and set(e0.verify_keys) == {"cloud", "d00", "d01"}
    assert set(cloud.verify_keys) == {"e0", "e1"}
    # a signature by e0's private key checks out with the copies of e0's public key its peers hold
    sig = e0.private_key().sign(b"model v7")
    d00.public_key("e0").verify(sig, b"model v7")
    cloud.public_key("e0").verify(sig, b"model v7")
    monitor = load_credentials(out / "credentials" / "monitor.toml")
    assert monitor.role == "monitor" and monitor.signing_key is None
    operator = load_credentials(out / "credentials" / "operator.toml")
    assert (operator.role, operator.parent, operator.signing_key) == ("operator", None, None)


def _copy_creds(dep: Path, tmp: Path, ident: str, edit=None, mode: int = 0o600) -> Path:
    shutil.copy(dep / "credentials" / "ca.crt", tmp / "ca.crt")
    text = (dep / "credentials" / f"{ident}.toml").read_text()
    path = tmp / f"{ident}.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(edit(text) if edit else text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('username = "d00"\n', ""), "mqtt.username: missing"),
    (lambda t: t.replace("[mqtt]\n", "[mqtt]\nqos = 1\n"), "mqtt.qos: unknown key"),
    (lambda t: t.replace("mqtts://", "mqtt://"), "mqtt.broker"),
    (lambda t: t.replace('role = "device"', 'role = "boss"'), "identity.role"),
])
def test_credentials_errors_name_the_field(dep, tmp_path, edit, message):
    from tomtit.deploy.credentials import load_credentials
    from tomtit.deploy.errors import DeployError

    path = _copy_creds(dep[0], tmp_path, "d00", edit)
    with pytest.raises(DeployError, match=message):
        load_credentials(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_credentials_readable_by_others_are_refused(dep, tmp_path):
    from tomtit.deploy.credentials import load_credentials
    from tomtit.deploy.errors import DeployError

    path = _copy_creds(dep[0], tmp_path, "d00", mode=0o640)
    with pytest.raises(DeployError, match="chmod 600"):
        load_credentials(path)


def _broker_args(argv: list[str]) -> argparse.Namespace:
    from tomtit.cli.mqtt_args import add_broker_args

    p = argparse.ArgumentParser()
    add_broker_args(p)
    return p.parse_args(argv)


def test_mqtt_options_from_credentials(dep, monkeypatch):
    from tomtit.cli.mqtt_args import mqtt_options

    out, port, _ = dep
    monkeypatch.delenv("TOMTIT_MQTT_PASSWORD", raising=False)
    path = str(out / "credentials" / "d00.toml")
    c = read_creds(out, "d00")["mqtt"]
    o = mqtt_options(_broker_args(["--credentials", path]), "cid")
    assert (o.url, o.username, o.password, o.tls_ca) == (c["broker"], "d00", c["password"],
                                                        str((out / "credentials" / "ca.crt").resolve()))
    o = mqtt_options(_broker_args(["--credentials", path, "--broker", "mqtts://other:1", "--username", "u",
                                   "--password", "p", "--tls-ca", "/x.pem"]), "cid")  # flags win
    assert (o.url, o.username, o.password, o.tls_ca) == ("mqtts://other:1", "u", "p", "/x.pem")
    o = mqtt_options(_broker_args(["--broker", "mqtt://h:1883"]), "cid")  # as before, without credentials
    assert (o.url, o.username, o.password, o.tls_ca) == ("mqtt://h:1883", None, None, None)
    with pytest.raises(CliError, match="--credentials"):
        mqtt_options(_broker_args([]), "cid")
    with pytest.raises(CliError, match="give --job default"):
        mqtt_options(_broker_args(["--credentials", path, "--job", "other"]), "cid")


# -- against Mosquitto running the generated config ------------------------------------------
@pytest.mark.mosquitto
def test_logins(dep, connect):
    assert connect(None, None).rc.is_failure  # anonymous
    assert connect("d00", "not-the-password").rc.is_failure
    assert connect("d00", read_creds(dep[0], "d01")["mqtt"]["password"]).rc.is_failure  # someone else's
    assert not connect("d00").rc.is_failure  # the password mosquitto checks against our $7$ hash


@pytest.mark.mosquitto
def test_transport_connects_with_credentials_file(dep, broker):
    from tomtit.cli.mqtt_args import mqtt_options
    from tomtit.mqtt import MqttTransport

    t = MqttTransport(mqtt_options(_broker_args(["--credentials", str(dep[0] / "credentials" / "e1.toml")]),
                                   f"test-e1-{time.monotonic_ns()}")).start()
    try:
        assert t.wait_connected(10), t.last_error
    finally:
        t.close()


@pytest.mark.mosquitto
def test_a_foreign_ca_fails_the_handshake(dep, broker, tmp_path):
    from tomtit.deploy.pki import make_ca

    other = tmp_path / "other-ca.crt"
    other.write_bytes(make_ca("someone else's CA").cert_pem)
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(dep[1], "d00", read_creds(dep[0], "d00")["mqtt"]["password"], other)


@pytest.mark.mosquitto
def test_a_device_publishes_only_its_own_update(connect):
    e0, e1, d00, d02 = connect("e0"), connect("e1"), connect("d00"), connect("d02")
    e0.subscribe(topic("up_filter", "e0"))
    e1.subscribe(topic("up_filter", "e1"))
    d00.publish(topic("up", "e0", "d01"), b"forged: as d01")  # another device of its edge
    d00.publish(topic("up", "e1", "d00"), b"forged: to another edge")
    d00.publish(topic("up", "e1", "d02"), b"forged: as d02 to another edge")
    own = os.urandom(1_100_000)  # an unchunked ~1 MB message fits the broker's packet limit
    d00.publish(topic("up", "e0", "d00"), own)
    d02.publish(topic("up", "e1", "d02"), b"legit d02")  # published after d00's: arrives after them
    assert e0.until(topic("up", "e0", "d00"), own) == [(topic("up", "e0", "d00"), own)]
    assert e1.until(topic("up", "e1", "d02"), b"legit d02") == [(topic("up", "e1", "d02"), b"legit d02")]


@pytest.mark.mosquitto
def test_a_device_cannot_publish_a_model(connect):
    d01, d00, e0 = connect("d01"), connect("d00"), connect("e0")
    d01.subscribe(topic("down", "e0"))
    d00.publish(topic("down", "e0"), b"forged model")
    d00.publish(topic("down", "e1"), b"forged model")
    e0.publish(topic("down", "e0"), b"model v1")
    assert d01.until(topic("down", "e0"), b"model v1") == [(topic("down", "e0"), b"model v1")]


@pytest.mark.mosquitto
def test_an_edge_publishes_only_as_itself_one_tier_up(connect):
    cloud, e0, e1, d02 = connect("cloud"), connect("e0"), connect("e1"), connect("d02")
    cloud.subscribe(topic("up_filter", "cloud"))
    d02.subscribe(topic("down", "e1"))
    e1.subscribe(topic("down", "cloud"))
    # each forgery and its marker come from the same client, so they arrive in publish order
    e0.publish(topic("up", "cloud", "e1"), b"forged: e0 as e1")
    e0.publish(topic("down", "e1"), b"forged: e0 as e1's model")
    e0.publish(topic("down", "cloud"), b"forged: e0 as the cloud's model")
    e0.publish(topic("up", "cloud", "e0"), b"legit e0 push")
    assert cloud.until(topic("up", "cloud", "e0"), b"legit e0 push") == [(topic("up", "cloud", "e0"), b"legit e0 push")]
    # e0's forgeries were published before its push arrived; now the real owners publish
    e1.publish(topic("down", "e1"), b"e1 model")
    cloud.publish(topic("down", "cloud"), b"cloud model")
    assert d02.until(topic("down", "e1"), b"e1 model") == [(topic("down", "e1"), b"e1 model")]
    assert e1.until(topic("down", "cloud"), b"cloud model") == [(topic("down", "cloud"), b"cloud model")]


@pytest.mark.mosquitto
def test_a_device_reads_only_its_own_acks_and_its_parents_model(connect):
    e0, e1, d01, d02 = connect("e0"), connect("e1"), connect("d01"), connect("d02")
    for t in (topic("ack", "e0", "d00"), topic("down", "e1"), topic("ack", "e0", "d01")):
        d01.subscribe(t)  # the first two are not granted: nothing may arrive from them
    d02.subscribe(topic("down", "e1"))
    e1.publish(topic("down", "e1"), b"another edge's model")
    assert d02.until(topic("down", "e1"), b"another edge's model")  # delivered where it is granted
    e0.publish(topic("ack", "e0", "d00"), b"d00's ack")
    e0.publish(topic("ack", "e0", "d01"), b"d01's ack")  # same client: after d00's ack
    assert d01.until(topic("ack", "e0", "d01"), b"d01's ack") == [(topic("ack", "e0", "d01"), b"d01's ack")]


@pytest.mark.mosquitto
def test_monitor_reads_status_and_cannot_publish(connect):
    mon, e0, d01 = connect("monitor"), connect("e0"), connect("d01")
    mon.subscribe(topic("status_filter"))
    mon.subscribe(topic("up_filter", "e0"))  # not granted: nothing may arrive from it
    e0.subscribe(topic("status_filter"))
    e0.subscribe(topic("up_filter", "e0"))
    mon.publish(topic("status", "d01"), b"forged presence")
    mon.publish(topic("up", "e0", "d01"), b"forged update")
    d01.publish(topic("up", "e0", "d01"), b"legit update")
    d01.publish(topic("status", "d01"), b"online")
    assert e0.until(topic("status", "d01"), b"online") == [(topic("up", "e0", "d01"), b"legit update"),
                                                           (topic("status", "d01"), b"online")]
    assert mon.until(topic("status", "d01"), b"online") == [(topic("status", "d01"), b"online")]


@pytest.mark.mosquitto
def test_operator_asks_any_device_and_each_device_answers_only_as_itself(connect):
    op, mon, d00, d01 = connect("operator"), connect("monitor"), connect("d00"), connect("d01")
    d00.subscribe(topic("infer_request", "d00"))
    d00.subscribe(topic("infer_request", "d01"))  # not granted: another device's requests
    d01.subscribe(topic("infer_request", "d01"))
    op.subscribe(topic("infer_reply_filter"))
    op.subscribe(topic("up_filter", "e0"))  # not granted: the operator sees nothing of training
    mon.publish(topic("infer_request", "d00"), b"forged: the monitor asks")
    d01.publish(topic("up", "e0", "d01"), b"an update")
    op.publish(topic("infer_request", "d01"), b"request to d01")
    op.publish(topic("infer_request", "d00"), b"request to d00")
    assert d00.until(topic("infer_request", "d00"), b"request to d00") == [(topic("infer_request", "d00"),
                                                                             b"request to d00")]
    assert d01.until(topic("infer_request", "d01"), b"request to d01") == [(topic("infer_request", "d01"),
                                                                             b"request to d01")]
    d00.publish(topic("infer_reply", "d01", "op1"), b"forged: d00 as d01")
    d00.publish(topic("down", "e0"), b"forged model")
    d00.publish(topic("infer_reply", "d00", "op1"), b"d00 answers")
    assert op.until(topic("infer_reply", "d00", "op1"), b"d00 answers") == [(topic("infer_reply", "d00", "op1"),
                                                                              b"d00 answers")]


@pytest.mark.mosquitto
def test_edge_brokers_bridge_to_the_cloud(tmp_path):
    from edge_broker.brokers import free_port

    mosquitto_binary()
    cloud_port, edge_port = free_port(), free_port()
    topo = tmp_path / "topology.toml"
    topo.write_text(f'job = "{JOB}"\n[cloud]\nhost = "127.0.0.1"\nport = {cloud_port}\n\n'
                    f'[[edges]]\nid = "e0"\ndevices = ["d00"]\nhost = "localhost"\nport = {edge_port}\n\n'
                    f'[[edges]]\nid = "e1"\ndevices = ["d01"]\n')
    out = tmp_path / "dep"
    rc, stdout, err = deploy("--out", str(out), "--topology", str(topo))
    assert rc == 0, err
    assert f"mosquitto -c {out}/brokers/e0/mosquitto.conf" in stdout
    assert stat.S_IMODE((out / "brokers" / "e0" / "mosquitto.conf").stat().st_mode) == 0o600  # bridge password
    assert read_creds(out, "d00")["mqtt"]["broker"] == f"mqtts://localhost:{edge_port}"
    assert read_creds(out, "d01")["mqtt"]["broker"] == f"mqtts://127.0.0.1:{cloud_port}"
    ca = out / "ca" / "ca.crt"

    def login(port: int, ident: str) -> Client:
        return Client(port, ident, read_creds(out, ident)["mqtt"]["password"], ca)

    with run_broker(out / "brokers" / "cloud" / "mosquitto.conf", cloud_port, tmp_path / "cloud.log"), \
            run_broker(out / "brokers" / "e0" / "mosquitto.conf", edge_port, tmp_path / "e0.log"):
        cloud, e0 = login(cloud_port, "cloud"), login(edge_port, "e0")
        try:
            assert login(cloud_port, "d00").rc.is_failure  # d00 belongs to e0's broker only
            cloud.subscribe(topic("up_filter", "cloud"))
            cloud.publish(topic("down", "cloud"), b"global v1", retain=True)
            e0.subscribe(topic("down", "cloud"))  # arrives through the bridge, once it is up
            e0.until(topic("down", "cloud"), b"global v1", timeout=20)
            e0.publish(topic("up", "cloud", "e0"), b"edge update")
            cloud.until(topic("up", "cloud", "e0"), b"edge update")
            # served inference across the bridge: an operator on the cloud's broker asks d00 on e0's
            op, d00 = login(cloud_port, "operator"), login(edge_port, "d00")
            d00.subscribe(topic("infer_request", "d00"))
            op.subscribe(topic("infer_reply_filter"))
            op.publish(topic("infer_request", "d00"), b"request")
            d00.until(topic("infer_request", "d00"), b"request")
            d00.publish(topic("infer_reply", "d00", "op1"), b"answer")
            op.until(topic("infer_reply", "d00", "op1"), b"answer")
            op.close()
            d00.close()
        finally:
            cloud.close()
            e0.close()


def test_an_edge_of_three_or_more_devices_is_told_to_use_a_trimmed_mean(tmp_path):
    # the field's safe default (README: "A device that poisons"): the hint in each credential file
    rc, _, err = deploy("--out", str(tmp_path / "dep"), "--devices", "8", "--edges", "2")
    assert rc == 0, err
    creds = tmp_path / "dep" / "credentials"
    assert "--strategy trimmed --k 4" in (creds / "e0.toml").read_text()
    assert "--strategy" not in (creds / "cloud.toml").read_text()
    rc, _, err = deploy("--out", str(tmp_path / "small"), "--devices", "4", "--edges", "2")  # 2 per edge
    assert rc == 0, err
    assert "--strategy" not in (tmp_path / "small" / "credentials" / "e0.toml").read_text()
