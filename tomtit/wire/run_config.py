"""The run's configuration: one small JSON message the cloud publishes, retained, on
`tomtit/{job}/run` (`Topics.run()`), so every node and device takes the settings that must agree
across the tree from one place instead of from flags that have to be set to match by hand.

Unlike the other control messages, a RunConfig with a key this version does not know is refused,
not ignored: a child must not run on while silently dropping a setting of the run. Only what the
message says about itself is checked here; whether a scheduler spec names a known scheduler is
for the scheduler factory that builds it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from tomtit.wire.codec import CODECS
from tomtit.wire.control import MAX_SMALL_JSON_BYTES, _json_encode, _json_object, _str_field
from tomtit.wire.errors import WireError, _float_field, _int_field, _short, check_id

# `kind[:key=value,...]`, e.g. "marginal", "fixed:10", "marginal:tau_min=2,tau_max=50"
_SCHEDULER_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:=,+-]{0,127}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What every node and device of one run must agree on. Retained on `run`; validated on
    construction, so a sender cannot publish one a receiver would refuse."""

    job: str  # the run id: a child checks it holds the config of the run it was started for
    bundle_id: str  # the manifest's bundle id: a child with another bundle must not train or send
    up_codec: str  # "f32" | "f16" | "int8": the codec children encode updates with (nodes size limits by it)
    device_scheduler: str  # when devices sync: a scheduler spec such as "marginal" or "fixed:10"
    edge_scheduler: str  # when edge nodes push to their parent: a spec in the same language
    k_updates: int  # buffer size K at every node: apply after K updates, so tiers move alike (>= 1)
    max_wait_s: float  # ...or this long after the first buffered one, so a quiet tier still moves (> 0)
    max_staleness: int  # every node rejects updates more than this many versions old (>= 0)
    staleness_exponent: float  # a in the (1+s)^-a weight: one value, so every tier discounts alike (>= 0)
    target_accuracy: float | None  # the cloud finishes once it evaluates this well, in (0, 1]; None: never
    deadline_s: float | None  # the cloud stops this many seconds after created_at (> 0); None: no limit
    created_at: float  # cloud's wall clock at making, seconds since the epoch; deadline_s counts from it

    def __post_init__(self) -> None:
        # every check names the field; numbers are normalised to plain int/float (numpy ones too)
        check_id(self.job, "job")
        check_id(self.bundle_id, "bundle_id")
        if self.up_codec not in CODECS:
            raise WireError("bad_codec", f"up_codec {_short(repr(self.up_codec), 40)} is not one of {CODECS}")
        _str_field(self.device_scheduler, "device_scheduler", _SCHEDULER_RE)
        _str_field(self.edge_scheduler, "edge_scheduler", _SCHEDULER_RE)
        _set(self, "k_updates", _int_field(self.k_updates, "k_updates", "bad_schema", minimum=1))
        _set(self, "max_wait_s", _positive(self.max_wait_s, "max_wait_s"))
        _set(self, "max_staleness", _int_field(self.max_staleness, "max_staleness", "bad_schema"))
        _set(self, "staleness_exponent",
             _float_field(self.staleness_exponent, "staleness_exponent", nonneg=True, reason="bad_schema"))
        if self.target_accuracy is not None:
            acc = _float_field(self.target_accuracy, "target_accuracy", nonneg=False, reason="bad_schema")
            if not 0 < acc <= 1:
                raise WireError("bad_schema", f"target_accuracy must be in (0, 1], got {acc}")
            _set(self, "target_accuracy", acc)
        if self.deadline_s is not None:
            _set(self, "deadline_s", _positive(self.deadline_s, "deadline_s"))
        _set(self, "created_at", _float_field(self.created_at, "created_at", nonneg=True, reason="bad_schema"))


_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))


def _set(cfg: RunConfig, name: str, value: object) -> None:
    object.__setattr__(cfg, name, value)  # frozen: only __post_init__ normalises


def _positive(value: object, what: str) -> float:
    x = _float_field(value, what, nonneg=False, reason="bad_schema")
    if not x > 0:
        raise WireError("bad_schema", f"{what} must be > 0, got {x}")
    return x


def encode_run_config(cfg: RunConfig) -> bytes:
    return _json_encode(dataclasses.asdict(cfg), MAX_SMALL_JSON_BYTES)


def decode_run_config(data: bytes, max_bytes: int = MAX_SMALL_JSON_BYTES) -> RunConfig:
    """The RunConfig in a payload; any problem raises WireError naming the bad field."""
    obj = _json_object(data, max_bytes)
    unknown = sorted(obj.keys() - set(_FIELDS))
    if unknown:
        names = _short(", ".join(map(repr, unknown)), 200)
        raise WireError("bad_schema", f"RunConfig has unknown keys {names}")
    missing = [name for name in _FIELDS if name not in obj]
    if missing:
        raise WireError("bad_schema", f"RunConfig lacks {', '.join(missing)}")
    return RunConfig(**obj)
