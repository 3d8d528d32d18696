"""Broker connection flags shared by `device run`, `node run` and the demo."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading


def add_broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (required unless --credentials)")
    p.add_argument("--credentials", help="a credential file from `tomtit deploy init`: broker, user name, "
                                         "password and CA (the flags here override it)")
    p.add_argument("--job", help="run id: every topic lives under tomtit/JOB/ (default: the credentials', "
                                 "else 'default')")
    p.add_argument("--username")
    p.add_argument("--password", help="or set TOMTIT_MQTT_PASSWORD (keeps it out of `ps`)")
    p.add_argument("--tls-ca", help="CA certificate for mqtts://")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--mqtt-protocol", choices=["3.1.1", "5"], default="3.1.1")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def mqtt_options(args: argparse.Namespace, client_id: str):
    """Connection options from the flags; with --credentials, the file fills what the flags leave
    out (a password: --password, then TOMTIT_MQTT_PASSWORD, then the file)."""
    from tomtit.cli import CliError
    from tomtit.mqtt import MqttOptions

    url, username, tls_ca = args.broker, args.username, args.tls_ca
    password = args.password if args.password is not None else os.environ.get("TOMTIT_MQTT_PASSWORD")
    if args.credentials is not None:
        from tomtit.deploy.credentials import load_credentials

        creds = load_credentials(args.credentials)
        if args.job is None:
            args.job = creds.job
        if creds.job != args.job:
            raise CliError(f"--credentials {args.credentials} are for job {creds.job!r}, not {args.job!r}: "
                           f"give --job {creds.job} (the broker's ACL only allows that job's topics)")
        url = url if url is not None else creds.broker
        username = username if username is not None else creds.username
        password = password if password is not None else creds.password
        tls_ca = tls_ca if tls_ca is not None else str(creds.ca_file)
    if url is None:
        raise CliError("give --broker mqtt://HOST:PORT, or --credentials FILE from `tomtit deploy init`")
    if args.job is None:
        args.job = "default"
    args.broker = url  # the verbs' messages name the broker in use
    return MqttOptions(
        url=url, client_id=client_id, username=username, password=password,
        tls_ca=tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, protocol=args.mqtt_protocol,
    )


def resolve_identity(args: argparse.Namespace, *, roles: tuple[str, ...], needs_parent: bool):
    """--id, --job and --parent from --credentials where the flags leave them out (a flag that
    disagrees with the file is an error: the broker's ACL only lets the file's identity through).
    Returns the loaded credentials, or None without --credentials."""
    from tomtit.cli import CliError

    creds = None
    if getattr(args, "credentials", None):
        from tomtit.deploy.credentials import load_credentials

        creds = load_credentials(args.credentials)
        if creds.role not in roles:
            raise CliError(f"--credentials {args.credentials} belong to a {creds.role}, not a {' or '.join(roles)}")
        for flag, attr, value in (("--id", "id", creds.id), ("--job", "job", creds.job),
                                  ("--parent", "parent", creds.parent)):
            given = getattr(args, attr)
            if given is None:
                setattr(args, attr, value)
            elif given != value:
                raise CliError(f"{flag} {given!r} disagrees with --credentials {args.credentials} "
                               f"({value!r}); drop the flag or use that identity's file")
    if args.job is None:
        args.job = "default"
    if args.id is None:
        raise CliError("give --id, or --credentials FILE from `tomtit deploy init`")
    if needs_parent and args.parent is None:
        raise CliError("give --parent, or --credentials FILE from `tomtit deploy init`")
    return creds


def signing_keys(creds):
    """(Signer, Keyring) from credentials with keys; (None, None) otherwise (no signatures)."""
    if creds is None or creds.signing_key is None:
        return None, None
    from tomtit.signing import Keyring, Signer

    return (Signer(creds.id, creds.private_key()),
            Keyring({peer: creds.public_key(peer) for peer in creds.verify_keys}))


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
