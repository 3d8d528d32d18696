"""Scenarios and profiles for `tomtit simulate`: typed, frozen, validated with one clear error.

A scenario is a TOML file (see `tomtit/sim/scenarios/`); every key is checked, an unknown key or
an impossible value raises `ScenarioError` naming the field. Profiles (boards and links) come
from `tomtit/profiles.toml` (`tomtit.profiles`), each figure with its source.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tomtit.profiles import Board, Link, ProfileError, Profiles, load_profiles, parse_mix  # noqa: F401 (re-exported)

SCENARIO_DIR = Path(__file__).with_name("scenarios")
EVENT_KINDS = ("leave", "join", "battery", "link", "poison")


# One error for scenarios and the profiles they name: a bad board in a scenario is a bad scenario.
ScenarioError = ProfileError


@dataclass(frozen=True)
class Event:
    t: float  # virtual seconds from the start
    kind: str  # leave | join | battery | link
    device: str  # device id, e.g. "d03"
    value: str | float | None = None  # battery: charge above reserve (0..1); link: a link profile;
    # poison: what the device does to every update from then on, "flip" (-delta) or "scale:F" (F x delta)


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: int = 8  # simulated devices in all
    edges: int = 2  # devices are dealt to edges in contiguous blocks
    boards: str = "pi4:2,pi5:1,orin-nano:1"  # board mix, a pattern dealt over devices in order
    links: str = "wifi"  # link mix, likewise
    edge_link: str = "backhaul"  # edge <-> cloud
    alpha: float = 0.5  # Dirichlet label skew (0.1 strong, 100 ~ IID)
    test_fraction: float = 0.2  # held-out share of the data (stratified)
    eval_examples: int = 300  # held-out examples the cloud scores each global model on
    # The cloud scores the newest global model at most once per this many virtual seconds (a
    # skipped version is superseded by a newer one; a held one is scored at its own publish time,
    # so time-to-target is late by less than this). Why: scoring 300 texts costs ~1.2 s of real
    # CPU, and a method that makes a version every few steps spent most of its run evaluating.
    eval_every_s: float = 0.5
    target_fraction: float = 0.95  # target accuracy = this x centralised fine-tuning's accuracy
    central_steps: int = 300  # steps of the centralised reference run (its best evaluation is used)
    batch: int = 8  # examples per local step
    lr: float = 1e-3  # AdamW learning rate on every device
    reference_step_s: float = 0.065  # one step on the reference core (profiles.toml explains)
    max_virtual_s: float = 7200.0  # a run that has not reached the target by then stops there
    max_device_steps: int = 3000  # compute cap: real training steps per run, all devices together
    seeds: int = 3  # default number of seeds
    strategy: str = "fedbuff"  # aggregation at every node of the asynchronous methods (fedbuff, median, trimmed...)
    # Where devices' updates are aggregated, clip each to this L2 norm before combining (None: off;
    # the nodes' absolute bound max_update_norm applies either way). For poisoning studies.
    clip_norm: float | None = None
    events: tuple[Event, ...] = field(default_factory=tuple)

    def check(self, profiles: Profiles) -> "Scenario":
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ScenarioError(f"scenario {self.name!r}: {name} = {getattr(self, name)!r} {why}")

        need(self.devices >= 1, "devices", "must be >= 1")
        need(1 <= self.edges <= self.devices, "edges", f"must be in [1, devices={self.devices}]")
        need(self.alpha > 0 and math.isfinite(self.alpha), "alpha", "must be > 0")
        need(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        need(self.eval_examples >= 10, "eval_examples", "must be >= 10")
        need(self.eval_every_s >= 0 and math.isfinite(self.eval_every_s), "eval_every_s", "must be >= 0")
        need(0 < self.target_fraction <= 1, "target_fraction", "must be in (0, 1]")
        need(self.central_steps >= 10, "central_steps", "must be >= 10")
        need(self.batch >= 1, "batch", "must be >= 1")
        need(0 < self.lr < 1, "lr", "must be in (0, 1)")
        need(self.reference_step_s > 0, "reference_step_s", "must be > 0")
        need(self.max_virtual_s > 0, "max_virtual_s", "must be > 0")
        need(self.max_device_steps >= 1, "max_device_steps", "must be >= 1")
        need(self.seeds >= 1, "seeds", "must be >= 1")
        parse_mix(self.boards, profiles.boards, f"scenario {self.name!r}: boards")
        parse_mix(self.links, profiles.links, f"scenario {self.name!r}: links")
        if self.edge_link not in profiles.links:
            raise ScenarioError(f"scenario {self.name!r}: edge_link {self.edge_link!r} is not a link profile")
        ids = set(self.device_ids())
        for i, e in enumerate(self.events):
            where = f"scenario {self.name!r}: events[{i}]"
            if e.kind not in EVENT_KINDS:
                raise ScenarioError(f"{where}.kind = {e.kind!r}: choose {', '.join(EVENT_KINDS)}")
            if e.device not in ids:
                raise ScenarioError(f"{where}.device = {e.device!r} is not one of d00..d{self.devices - 1:02d}")
            if not (e.t >= 0 and math.isfinite(e.t)):
                raise ScenarioError(f"{where}.t = {e.t!r} must be >= 0")
            if e.kind == "battery" and not (isinstance(e.value, (int, float)) and 0 <= e.value <= 1):
                raise ScenarioError(f"{where}.value = {e.value!r}: a battery event needs a charge in [0, 1]")
            if e.kind == "link" and e.value not in profiles.links:
                raise ScenarioError(f"{where}.value = {e.value!r}: a link event needs a link profile")
            if e.kind == "poison" and poison_factor(e.value) is None:
                raise ScenarioError(f"{where}.value = {e.value!r}: a poison event needs 'flip' or 'scale:F'")
        if self.clip_norm is not None:
            need(not isinstance(self.clip_norm, bool) and isinstance(self.clip_norm, (int, float))
                 and 0 < self.clip_norm < math.inf, "clip_norm",
                 "must be > 0 (or absent: no clipping)")
        from edge_broker.aggregation import STRATEGIES

        if self.strategy not in STRATEGIES or self.strategy == "fedavg":
            raise ScenarioError(f"scenario {self.name!r}: strategy = {self.strategy!r}: choose one of "
                                f"{', '.join(s for s in STRATEGIES if s != 'fedavg')} (fedavg is the synchronous baseline's)")
        return self

    def device_ids(self) -> list[str]:
        return [f"d{i:02d}" for i in range(self.devices)]

    def edge_of(self, i: int) -> int:
        return i * self.edges // self.devices

    def board_of(self, i: int, profiles: Profiles) -> Board:
        pattern = parse_mix(self.boards, profiles.boards, "boards")
        return profiles.boards[pattern[i % len(pattern)]]

    def link_of(self, i: int, profiles: Profiles) -> Link:
        pattern = parse_mix(self.links, profiles.links, "links")
        return profiles.links[pattern[i % len(pattern)]]


def poison_factor(value: object) -> float | None:
    """The factor a poisoned device multiplies its updates by: "flip" = -1, "scale:F" = F."""
    if value == "flip":
        return -1.0
    if isinstance(value, str) and value.startswith("scale:"):
        try:
            f = float(value[len("scale:"):])
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


_FIELDS = {f.name: f for f in fields(Scenario)}


def scenario_from_dict(raw: dict[str, Any], name: str) -> Scenario:
    raw = dict(raw)
    events_raw = raw.pop("events", [])
    unknown = sorted(set(raw) - set(_FIELDS) - {"description"})
    if unknown:
        raise ScenarioError(f"scenario {name!r}: unknown key {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    raw.pop("description", None)
    values: dict[str, Any] = {"name": raw.pop("name", name)}
    for key, v in raw.items():
        default = _FIELDS[key].default
        if isinstance(default, bool) or isinstance(default, (int, float)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ScenarioError(f"scenario {name!r}: {key} = {v!r} is not a number")
            if isinstance(default, int) and not isinstance(default, bool):
                if isinstance(v, float) and not v.is_integer():
                    raise ScenarioError(f"scenario {name!r}: {key} = {v!r} is not an integer")
                v = int(v)
            else:
                v = float(v)
        elif isinstance(default, str) and not isinstance(v, str):
            raise ScenarioError(f"scenario {name!r}: {key} = {v!r} is not a string")
        values[key] = v
    if not isinstance(events_raw, list):
        raise ScenarioError(f"scenario {name!r}: events must be an array of tables")
    events = []
    for i, e in enumerate(events_raw):
        if not isinstance(e, dict):
            raise ScenarioError(f"scenario {name!r}: events[{i}] is not a table")
        extra = sorted(set(e) - {"t", "kind", "device", "value"})
        if extra:
            raise ScenarioError(f"scenario {name!r}: events[{i}] has unknown key {extra[0]!r}")
        for k in ("t", "kind", "device"):
            if k not in e:
                raise ScenarioError(f"scenario {name!r}: events[{i}].{k} is missing")
        if isinstance(e["t"], bool) or not isinstance(e["t"], (int, float)):
            raise ScenarioError(f"scenario {name!r}: events[{i}].t = {e['t']!r} is not a number")
        events.append(Event(t=float(e["t"]), kind=str(e["kind"]), device=str(e["device"]), value=e.get("value")))
    values["events"] = tuple(events)
    return Scenario(**values)


def shipped_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(spec: str, profiles: Profiles, **overrides: Any) -> Scenario:
    """A shipped scenario by name, or a TOML file by path; `overrides` (non-None) replace fields."""
    path = Path(spec)
    if not path.suffix:
        path = SCENARIO_DIR / f"{spec}.toml"
        if not path.is_file():
            raise ScenarioError(f"no scenario {spec!r}: shipped ones are {', '.join(shipped_scenarios())}, "
                                f"or give a .toml file")
    elif not path.is_file():
        raise ScenarioError(f"scenario file {spec} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"scenario {path}: not valid TOML: {e}") from None
    sc = scenario_from_dict(raw, path.stem)
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        sc = replace(sc, **changes)
    return sc.check(profiles)
