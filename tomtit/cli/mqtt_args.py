"""Broker connection flags shared by `device run`, `node run` and the demo."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading


def add_broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--job", default="default", help="run id: every topic lives under tomtit/JOB/")
    p.add_argument("--username")
    p.add_argument("--password", help="or set TOMTIT_MQTT_PASSWORD (keeps it out of `ps`)")
    p.add_argument("--tls-ca", help="CA certificate for mqtts://")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--mqtt-protocol", choices=["3.1.1", "5"], default="3.1.1")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def mqtt_options(args: argparse.Namespace, client_id: str):
    from tomtit.mqtt import MqttOptions

    return MqttOptions(
        url=args.broker, client_id=client_id, username=args.username,
        password=args.password if args.password is not None else os.environ.get("TOMTIT_MQTT_PASSWORD"),
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, protocol=args.mqtt_protocol,
    )


def setup_logging(args: argparse.Namespace, who: str) -> None:
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format=f"%(asctime)s {who} %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tomtit.mqtt.paho").setLevel(logging.WARNING)


def stop_event_on_signals() -> threading.Event:
    """SIGINT/SIGTERM set an event the main loop polls: the loop ends at a step boundary and
    flushes its state, instead of dying mid-write."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def await_run_config(transport, job: str, bundle_id: str, timeout_s: float, stop: threading.Event):
    """The run's configuration, retained by the cloud on tomtit/{job}/run (None after `timeout_s`).

    A config for another bundle is an error: a child must not train or send against a model
    the rest of the tree does not hold.
    """
    import time

    from tomtit.cli import CliError
    from tomtit.wire import Topics, WireError, decode_run_config

    log = logging.getLogger("tomtit")
    topic = Topics(job).run()
    transport.subscribe(topic, qos=1)
    deadline, next_note = time.monotonic() + timeout_s, time.monotonic() + 10
    while time.monotonic() < deadline and not stop.is_set():
        msg = transport.get(0.2)
        if msg is None:
            if time.monotonic() >= next_note:
                log.info("waiting for the run configuration on %s (the cloud publishes it)", topic)
                next_note += 10
            continue
        if msg.topic != topic or not msg.payload:
            continue
        try:
            cfg = decode_run_config(msg.payload)
        except WireError as e:
            log.error("ignored a malformed run configuration: %s", e)
            continue
        if cfg.bundle_id != bundle_id:
            raise CliError(f"the run {job!r} uses bundle {cfg.bundle_id}, this one is {bundle_id}: "
                           f"give the bundle the cloud runs")
        return cfg
    return None
