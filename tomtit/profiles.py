"""Board and link profiles (`profiles.toml`, shipped with the package, each figure with its source).

Shared by the virtual-clock testbed (`tomtit simulate`) and by emulated boards in real processes
(`tomtit device run --board pi4 --link wifi`, `tomtit demo --profiles ...`): one table, so a demo
and a simulation of "a Pi 4 on Wi-Fi" mean the same thing. Standard library only (boards import it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tomtit.errors import TomtitError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (boards): the same parser, published as tomli
    import tomli as tomllib  # type: ignore[no-redef]


class ProfileError(TomtitError, ValueError):
    """A profile or profile mix that cannot be used; the message names the bad field or name."""


@dataclass(frozen=True)
class Board:
    name: str
    step_factor: float  # step time / the reference step
    busy_w: float  # whole board, training
    idle_w: float  # whole board, waiting
    source: str
    agg_s_per_update: float = 0.0  # aggregators only: CPU seconds per absorbed update


@dataclass(frozen=True)
class Link:
    name: str
    up_mbps: float
    down_mbps: float
    j_per_mb_up: float
    j_per_mb_down: float
    latency_s: float
    source: str

    def up_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.up_mbps * 1e6)

    def down_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.down_mbps * 1e6)


@dataclass(frozen=True)
class Profiles:
    boards: dict[str, Board]
    links: dict[str, Link]


def load_profiles(path: Path | None = None) -> Profiles:
    text = path.read_text() if path else resources.files("tomtit").joinpath("profiles.toml").read_text()
    raw = tomllib.loads(text)
    boards, links = {}, {}
    for name, b in raw.get("boards", {}).items():
        boards[name] = Board(name=name, step_factor=_pos(b, "step_factor", f"boards.{name}"),
                             busy_w=_pos(b, "busy_w", f"boards.{name}"), idle_w=_nonneg(b, "idle_w", f"boards.{name}"),
                             source=str(b.get("source", "")), agg_s_per_update=float(b.get("agg_s_per_update", 0.0)))
    for name, li in raw.get("links", {}).items():
        w = f"links.{name}"
        links[name] = Link(name=name, up_mbps=_pos(li, "up_mbps", w), down_mbps=_pos(li, "down_mbps", w),
                           j_per_mb_up=_nonneg(li, "j_per_mb_up", w), j_per_mb_down=_nonneg(li, "j_per_mb_down", w),
                           latency_s=_nonneg(li, "latency_s", w), source=str(li.get("source", "")))
    return Profiles(boards, links)


def _num(d: dict, key: str, where: str) -> float:
    if key not in d:
        raise ProfileError(f"{where}.{key} is missing")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProfileError(f"{where}.{key} = {v!r} is not a finite number")
    return float(v)


def _pos(d: dict, key: str, where: str) -> float:
    v = _num(d, key, where)
    if v <= 0:
        raise ProfileError(f"{where}.{key} = {v!r} must be > 0")
    return v


def _nonneg(d: dict, key: str, where: str) -> float:
    v = _num(d, key, where)
    if v < 0:
        raise ProfileError(f"{where}.{key} = {v!r} must be >= 0")
    return v


def resolve_name(name: str, known: dict[str, Any], what: str) -> str:
    """A profile name, or an unambiguous prefix of one (`orin` -> `orin-nano`, `x86` -> `x86-minipc`)."""
    name = name.strip()
    if name in known:
        return name
    matches = [k for k in known if k.startswith(name)] if name else []
    if len(matches) == 1:
        return matches[0]
    hint = f"ambiguous, could be {', '.join(sorted(matches))}" if matches else f"known: {', '.join(sorted(known))}"
    raise ProfileError(f"{what}: unknown profile {name!r} ({hint})")


def parse_mix(spec: str, known: dict[str, Any], what: str) -> tuple[str, ...]:
    """`pi4:2,pi5:1` -> ("pi4", "pi4", "pi5"): a pattern dealt over the devices in order."""
    out: list[str] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, count = part.partition(":")
        name = resolve_name(name, known, what)
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ProfileError(f"{what}: count {count!r} of {name!r} is not an integer") from None
        if n < 1:
            raise ProfileError(f"{what}: count of {name!r} must be >= 1")
        out.extend([name] * n)
    if not out:
        raise ProfileError(f"{what} is empty")
    return tuple(out)
