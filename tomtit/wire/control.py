"""Small JSON control messages: acks (single and batched), presence, error reports, telemetry.

Strict JSON (no NaN/Infinity, no repeated key), bounded in size, validated field by field. An
ack, presence or error report ignores keys it does not know, so a newer peer can add facts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from tomtit.wire.errors import (_ID_RE, _UPDATE_ID_RE, WireError, _as_bytes, _check_size, _float_field,
                                _int_field, _no_duplicate_keys, _reject_constant, _short)

MAX_SMALL_JSON_BYTES = 4096  # ack, presence, error report: a few fields each
MAX_TELEMETRY_BYTES = 16384
# error details are for humans; 512 chars even at 6 bytes each (JSON-escaped control chars)
# keep an error report within MAX_SMALL_JSON_BYTES
MAX_DETAIL_CHARS = 512
_REASON_RE = re.compile(r"[a-z0-9_]{1,32}")


def _json_encode(obj: Mapping[str, Any], max_bytes: int) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False,
                      ensure_ascii=False).encode("utf-8")
    if len(data) > max_bytes:
        raise WireError("too_large", f"JSON payload is {len(data)} bytes, limit {max_bytes}")
    return data


def _json_object(data: bytes, max_bytes: int) -> dict[str, Any]:
    data = _as_bytes(data)
    _check_size(data, max_bytes)
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                         parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, huge ints
        raise WireError("not_json", _short(str(e))) from None
    if not isinstance(obj, dict):
        raise WireError("not_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _str_field(value: object, what: str, pattern: re.Pattern[str] | None, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (pattern is not None and not (empty_ok and value == "")
                                       and pattern.fullmatch(value) is None):
        raise WireError("bad_schema", f"{what} {_short(repr(value), 80)} is malformed")
    return value


_J = TypeVar("_J", "Ack", "Presence", "ErrorReport")


def _from_json(cls: type[_J], obj: Mapping[str, Any]) -> _J:
    """Build a JSON dataclass from the object's known keys (extra keys are ignored: newer peers)."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in obj]
    if missing:
        raise WireError("bad_schema", f"{cls.__name__} lacks {', '.join(missing)}")
    return cls(**{n: obj[n] for n in names})


ACK_STATUSES = ("applied", "rejected", "duplicate")
# "finished": the node has ended the job (target reached or time up). It propagates down the
# tree: an edge whose parent is finished finishes itself, a device whose parent is finished stops.
PRESENCE_STATES = ("online", "offline", "finished")


@dataclass(frozen=True)
class Ack:
    """Node -> child: what became of one update. The sender keeps an update until acked."""

    update_id: str
    status: str  # "applied" | "rejected" | "duplicate"
    reason: str = ""  # a WireError / node reason code when rejected, else ""
    node_version: int = 0  # the node's model version after handling the update

    def __post_init__(self) -> None:
        _str_field(self.update_id, "update_id", _UPDATE_ID_RE)
        if self.status not in ACK_STATUSES:
            raise WireError("bad_schema",
                            f"status {_short(repr(self.status), 40)} is not one of {ACK_STATUSES}")
        _str_field(self.reason, "reason", _REASON_RE, empty_ok=True)
        object.__setattr__(self, "node_version", _int_field(self.node_version, "node_version", "bad_schema"))


@dataclass(frozen=True)
class Presence:
    """Retained on `status/{id}`; the broker publishes the "offline" one as the last will."""

    id: str
    state: str  # "online" | "offline" | "finished"
    role: str  # "device" or "node" today; any id-like word is accepted
    version: int  # model version the publisher holds
    ts: float  # publisher's wall clock, seconds since the epoch

    def __post_init__(self) -> None:
        _str_field(self.id, "id", _ID_RE)
        if self.state not in PRESENCE_STATES:
            raise WireError("bad_schema",
                            f"state {_short(repr(self.state), 40)} is not one of {PRESENCE_STATES}")
        _str_field(self.role, "role", _ID_RE)
        object.__setattr__(self, "version", _int_field(self.version, "version", "bad_schema"))
        object.__setattr__(self, "ts", _float_field(self.ts, "ts", nonneg=True, reason="bad_schema"))


@dataclass(frozen=True)
class ErrorReport:
    """Published by a node on `errors/{node}` when it rejects a payload."""

    update_id: str  # "" when the payload was too broken to say
    sender: str  # the child the payload came from (known from the topic)
    reason: str  # WireError.reason or a node-level code (e.g. "stale", "norm")
    detail: str = ""

    def __post_init__(self) -> None:
        _str_field(self.update_id, "update_id", _UPDATE_ID_RE, empty_ok=True)
        _str_field(self.sender, "sender", _ID_RE)
        _str_field(self.reason, "reason", _REASON_RE)
        _str_field(self.detail, "detail", None)
        # truncate rather than refuse: a long exception text must not stop the report itself
        object.__setattr__(self, "detail", self.detail[:MAX_DETAIL_CHARS])


def encode_ack(ack: Ack) -> bytes:
    return _json_encode(dataclasses.asdict(ack), MAX_SMALL_JSON_BYTES)


def decode_ack(data: bytes, max_bytes: int = MAX_SMALL_JSON_BYTES) -> Ack:
    return _from_json(Ack, _json_object(data, max_bytes))


# A busy node acks many updates from one child at once: one message of up to this many acks
# instead of one message each (each MQTT message costs the broker, the node's network thread
# and the child a round of work; at hundreds of updates/s that was a quarter of the node's time).
MAX_ACKS_PER_MESSAGE = 256
MAX_ACK_BATCH_BYTES = 65536  # 256 acks at their largest (~170 bytes each) fit


def encode_acks(acks: Sequence[Ack]) -> bytes:
    """One payload acknowledging 1..MAX_ACKS_PER_MESSAGE updates: {"acks": [ack, ...]}."""
    if not 1 <= len(acks) <= MAX_ACKS_PER_MESSAGE:
        raise WireError("bad_schema", f"an ack batch holds 1..{MAX_ACKS_PER_MESSAGE} acks, got {len(acks)}")
    return _json_encode({"acks": [dataclasses.asdict(a) for a in acks]}, MAX_ACK_BATCH_BYTES)


def decode_acks(data: bytes, max_bytes: int = MAX_ACK_BATCH_BYTES) -> list[Ack]:
    """The acks in a payload: a batch from `encode_acks` or a single ack from `encode_ack`."""
    obj = _json_object(data, max_bytes)
    if "acks" not in obj:
        return [_from_json(Ack, obj)]
    items = obj["acks"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ACKS_PER_MESSAGE:
        raise WireError("bad_schema", f"acks must be a list of 1..{MAX_ACKS_PER_MESSAGE} acks")
    if not all(isinstance(i, dict) for i in items):
        raise WireError("bad_schema", "every entry of acks must be a JSON object")
    return [_from_json(Ack, i) for i in items]


def encode_presence(presence: Presence) -> bytes:
    return _json_encode(dataclasses.asdict(presence), MAX_SMALL_JSON_BYTES)


def decode_presence(data: bytes, max_bytes: int = MAX_SMALL_JSON_BYTES) -> Presence:
    return _from_json(Presence, _json_object(data, max_bytes))


def encode_error(report: ErrorReport) -> bytes:
    return _json_encode(dataclasses.asdict(report), MAX_SMALL_JSON_BYTES)


def decode_error(data: bytes, max_bytes: int = MAX_SMALL_JSON_BYTES) -> ErrorReport:
    return _from_json(ErrorReport, _json_object(data, max_bytes))


TelemetryValue = str | int | float | bool


def _check_telemetry(values: Mapping[str, Any]) -> dict[str, TelemetryValue]:
    out: dict[str, TelemetryValue] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 64:
            raise WireError("bad_schema", f"telemetry key {_short(repr(key), 80)} must be a 1-64 char string")
        if isinstance(value, (bool, str)):
            out[key] = value
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)) and math.isfinite(value):
            out[key] = float(value)
        else:  # flat only: nested values would make every consumer write a schema walker
            raise WireError("bad_schema", f"telemetry {key!r} must be a string, bool or finite number")
    return out


def encode_telemetry(values: Mapping[str, Any], max_bytes: int = MAX_TELEMETRY_BYTES) -> bytes:
    """A flat JSON object of numbers, strings and bools (loss, energy, chosen interval...)."""
    return _json_encode(_check_telemetry(values), max_bytes)


def decode_telemetry(data: bytes, max_bytes: int = MAX_TELEMETRY_BYTES) -> dict[str, TelemetryValue]:
    return _check_telemetry(_json_object(data, max_bytes))
