"""`tomtit device pack`: one folder (or archive) that puts a board into service with no network:
wheels for its platform, the device part of the bundle, device.toml, credentials, a systemd unit
and install.sh; `--verify DIR` checks a pack against its manifest."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub) -> None:
    """Add `pack` to `tomtit device`'s sub-actions."""
    p = sub.add_parser("pack", help="an offline provisioning pack for a board (wheels, bundle, config, unit, "
                                    "install.sh); --verify checks one",
                       description=__doc__.splitlines()[0])
    p.add_argument("--verify", type=Path, metavar="PACK",
                   help="check a pack folder (or .tar.gz) against its pack.json: exit 2 naming the first missing, "
                        "damaged or extra file")
    p.add_argument("--expect", metavar="SHA256",
                   help="with --verify: pack.json's sha256 must be this, the value printed when the pack was built "
                        "(bring it by another channel than the pack: pack.json vouches for every other file, but "
                        "whoever changes the pack can rewrite pack.json too)")
    p.add_argument("--bundle", type=Path, help="the bundle from `tomtit export` (or bundle in --config)")
    p.add_argument("--platform", choices=["linux-aarch64", "linux-x86_64"], help="the board's platform")
    p.add_argument("--python", default="3.11", help="the board's python3 version, e.g. 3.11 (Raspberry Pi OS "
                                                    "and Debian 12); default 3.11")
    p.add_argument("--glibc", default="2.28", help="the board's glibc is at least this (default 2.28: Debian 10+, "
                                                   "Raspberry Pi OS Buster+, Ubuntu 20.04+)")
    p.add_argument("--config", type=Path, help="a device.toml of `tomtit device run` options (broker, id, parent, "
                                               "job, scheduler, energy, threads, ...); the pack adds the board's "
                                               "paths")
    p.add_argument("--credentials", type=Path, help="the device's credential file from `tomtit deploy init` "
                                                    "(its CA goes along)")
    p.add_argument("--data", type=Path, help="the device's examples (.jsonl or .csv) on THIS machine, packed; or a "
                                             "built-in data set name (default: the board finds them at "
                                             "/var/lib/tomtit/data.jsonl)")
    p.add_argument("--board-data", metavar="PATH", help="the device's examples already ON the board (an absolute "
                                                        "path there, e.g. /srv/sensor/x.jsonl): named in device.toml, "
                                                        "not packed")
    p.add_argument("--backend", default="auto", choices=["auto", "portable", "ort-training", "both"],
                   help="training backend(s) to pack: auto = portable (stock onnxruntime, every platform); "
                        "ort-training or both: x86_64 only")
    p.add_argument("--out", type=Path, help="the pack folder to write")
    p.add_argument("--tar", action="store_true", help="write one OUT.tar.gz instead of the folder")
    p.add_argument("--force", action="store_true", help="replace an existing --out: only an empty folder or a "
                                                        "previous pack")
    p.add_argument("--tomtit-wheel", type=Path, help="a wheel of tomtit to pack (default: built from this "
                                                     "checkout)")
    p.add_argument("--find-links", action="append", default=[], metavar="DIR",
                   help="also look for wheels here (pip download --find-links); repeatable")
    p.add_argument("--no-index", action="store_true", help="take wheels only from --find-links (no registry)")
    p.add_argument("--nice", type=int, default=10, help="the unit's Nice= (default 10)")
    p.add_argument("--memory-max", default="1500M", help="the unit's MemoryMax= (default 1500M; a 1 GB board: 700M)")
    p.add_argument("--cpu-quota", default="300%", help="the unit's CPUQuota=, of one core (default 300%%)")
    p.add_argument("--json", action="store_true", help="print the pack's manifest as JSON")
    p.set_defaults(_run=run)


def run(args: argparse.Namespace) -> int:
    from tomtit.cli import CliError
    from tomtit.pack import PackError

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        if args.verify is not None:
            from tomtit.pack.manifest import verify_pack

            manifest = verify_pack(args.verify, expect=args.expect)
            n = len(manifest["files"])
            if args.json:
                print(json.dumps(manifest, indent=1, sort_keys=True))
            else:
                print(f"{args.verify}: OK, {n} files as in pack.json (tomtit {manifest.get('tomtit_version')}, "
                      f"{manifest.get('platform')}, Python {manifest.get('python')}, "
                      f"bundle {manifest.get('bundle_id')})")
                if args.expect is not None:
                    print(f"pack.json sha256 {manifest['pack_sha256']}: as expected")
                else:
                    print(f"pack.json sha256 {manifest['pack_sha256']}: compare it with the one printed when the pack "
                          f"was built (or give --expect SHA256)")
            return 0
        if args.expect is not None:
            raise CliError("--expect goes with --verify PACK")
        if args.platform is None or args.out is None:
            raise CliError("give --platform and --out (or --verify PACK)")
        from tomtit.pack.builder import PackConfig, build_pack
        from tomtit.pack.unit import UnitLimits

        manifest = build_pack(PackConfig(
            platform=args.platform, out=args.out, bundle=args.bundle, python=args.python, glibc=args.glibc,
            config=args.config, credentials=args.credentials, data=args.data, board_data=args.board_data,
            backend=args.backend, tar=args.tar,
            force=args.force, tomtit_wheel=args.tomtit_wheel, find_links=tuple(args.find_links),
            no_index=args.no_index, limits=UnitLimits(nice=args.nice, memory_max=args.memory_max,
                                                      cpu_quota=args.cpu_quota)), log=log)
    except PackError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(manifest, indent=1, sort_keys=True))
    else:
        files = manifest["files"]
        size = {part: sum(e["bytes"] for rel, e in files.items() if rel.startswith(part + "/"))
                for part in ("wheelhouse", "bundle")}
        print(f"wheelhouse {size['wheelhouse'] / 1e6:.1f} MB ({len(manifest['wheels'])} wheels), "
              f"bundle {size['bundle'] / 1e6:.1f} MB ({', '.join(manifest['backends'])})")
        archive = manifest.get("archive")
        if archive:
            folder = Path(archive).name.removesuffix(".tar.gz").removesuffix(".tgz")
            steps = f"copy {archive} to the board, then: tar xzf {Path(archive).name} && sudo sh {folder}/install.sh"
        else:
            steps = f"copy {args.out} to the board, then: sudo sh {args.out.name}/install.sh"
        sha = manifest["pack_sha256"]
        print(f"pack.json sha256 {sha}\n(keep it, and send it to the board's installer by another channel than the "
              f"pack: install.sh prints the same value)")
        print(f"{steps}\n(check a copy first: tomtit device pack --verify {archive or args.out} --expect {sha})")
    return 0
