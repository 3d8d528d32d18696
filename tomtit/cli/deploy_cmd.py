"""`tomtit deploy init`: a secured deployment (CA, Mosquitto configs, ACLs, credentials) in one folder."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    i = sub.add_parser("init", help="write CA, broker configs, ACLs and per-identity credentials into --out")
    i.add_argument("--out", type=Path, required=True, help="the deployment folder (must be empty unless --force)")
    i.add_argument("--topology", type=Path, help="TOML: cloud, edges (optionally each with its own broker), devices")
    i.add_argument("--devices", type=int, help="without --topology: devices d00.. dealt to edges in blocks")
    i.add_argument("--edges", type=int, help="without --topology: edges e0..")
    i.add_argument("--host", help="without --topology: the name or address clients reach the broker at "
                                  "(default localhost)")
    i.add_argument("--port", type=int, help="without --topology: the broker's TLS port (default 8883)")
    i.add_argument("--job", help="the run id every topic lives under (default: the topology's, else 'default')")
    i.add_argument("--force", action="store_true", help="replace a non-empty --out (old keys and passwords are lost)")


def _topology(args: argparse.Namespace):
    from tomtit.cli import CliError
    from tomtit.deploy.topology import DEFAULT_PORT, load_topology, topology_from_counts

    counts = args.devices is not None or args.edges is not None
    if args.topology is not None:
        if counts or args.host is not None or args.port is not None:
            raise CliError("give either --topology FILE or --devices N --edges E [--host H --port P], not both: "
                           "the file sets every broker's host and port")
        topo = load_topology(args.topology)
        return topo if args.job is None else topo.with_job(args.job)
    if args.devices is None or args.edges is None:
        raise CliError("give --topology FILE, or both --devices N and --edges E")
    return topology_from_counts(args.devices, args.edges, host=args.host or "localhost",
                                port=DEFAULT_PORT if args.port is None else args.port,
                                job=args.job or "default")


def run(args: argparse.Namespace) -> int:
    from tomtit.deploy.init import init_deployment

    topo = _topology(args)
    dep = init_deployment(topo, args.out, force=args.force)
    devices = sum(len(e.devices) for e in topo.edges)
    print(f"wrote deployment of job {dep.job!r} to {dep.out}: {len(dep.brokers)} broker(s), 1 cloud, "
          f"{len(topo.edges)} edge(s), {devices} device(s)")
    print(f"  CA certificate  {dep.ca_cert}")
    print(f"  CA key          {dep.ca_key}  (signs broker certificates: keep it off the brokers)")
    for b in dep.brokers:
        via = f", bridged to {b.bridged_to}" if b.bridged_to else ""
        print(f"  broker {b.name:<8} {b.url}{via}: {len(b.users)} users")
        print(f"    start: mosquitto -c {b.conf}")
    cred_dir = dep.credentials[topo.cloud].parent
    print(f"  credentials     {cred_dir}/ID.toml, one per identity (mode 0600) and ca.crt:")
    print("                  copy each ID.toml with ca.crt to its machine and pass --credentials ID.toml")
    first_edge = topo.edges[0]
    print(f"    e.g. tomtit device run --credentials {dep.credentials[first_edge.devices[0]]} --bundle B --data F"
          f"   (the file gives --id {first_edge.devices[0]}, --parent {first_edge.id}, --job {dep.job})")
    print(f"  monitor         {dep.credentials['monitor']}  (read-only: status and telemetry)")
    print(f"  operator        {dep.credentials['operator']}  (tomtit infer --remote DEVICE: served inference)")
    return 0
