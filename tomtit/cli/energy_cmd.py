"""`tomtit energy`: which energy meter this device would use, and a short reading with it."""
from __future__ import annotations

import argparse
import json
import time

from device_runtime.energy import METER_SPECS, Detection, EnergyMeter, detect
from tomtit.cli import CliError

MAX_SECONDS = 600.0  # a check, not a logger: keep it from running unattended for hours
SAMPLE_EVERY_S = 0.05  # like the agent, read the meter between small units of work ("steps")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meter", default="auto", metavar="SPEC",
                        help=f"meter to use: {' | '.join(METER_SPECS)} (default: auto)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="how long to read while doing busy work (default: 1.0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _busy_step() -> None:
    # A little pure-Python CPU work, so a model estimate and a real meter both see load.
    sum(i * i for i in range(20_000))


def _measure(meter: EnergyMeter, seconds: float) -> tuple[float, float]:
    """(joules, elapsed seconds) over `seconds` of busy work, reading the meter every step."""
    start_j, start = meter.joules(), time.monotonic()
    next_read = start + SAMPLE_EVERY_S
    while (now := time.monotonic()) - start < seconds:
        _busy_step()
        if now >= next_read:
            meter.joules()
            next_read = now + SAMPLE_EVERY_S
    end_j, end = meter.joules(), time.monotonic()
    return end_j - start_j, end - start


def _report(det: Detection, joules: float, seconds: float) -> dict[str, object]:
    meter = det.meter
    return {
        "meter": meter.name,
        "estimated": meter.estimated,
        "source": meter.source,
        "joules": joules,
        "watts": joules / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "reserve_fraction": meter.reserve_fraction(),
        "tried": [{"meter": p.meter, "available": p.available, "reason": p.reason} for p in det.tried],
    }


def _print_text(rep: dict[str, object], det: Detection) -> None:
    label = " (ESTIMATED from a power profile, not measured)" if rep["estimated"] else " (measured)"
    print(f"energy meter: {rep['meter']}{label}")
    print(f"  source: {rep['source']}")
    if len(det.tried) > 1:
        print("  tried:")
        for p in det.tried:
            print(f"    {p.meter:<14} {'yes' if p.available else 'no ':<4} {p.reason}")
    print(f"reading over {rep['seconds']:.2f} s of busy work: {rep['joules']:.3f} J, "
          f"{rep['watts']:.2f} W mean")
    reserve = det.meter.reserve_fraction()
    print(f"battery reserve: {'unknown' if reserve is None else f'{100 * reserve:.0f} %'}")


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.seconds <= MAX_SECONDS:
        raise CliError(f"--seconds must be in (0, {MAX_SECONDS:g}], got {args.seconds:g}")
    det = detect(args.meter)  # EnergyMeterError (a TomtitError) names why a forced meter fails
    joules, seconds = _measure(det.meter, args.seconds)
    rep = _report(det, joules, seconds)
    if args.json:
        print(json.dumps(rep))
    else:
        _print_text(rep, det)
    return 0
