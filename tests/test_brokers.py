"""Brokers we start and the MQTT transport on them: amqtt (3.1.1), Mosquitto (3.1.1 and 5)."""
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from edge_broker.brokers import MosquittoConfig, free_port, wait_for_port
from tomtit.mqtt import BrokerConfigError, MqttOptions, MqttTransport, parse_broker_url
from tomtit.transport import Will


def roundtrip(url: str, protocol: str = "3.1.1", size: int = 300_000) -> None:
    sub = MqttTransport(MqttOptions(url=url, client_id=f"sub-{protocol}", protocol=protocol)).start()
    pub = MqttTransport(MqttOptions(url=url, client_id=f"pub-{protocol}", protocol=protocol),
                        will=Will("t/status/pub", b"offline")).start()
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        sub.subscribe("t/+/x")
        time.sleep(0.3)
        payload = os.urandom(size)
        pub.publish("t/a/x", payload, qos=1, retain=True)
        assert pub.flush(10)
        msg = sub.get(10)
        assert msg is not None and msg.topic == "t/a/x" and msg.payload == payload
        # a late subscriber gets the retained copy
        late = MqttTransport(MqttOptions(url=url, client_id=f"late-{protocol}", protocol=protocol)).start()
        assert late.wait_connected(10)
        late.subscribe("t/a/x")
        got = late.get(10)
        assert got is not None and got.retain and got.payload == payload
        late.close()
    finally:
        pub.close()
        sub.close()


@pytest.mark.mosquitto
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_mosquitto_roundtrip(mosquitto, protocol):
    roundtrip(mosquitto.url, protocol)


def test_embedded_amqtt_broker_roundtrip(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tomtit", "broker", "run", "--port", str(port)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for_port("127.0.0.1", port, 30)
        roundtrip(f"mqtt://127.0.0.1:{port}", "3.1.1")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_mosquitto_config_and_missing_binary(tmp_path, monkeypatch):
    text = MosquittoConfig(port=1999, persistence_dir=tmp_path / "p", message_size_limit=1 << 20).render()
    assert "listener 1999 127.0.0.1" in text and "persistence true" in text and "message_size_limit 1048576" in text
    assert "persistence false" in MosquittoConfig().render()
    import edge_broker.brokers as b
    monkeypatch.setattr(b.shutil, "which", lambda _: None)
    monkeypatch.setattr(b.Path, "is_file", lambda self: False)
    with pytest.raises(b.BrokerError, match="apt-get install mosquitto"):
        b.find_mosquitto()


def test_broker_urls():
    assert str(parse_broker_url("mqtt://h:1884")) == "mqtt://h:1884"
    assert parse_broker_url("mqtts://h").port == 8883 and parse_broker_url("mqtts://h").tls
    assert parse_broker_url("localhost").port == 1883
    for bad in ("http://h", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(BrokerConfigError):
            parse_broker_url(bad)


def test_unreachable_broker_does_not_crash_the_device(tiny_bundle, tiny_data, tmp_path):
    """No broker: the device logs it, trains offline, keeps its updates in the outbox, exits cleanly."""
    from conftest import run_tomtit

    port = free_port()  # nothing listens here
    r = run_tomtit(["device", "run", "--bundle", str(tiny_bundle), "--data", str(tiny_data),
                    "--broker", f"mqtt://127.0.0.1:{port}", "--parent", "edge", "--id", "lonely",
                    "--scheduler", "fixed:20", "--max-steps", "60", "--state-dir", str(tmp_path / "s"),
                    "--energy", "model:rpi4"], no_torch=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not reachable" in r.stderr
    # Never connected: nothing is handed to paho (the outbox keeps everything until a broker is
    # there), so the link is never "busy" and each sync stages its update as usual.
    assert len(list((tmp_path / "s" / "outbox").glob("*.msg"))) == 3


@pytest.mark.mosquitto
def test_wrong_credentials_give_one_clear_error_and_no_crash(tmp_path, caplog):
    import logging
    import shutil as sh

    from edge_broker.brokers import BrokerError, MosquittoProcess

    if sh.which("mosquitto_passwd") is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto_passwd missing (Debian's mosquitto package ships it)")
        pytest.skip("mosquitto_passwd missing")
    pw = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "dev1", "secret"], check=True)
    cfg = MosquittoConfig(port=free_port(), allow_anonymous=False, password_file=pw)
    try:
        broker = MosquittoProcess(cfg, workdir=tmp_path).start()
    except BrokerError as e:
        pytest.fail(str(e))
    try:
        caplog.set_level(logging.ERROR, logger="tomtit.mqtt")
        bad = MqttTransport(MqttOptions(url=broker.url, client_id="bad", username="dev1", password="wrong",
                                        reconnect_max_s=1)).start()
        assert not bad.wait_connected(4)  # several refused attempts, with backoff
        assert "not authorised" in bad.last_error
        refusals = [r for r in caplog.records if "refused the connection" in r.getMessage()]
        assert len(refusals) == 1  # logged once, not once per retry
        bad.close()
        good = MqttTransport(MqttOptions(url=broker.url, client_id="good", username="dev1", password="secret")).start()
        assert good.wait_connected(10)
        good.close()
    finally:
        broker.stop()
