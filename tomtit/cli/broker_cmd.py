"""`tomtit broker run`: the embedded amqtt broker (default) or a configured Mosquitto."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("run", help="run a broker on HOST:PORT until Ctrl-C")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=1883)
    r.add_argument("--mosquitto", action="store_true", help="run Debian's mosquitto with a generated config")
    r.add_argument("--persistence", type=Path, help="mosquitto: keep queues/retained messages in this folder")
    r.add_argument("--max-message-mb", type=int, default=64)
    r.add_argument("--write-config", type=Path, help="mosquitto: only write the config file here and exit")


def run(args: argparse.Namespace) -> int:
    from edge_broker.brokers import MosquittoConfig, MosquittoProcess, serve_embedded

    logging.basicConfig(level=logging.INFO, format="%(asctime)s broker %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.mosquitto or args.write_config:
        cfg = MosquittoConfig(host=args.host, port=args.port, persistence_dir=args.persistence,
                              message_size_limit=args.max_message_mb << 20)
        if args.write_config:
            args.write_config.write_text(cfg.render())
            print(f"mosquitto config -> {args.write_config}")
            return 0
        with MosquittoProcess(cfg) as m:
            print(f"mosquitto on {m.url} (config {m.workdir / 'mosquitto.conf'}); Ctrl-C to stop", flush=True)
            # Block the signals and wait for one, so Ctrl-C or SIGTERM always stops mosquitto too.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_embedded(args.host, args.port, stop)

    asyncio.run(main())
    return 0
