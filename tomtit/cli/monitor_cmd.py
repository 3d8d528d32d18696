"""`tomtit monitor`: the operator's live, read-only view of a running job (presence and telemetry)."""
from __future__ import annotations

import argparse

from tomtit.cli.mqtt_args import add_broker_args

RICH_TICK_S = 0.5  # the dashboard redraws twice a second


def register(p: argparse.ArgumentParser) -> None:
    add_broker_args(p)
    p.add_argument("--plain", action="store_true",
                   help="plain, greppable lines even on a terminal (always when stdout is not one)")
    p.add_argument("--interval", type=float, default=5.0,
                   help="plain lines: seconds between reports of what changed")
    p.add_argument("--once", action="store_true", help="print one snapshot after --wait seconds, then exit")
    p.add_argument("--wait", type=float, default=5.0,
                   help="--once: seconds to listen first (presence is retained and arrives at once; "
                        "devices report every 10 steps, nodes every 5 s)")
    p.add_argument("--duration", type=float, help="stop by itself after this many seconds")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import importlib.util
    import logging
    import secrets
    import sys
    import time

    from tomtit.cli import CliError
    from tomtit.cli.mqtt_args import mqtt_options, setup_logging, stop_event_on_signals
    from tomtit.monitor.plain import PlainSink, snapshot
    from tomtit.monitor.runner import subscribe, watch
    from tomtit.monitor.state import FleetState
    from tomtit.mqtt import MqttTransport
    from tomtit.wire import check_id

    dashboard = not args.plain and sys.stdout.isatty()
    if dashboard and importlib.util.find_spec("rich") is None:
        raise CliError("the dashboard needs rich: pip install 'tomtit[monitor]' (or give --plain)")
    options = mqtt_options(args, client_id="tomtit-monitor")  # resolves --job from --credentials
    check_id(args.job, "--job")
    # Many monitors may watch one job, and none should leave a session behind on the broker: a
    # random client id and a clean session (there is nothing to catch up on: status is retained).
    options = dataclasses.replace(options, client_id=f"tomtit-monitor-{args.job}-{secrets.token_hex(4)}",
                                  persistent=False)
    if dashboard:
        # Log lines would tear the full-screen view; the header shows the link's state instead.
        logging.getLogger().addHandler(logging.NullHandler())
    else:
        setup_logging(args, "monitor")
    state = FleetState(args.job)
    stop = stop_event_on_signals()
    transport = MqttTransport(options).start()
    try:
        subscribe(transport, args.job)
        common = dict(broker=args.broker, should_stop=stop.is_set, last_error=lambda: transport.last_error)
        if args.once:
            session = watch(transport, state, _Quiet(), tick_s=args.wait, duration_s=args.wait, **common)
            if not transport.connected and state.messages == 0:
                raise CliError(f"no connection to {args.broker} within {args.wait:g} s ({session.link})")
            now = time.time()
            if dashboard:
                from tomtit.monitor.view import print_snapshot

                print_snapshot(session, state, now)
            else:
                print("\n".join(snapshot(session, state, now)), flush=True)
        elif dashboard:
            from tomtit.monitor.view import RichSink

            with RichSink() as sink:
                watch(transport, state, sink, tick_s=RICH_TICK_S, duration_s=args.duration, **common)
        else:
            with PlainSink() as sink:
                watch(transport, state, sink, tick_s=args.interval, duration_s=args.duration, **common)
    finally:
        transport.close()
    return 0


class _Quiet:
    """--once draws nothing while it listens."""

    def tick(self, session, state, now) -> None:
        pass
