"""WireError, ids, and the checks every wire module shares: payload size, bytes-likes, integer
and number fields, strict JSON parsing hooks."""
from __future__ import annotations

import math
import re
import uuid
from typing import Any

import numpy as np

from tomtit.errors import TomtitError

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_UPDATE_ID_RE = re.compile(r"[0-9a-f]{32}")  # uuid4().hex; any 32 lowercase hex digits accepted


class WireError(TomtitError, ValueError):
    """A payload or topic that must not be used. `reason` is a short stable machine code (it is
    what a node publishes on `errors/`); `detail` is for humans."""

    def __init__(self, reason: str, detail: str = "") -> None:
        # both in args so the exception pickles and compares like any other
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def new_update_id() -> str:
    return uuid.uuid4().hex


def check_id(value: object, what: str = "id") -> str:
    """A job, node or device id: safe as one MQTT topic level and as a file name."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise WireError("bad_id", f"{what} {value!r} must match [A-Za-z0-9_.-]{{1,64}}")
    return value


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"expected bytes, got {type(data).__name__}")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _check_size(data: bytes, max_bytes: int) -> None:
    if not data:
        raise WireError("empty", "payload is empty")
    if len(data) > max_bytes:
        raise WireError("too_large", f"payload is {len(data)} bytes, limit {max_bytes}")


def _int_field(value: object, what: str, reason: str = "bad_metadata", *, minimum: int = 0,
               maximum: int | None = None) -> int:
    # bool is an int in Python; True as a version is a bug, not a 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise WireError(reason, f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise WireError(reason, f"{what} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise WireError(reason, f"{what} must be <= {maximum}, got {value}")
    return int(value)


def _float_field(value: object, what: str, *, nonneg: bool, reason: str = "bad_metadata",
                 limit: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise WireError(reason, f"{what} must be a number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        x = math.inf
    if not math.isfinite(x) or (nonneg and x < 0):
        raise WireError(reason, f"{what} must be finite{' and >= 0' if nonneg else ''}, got {x}")
    if limit is not None and abs(x) > limit:
        raise WireError(reason, f"|{what}| must be <= {limit:g}, got {x:g}")
    return x


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # two parsers reading one header must agree; a repeated key is where they could differ
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return d


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")
