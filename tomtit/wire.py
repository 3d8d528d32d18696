"""The wire format: every MQTT topic and every payload that crosses a broker (DESIGN.md §3, §8).

Everything travels in topic + payload so MQTT 3.1.1 is enough. Models and updates are
safetensors bytes with string metadata; acks, presence, telemetry and error reports are small
JSON objects. Nothing here is ever unpickled or eval'd: a payload comes from a device we do not
control, so decoding is bounded in size and validated field by field before anything is used.

This module only checks what one message says about itself. Whether an update is worth
applying (norm bound, staleness, update_id seen before) is the receiving node's decision.

Layout of a model/update message (safetensors):
  - one tensor per trainable parameter, by name; dtype F32, F16 or I8 according to the codec;
  - codec "int8": each value tensor `w` is symmetric per-tensor quantised, q = round(w / s) with
    s = max|w| / 127, and its scale travels as a float32 tensor of shape (1,) named
    `w.__scale__` (a tensor, not metadata text, so the scale is carried bit-exact);
  - `__metadata__`: `proto`, `kind`, `sender`, `job`, `bundle_id`, `base_version`, `version`,
    `num_samples`, `local_steps`, `train_loss`, `energy_j`, `update_id`, `created_at`, `codec`,
    `is_delta`, all strings. Unknown extra keys are ignored so a newer sender can add facts.
A chunk is a safetensors message too: one U8 tensor `data` and metadata `proto`, `kind`="chunk",
`update_id`, `index`, `total`, `size` (bytes of the whole payload) and `sha256` (of the whole
payload).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import safetensors
from safetensors.numpy import save as _safetensors_save

from tomtit.errors import TomtitError
from tomtit.manifest import TensorSpec

PROTO = "1"  # bump when a receiver of the old format would misread the new one
KINDS = ("update", "model")
CODECS = ("f32", "f16", "int8")
SCALE_SUFFIX = ".__scale__"
# safetensors dtype of a value tensor on the wire, per codec
_CODEC_DTYPE = {"f32": "F32", "f16": "F16", "int8": "I8"}
_NUMPY_DTYPE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I8": np.dtype("i1"),
                "U8": np.dtype("u1")}

MAX_SMALL_JSON_BYTES = 4096  # ack, presence, error report: a few fields each
MAX_TELEMETRY_BYTES = 16384
# error details are for humans; 512 chars even at 6 bytes each (JSON-escaped control chars)
# keep an error report within MAX_SMALL_JSON_BYTES
MAX_DETAIL_CHARS = 512
MIN_CHUNK_LIMIT = 1024  # a chunk's own header is ~300 bytes; below this chunking is pointless
CHUNK_HEADER_MAX = 1024  # generous bound on a chunk's header, used to reject junk cheaply

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_UPDATE_ID_RE = re.compile(r"[0-9a-f]{32}")  # uuid4().hex; any 32 lowercase hex digits accepted
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REASON_RE = re.compile(r"[a-z0-9_]{1,32}")
_INT_RE = re.compile(r"-?[0-9]{1,19}")  # strict: int() alone would also take " 1_0 "


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


# ---------------------------------------------------------------------------------- topics


@dataclass(frozen=True)
class Topics:
    """All topics of one job. Topics are built and parsed here only, never concatenated ad hoc."""

    job: str

    def __post_init__(self) -> None:
        check_id(self.job, "job")

    @property
    def root(self) -> str:
        return f"tomtit/{self.job}"

    def up(self, node: str, child: str) -> str:
        return f"{self.root}/node/{check_id(node, 'node')}/up/{check_id(child, 'child')}"

    def up_filter(self, node: str) -> str:
        return f"{self.root}/node/{check_id(node, 'node')}/up/+"

    def down(self, node: str) -> str:
        return f"{self.root}/node/{check_id(node, 'node')}/down"

    def ack(self, node: str, child: str) -> str:
        return f"{self.root}/node/{check_id(node, 'node')}/ack/{check_id(child, 'child')}"

    def status(self, ident: str) -> str:
        return f"{self.root}/status/{check_id(ident)}"

    def status_filter(self) -> str:
        return f"{self.root}/status/+"

    def telemetry(self, ident: str) -> str:
        return f"{self.root}/telemetry/{check_id(ident)}"

    def errors(self, ident: str) -> str:
        return f"{self.root}/errors/{check_id(ident)}"

    def parse_up(self, topic: str) -> tuple[str, str]:
        """`tomtit/{job}/node/{node}/up/{child}` -> (node, child)."""
        return self._parse_node_topic(topic, "up")

    def parse_ack(self, topic: str) -> tuple[str, str]:
        """`tomtit/{job}/node/{node}/ack/{child}` -> (node, child)."""
        return self._parse_node_topic(topic, "ack")

    def parse_status(self, topic: str) -> str:
        """`tomtit/{job}/status/{id}` -> id."""
        parts = topic.split("/") if isinstance(topic, str) else []
        if (len(parts) != 4 or parts[:3] != ["tomtit", self.job, "status"]
                or _ID_RE.fullmatch(parts[3]) is None):
            raise WireError("bad_topic", f"{topic!r} is not a status topic of job {self.job!r}")
        return parts[3]

    def _parse_node_topic(self, topic: str, leaf: str) -> tuple[str, str]:
        parts = topic.split("/") if isinstance(topic, str) else []
        if (len(parts) != 6 or parts[:3] != ["tomtit", self.job, "node"] or parts[4] != leaf
                or _ID_RE.fullmatch(parts[3]) is None or _ID_RE.fullmatch(parts[5]) is None):
            raise WireError("bad_topic", f"{topic!r} is not a {leaf} topic of job {self.job!r}")
        return parts[3], parts[5]


# ------------------------------------------------------------------------- model messages


def _int_field(value: object, what: str, reason: str = "bad_metadata") -> int:
    # bool is an int in Python; True as a version is a bug, not a 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise WireError(reason, f"{what} must be an integer, got {value!r}")
    if value < 0:
        raise WireError(reason, f"{what} must be >= 0, got {value}")
    return int(value)


def _float_field(value: object, what: str, *, nonneg: bool, reason: str = "bad_metadata") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise WireError(reason, f"{what} must be a number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        x = math.inf
    if not math.isfinite(x) or (nonneg and x < 0):
        raise WireError(reason, f"{what} must be finite{' and >= 0' if nonneg else ''}, got {x}")
    return x


@dataclass(frozen=True, kw_only=True, eq=False)  # eq=False: arrays have no truth value to compare
class ModelMessage:
    """An update (child -> node) or a model (node -> children), decoded: values are float32."""

    kind: str  # "update" or "model"
    sender: str  # id of the device or node that made it; must match the topic it came on
    job: str
    bundle_id: str  # the manifest's bundle id; an update made for another bundle is rejected
    base_version: int  # model version the sender started from; a delta is against this one
    version: int  # sender's own version of what it sends (a node's model version, a device's counter)
    num_samples: int  # aggregation weight
    local_steps: int
    train_loss: float
    energy_j: float  # energy spent making this message, in joules (0 when not metered)
    is_delta: bool  # True: tensors are a difference from base_version; False: full adapter values
    created_at: float  # sender's wall clock, seconds since the epoch; informational only
    codec: str = "f32"  # how the tensors travel (or travelled); decoded values are float32 anyway
    update_id: str = field(default_factory=new_update_id)  # dedup key for QoS 1 redelivery
    tensors: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        # the one place message facts are checked: for a sender before encoding, for a
        # receiver on the decoded metadata. Normalise numpy scalars to plain Python numbers.
        if self.kind not in KINDS:
            raise WireError("bad_metadata", f"kind {self.kind!r} is not one of {KINDS}")
        if self.codec not in CODECS:
            raise WireError("bad_codec", f"codec {self.codec!r} is not one of {CODECS}")
        for name in ("sender", "job", "bundle_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
                raise WireError("bad_metadata", f"{name} {value!r} must match [A-Za-z0-9_.-]{{1,64}}")
        if not isinstance(self.update_id, str) or _UPDATE_ID_RE.fullmatch(self.update_id) is None:
            raise WireError("bad_metadata", f"update_id {self.update_id!r} is not 32 lowercase hex digits")
        if not isinstance(self.is_delta, (bool, np.bool_)):
            raise WireError("bad_metadata", f"is_delta must be a bool, got {self.is_delta!r}")
        object.__setattr__(self, "is_delta", bool(self.is_delta))
        for name in ("base_version", "version", "num_samples", "local_steps"):
            object.__setattr__(self, name, _int_field(getattr(self, name), name))
        object.__setattr__(self, "train_loss", _float_field(self.train_loss, "train_loss", nonneg=False))
        for name in ("energy_j", "created_at"):
            object.__setattr__(self, name, _float_field(getattr(self, name), name, nonneg=True))


def _message_metadata(msg: ModelMessage, codec: str) -> dict[str, str]:
    return {
        "proto": PROTO,
        "kind": msg.kind,
        "sender": msg.sender,
        "job": msg.job,
        "bundle_id": msg.bundle_id,
        "base_version": str(msg.base_version),
        "version": str(msg.version),
        "num_samples": str(msg.num_samples),
        "local_steps": str(msg.local_steps),
        "train_loss": repr(msg.train_loss),  # repr round-trips a float exactly
        "energy_j": repr(msg.energy_j),
        "update_id": msg.update_id,
        "created_at": repr(msg.created_at),
        "codec": codec,
        "is_delta": "true" if msg.is_delta else "false",
    }


def _check_tensor_name(name: object) -> str:
    if (not isinstance(name, str) or not name or name == "__metadata__"
            or name.endswith(SCALE_SUFFIX)):
        raise WireError("wrong_tensors", f"tensor name {name!r} is empty or reserved")
    return name


def _encode_values(name: str, x: np.ndarray, codec: str) -> dict[str, np.ndarray]:
    if codec == "f32":
        return {name: x}
    if codec == "f16":
        with np.errstate(over="ignore"):  # overflow is reported just below, as a WireError
            h = x.astype(np.float16)
        if not np.isfinite(h).all():
            raise WireError("not_finite", f"{name} overflows float16 (|x| > 65504); use f32 or int8")
        return {name: h}
    # int8: symmetric per-tensor, computed in float64 so the only rounding is the final one
    amax = float(np.max(np.abs(x))) if x.size else 0.0
    scale = np.float32(amax / 127.0)
    if amax > 0 and scale == 0:  # amax is subnormal: keep a non-zero scale, clipping bounds q
        scale = np.float32(np.finfo(np.float32).smallest_subnormal)
    if scale > 0:
        # np.asarray: numpy turns 0-d results into scalars, which safetensors cannot save
        q = np.asarray(np.clip(np.rint(x.astype(np.float64) / float(scale)), -127, 127), dtype=np.int8)
    else:
        q = np.zeros(x.shape, dtype=np.int8)
    return {name: q, name + SCALE_SUFFIX: np.array([scale], dtype=np.float32)}


def encode_message(msg: ModelMessage, codec: str | None = None) -> bytes:
    """Safetensors bytes of `msg`, with tensors in `codec` (default: `msg.codec`)."""
    codec = msg.codec if codec is None else codec
    if codec not in CODECS:
        raise WireError("bad_codec", f"codec {codec!r} is not one of {CODECS}")
    out: dict[str, np.ndarray] = {}
    for name, value in msg.tensors.items():
        _check_tensor_name(name)
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiu":
            raise WireError("wrong_dtype", f"{name} has dtype {arr.dtype}; expected real numbers")
        # the wire carries float32 precision at most; a float64 beyond float32 range becomes inf
        with np.errstate(over="ignore"):
            x = np.array(arr, dtype=np.float32, order="C")  # not ascontiguousarray: it makes 0-d 1-d
        if not np.isfinite(x).all():
            raise WireError("not_finite", f"{name} has NaN or inf (as float32)")
        out.update(_encode_values(name, x, codec))
    return _safetensors_save(out, metadata=_message_metadata(msg, codec))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # two parsers reading one header must agree; a repeated key is where they could differ
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return d


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class _RawTensor:
    name: str
    dtype: str  # safetensors dtype string, e.g. "F32"
    shape: tuple[int, ...]
    data: bytes | bytearray  # as the parser hands it over; read-only use


def _parse_safetensors(data: bytes) -> tuple[dict[str, str], dict[str, _RawTensor]]:
    """Header metadata and raw tensors of a safetensors payload, or WireError("not_safetensors")."""
    if len(data) < 8:
        raise WireError("not_safetensors", "shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    # checked here, not left to the parser: a huge length field must not drive any allocation
    if n < 2 or n > len(data) - 8:
        raise WireError("not_safetensors", f"header length {n} does not fit a {len(data)}-byte payload")
    try:
        flat = safetensors.deserialize(data)
    except Exception as e:  # SafetensorError and whatever else the Rust side raises on garbage
        raise WireError("not_safetensors", _short(f"{type(e).__name__}: {e}")) from None
    except BaseException as e:
        # pyo3 turns a Rust panic into PanicException, a BaseException; anything else
        # (KeyboardInterrupt, SystemExit) is not ours to swallow
        if type(e).__name__ != "PanicException":
            raise
        raise WireError("not_safetensors", _short(f"parser panicked: {e}")) from None
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                            parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WireError("not_safetensors", _short(f"header: {e}")) from None
    if not isinstance(header, dict):
        raise WireError("not_safetensors", "header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WireError("bad_metadata", "no __metadata__ of strings")
    tensors: dict[str, _RawTensor] = {}
    for name, info in flat:
        tensors[name] = _RawTensor(name=name, dtype=str(info["dtype"]),
                                   shape=tuple(int(s) for s in info["shape"]), data=info["data"])
    return meta, tensors


def _meta_int(meta: Mapping[str, str], key: str, reason: str = "bad_metadata") -> int:
    s = meta[key]
    if _INT_RE.fullmatch(s) is None:
        raise WireError(reason, f"{key} {_short(s, 40)!r} is not an integer")
    return int(s)


def _meta_float(meta: Mapping[str, str], key: str) -> float:
    s = meta[key]
    try:
        x = float(s)
    except ValueError:
        raise WireError("bad_metadata", f"{key} {_short(s, 40)!r} is not a number") from None
    if len(s) > 64:  # repr of any float is < 30 chars; anything longer was not written by us
        raise WireError("bad_metadata", f"{key} is {len(s)} chars long")
    return x


_MESSAGE_KEYS = (
    "proto", "kind", "sender", "job", "bundle_id", "base_version", "version", "num_samples",
    "local_steps", "train_loss", "energy_j", "update_id", "created_at", "codec", "is_delta")


def _message_head(meta: Mapping[str, str]) -> ModelMessage:
    """The message described by the metadata, with no tensors yet."""
    if meta.get("proto") != PROTO:
        raise WireError("bad_proto", f"proto {_short(str(meta.get('proto')), 40)!r} is not {PROTO!r}")
    if meta.get("kind") == "chunk":
        raise WireError("wrong_kind", "this is one chunk of a larger payload; reassemble it first")
    missing = [k for k in _MESSAGE_KEYS if k not in meta]
    if missing:
        raise WireError("bad_metadata", f"missing metadata: {', '.join(missing)}")
    if meta["is_delta"] not in ("true", "false"):
        raise WireError("bad_metadata", f"is_delta {_short(meta['is_delta'], 40)!r} is not true/false")
    return ModelMessage(
        kind=meta["kind"], sender=meta["sender"], job=meta["job"], bundle_id=meta["bundle_id"],
        base_version=_meta_int(meta, "base_version"), version=_meta_int(meta, "version"),
        num_samples=_meta_int(meta, "num_samples"), local_steps=_meta_int(meta, "local_steps"),
        train_loss=_meta_float(meta, "train_loss"), energy_j=_meta_float(meta, "energy_j"),
        is_delta=meta["is_delta"] == "true", created_at=_meta_float(meta, "created_at"),
        codec=meta["codec"], update_id=meta["update_id"], tensors={},
    )


def _names(names: Sequence[str] | set[str]) -> str:
    return _short(", ".join(sorted(names)), 300)


def _check_tensor_set(values: Mapping[str, _RawTensor], scales: Mapping[str, _RawTensor], codec: str,
                      expected: Sequence[TensorSpec] | None) -> None:
    """Names, then shapes, then dtypes, then the int8 scale structure; values are not read here."""
    if expected is not None:
        want = {spec.name: spec for spec in expected}
        missing, extra = want.keys() - values.keys(), values.keys() - want.keys()
        if missing or extra:
            raise WireError("wrong_tensors", f"missing [{_names(missing)}], unexpected [{_names(extra)}]")
        for name, spec in want.items():
            if values[name].shape != tuple(spec.shape):
                raise WireError("wrong_shape", f"{_short(name, 80)} has shape {values[name].shape}, "
                                               f"expected {tuple(spec.shape)}")
        for name, spec in want.items():
            if spec.dtype != "float32":  # decoded values are always float32
                raise WireError("wrong_dtype",
                                f"{_short(name, 80)} decodes to float32, expected {spec.dtype}")
    else:
        reserved = [n for n in values if n.endswith(SCALE_SUFFIX)]
        if reserved:
            raise WireError("wrong_tensors", f"reserved tensor names [{_names(reserved)}]")
    for name, t in values.items():
        if t.dtype != _CODEC_DTYPE[codec]:
            raise WireError("wrong_dtype", f"{_short(name, 80)} travels as {_short(t.dtype, 20)}; "
                                           f"codec {codec} means {_CODEC_DTYPE[codec]}")
    if codec == "int8":
        if scales.keys() != values.keys():
            raise WireError("bad_codec", "int8 tensors without a scale or scales without a tensor: "
                                         f"[{_names(scales.keys() ^ values.keys())}]")
        for name, s in scales.items():
            if s.dtype != "F32" or s.shape != (1,):
                raise WireError("bad_codec", f"scale of {_short(name, 80)} is {_short(s.dtype, 20)}"
                                             f"{list(s.shape)}, expected F32[1]")


def _decode_values(t: _RawTensor, scale_tensor: _RawTensor | None) -> np.ndarray:
    """float32 values of one checked tensor (a writable, native-endian copy)."""
    q = np.frombuffer(t.data, dtype=_NUMPY_DTYPE[t.dtype]).reshape(t.shape)
    if scale_tensor is None:
        x = q.astype(np.float32)
    else:
        scale = np.frombuffer(scale_tensor.data, dtype="<f4")[0]
        if not np.isfinite(scale):
            raise WireError("not_finite", f"scale of {_short(t.name, 80)} is {scale}")
        if scale < 0:
            raise WireError("bad_codec", f"scale of {_short(t.name, 80)} is negative ({scale})")
        with np.errstate(over="ignore"):  # an absurd scale overflows to inf: caught just below
            x = q.astype(np.float32) * scale
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise WireError("not_finite", f"{_short(t.name, 80)} has {bad} NaN/inf values")
    return x


def _decode_tensors(raw: Mapping[str, _RawTensor], codec: str,
                    expected: Sequence[TensorSpec] | None) -> dict[str, np.ndarray]:
    if codec == "int8":
        values = {n: t for n, t in raw.items() if not n.endswith(SCALE_SUFFIX)}
        scales = {n[:-len(SCALE_SUFFIX)]: t for n, t in raw.items() if n.endswith(SCALE_SUFFIX)}
    else:
        values, scales = dict(raw), {}
    _check_tensor_set(values, scales, codec, expected)
    if not values:
        return {}
    # Fast path: every tensor has the codec's dtype (checked above), so decode them all in one
    # numpy pass instead of ~5 small calls per tensor: a node absorbing many updates per second
    # spends most of its time here. Any problem falls back to the per-tensor path, which names
    # the offending tensor in its error.
    names = list(values)
    sizes = [math.prod(values[n].shape) for n in names]
    q = np.frombuffer(b"".join(values[n].data for n in names), dtype=_NUMPY_DTYPE[values[names[0]].dtype])
    if q.size != sum(sizes):
        return {name: _decode_values(t, scales.get(name)) for name, t in values.items()}
    with np.errstate(over="ignore", invalid="ignore"):
        x = q.astype(np.float32)
        if codec == "int8":
            scale = np.array([np.frombuffer(scales[n].data, dtype="<f4")[0] for n in names], np.float32)
            if not (np.all(np.isfinite(scale)) and np.all(scale >= 0)):
                return {name: _decode_values(t, scales.get(name)) for name, t in values.items()}
            x *= np.repeat(scale, sizes)
    if not np.isfinite(x).all():
        return {name: _decode_values(t, scales.get(name)) for name, t in values.items()}  # raises, naming it
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, size in zip(names, sizes):
        out[name] = x[pos:pos + size].reshape(values[name].shape)
        pos += size
    return out


def decode_message(data: bytes, *, expected: Sequence[TensorSpec] | None, bundle_id: str | None,
                   max_bytes: int, expect_kind: str | None = None, expect_sender: str | None = None,
                   expect_job: str | None = None) -> ModelMessage:
    """Validate and decode one model/update message; any problem raises WireError.

    Checked in this order, before anything is used: size, safetensors parse, metadata schema,
    kind, job, sender, bundle id, tensor names, shapes, dtypes, codec structure, finiteness.
    `expected`/`bundle_id`/`expect_*` = None skips that comparison.
    """
    data = _as_bytes(data)
    _check_size(data, max_bytes)
    meta, raw = _parse_safetensors(data)
    head = _message_head(meta)
    _check_head(head, bundle_id=bundle_id, expect_kind=expect_kind, expect_sender=expect_sender,
                expect_job=expect_job)
    return dataclasses.replace(head, tensors=_decode_tensors(raw, head.codec, expected))


_SMALLEST_HALF_AS_F32_BITS = np.array([1 << 13], np.uint32)  # float16's smallest subnormal, unscaled


def _subnormals_flushed() -> bool:
    """True if this thread's FPU flushes subnormals to zero (FTZ/DAZ, set by some -ffast-math
    libraries): the multiply below relies on float32 subnormal inputs. ~1 us per call."""
    return float(_SMALLEST_HALF_AS_F32_BITS.view(np.float32)[0] * np.float32(2.0 ** 112)) != 2.0 ** -24


def _half_bits_to_float32(bits: np.ndarray) -> np.ndarray | None:
    """float16 bit patterns (widened into uint32, converted IN PLACE) -> float32 view of `bits`;
    None if any is inf or NaN, or if this thread flushes subnormals (the caller then falls back).

    Why not astype: numpy converts float16 one element at a time in software (~3 ns each); these
    six whole-array integer ops are ~3x faster and release the GIL. Exact for every finite value:
    exponent and mantissa land in float32's fields, and multiplying by 2**112 re-biases the
    exponent (15 -> 127), which also turns float16 subnormals into the right float32 normals.
    """
    if _subnormals_flushed():
        return None  # the reference path converts in software, unaffected
    sign = np.left_shift(bits, 16)
    sign &= np.uint32(0x80000000)
    bits &= np.uint32(0x7FFF)
    if bits.size and int(bits.max()) >= 0x7C00:  # exponent all ones: inf or NaN
        return None
    bits <<= np.uint32(13)
    values = bits.view(np.float32)
    values *= np.float32(2.0 ** 112)
    bits |= sign
    return values


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


class FlatDecoder:
    """decode_message for a node's hot path: an update straight into ONE flat float32 buffer in
    the bundle's order (what aggregation works on), without per-tensor objects in between.

    It accepts exactly what `decode_message` + `flatten` accept and gives the same values (a
    property test holds the two together). It reads the header once, checks every tensor's dtype,
    shape and byte range against the expected layout itself (ranges must tile the data area with
    no gap or overlap, as safetensors requires), then copies/converts each tensor's bytes into its
    slice of the output. Whatever it does not handle quickly (int8, any irregularity) goes through
    `decode_message`, so errors keep their reason codes and messages.
    """

    def __init__(self, expected: Sequence[TensorSpec], *, bundle_id: str | None, max_bytes: int) -> None:
        self.expected = tuple(expected)
        self.bundle_id = bundle_id
        self.max_bytes = max_bytes
        self.size = sum(math.prod(s.shape) for s in self.expected)
        self._names = {s.name for s in self.expected}
        # (name, offset in the flat buffer, element count, shape as JSON lists it)
        plan, pos = [], 0
        for s in self.expected:
            n = math.prod(s.shape)
            plan.append((s.name, pos, n, list(s.shape)))
            pos += n
        self._plan = plan
        self._float32 = all(s.dtype == "float32" for s in self.expected)
        self._tables: dict[bytes, tuple] = {}  # tensor-table bytes -> (codec, data area bytes, ranges)

    def decode(self, data: bytes, *, expect_kind: str | None = None, expect_sender: str | None = None,
               expect_job: str | None = None) -> tuple[ModelMessage, np.ndarray]:
        """(message head with no tensors, flat float32 values); any problem raises WireError."""
        data = _as_bytes(data)
        _check_size(data, self.max_bytes)
        checks = {"expect_kind": expect_kind, "expect_sender": expect_sender, "expect_job": expect_job}
        parsed = self._header(data) if self._float32 else None
        if parsed is None:
            return self._slow(data, checks)
        meta, codec, start, ranges = parsed
        flat = self._fill(data, start, ranges, codec)
        if flat is None:
            return self._slow(data, checks)  # inf/NaN: the slow path raises, naming the tensor
        head = _message_head(meta)
        _check_head(head, bundle_id=self.bundle_id, **checks)
        return head, flat

    def _header(self, data: bytes) -> tuple[dict[str, str], str, int, list] | None:
        """(metadata, codec, start of the data area, tensor ranges) of a canonical f32/f16
        payload, or None for anything else (the slow path then decides).

        Canonical: plain ASCII without escapes, as our encoder writes it. On that subset Python's
        JSON parser and safetensors' (serde) cannot disagree (lone surrogates, leading spaces...
        are where they would), and no string holds a '"', so the metadata object, which our
        encoder writes first, ends at the first '"}'. Every update of one bundle and codec then
        carries byte-for-byte the same tensor table after it: a table validated once is
        recognised by its bytes and only the small metadata object is parsed.
        """
        if len(data) < 8:
            return None
        n = int.from_bytes(data[:8], "little")
        if not 2 <= n <= len(data) - 8:
            return None
        raw = data[8:8 + n]
        if raw[:1] != b"{" or not raw.isascii() or b"\\" in raw:
            return None
        start, area = 8 + n, len(data) - 8 - n
        end = raw.find(b'"}', len(_META_PREFIX)) if raw.startswith(_META_PREFIX) else -1
        table_bytes = raw[end + 2:] if end > 0 else None
        known = self._tables.get(table_bytes) if table_bytes is not None else None
        if known is not None and known[1] == area:
            meta = _strict_json(raw[len(_META_PREFIX) - 1:end + 2])
            if isinstance(meta, dict) and meta.get("codec") == known[0] and all(
                    isinstance(v, str) for v in meta.values()):
                return meta, known[0], start, known[2]
            return None
        header = _strict_json(raw)
        meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
        codec = meta.get("codec") if isinstance(meta, dict) else None
        if codec not in ("f32", "f16") or not all(isinstance(v, str) for v in meta.values()):
            return None
        ranges = self._ranges(header, codec, area)
        if ranges is None:
            return None
        if table_bytes is not None and _strict_json(raw[len(_META_PREFIX) - 1:end + 2]) is not None:
            if len(self._tables) >= 8:  # a handful of layouts at most; never grow without bound
                self._tables.clear()
            self._tables[table_bytes] = (codec, area, ranges)
        return meta, codec, start, ranges

    def _ranges(self, table: dict, codec: str, area: int) -> list[tuple[int, int, int]] | None:
        """(byte offset in the data area, offset in the flat buffer, count) per tensor, sorted by
        byte offset; None unless every entry is exactly as expected and they tile the area."""
        dtype, itemsize = ("F16", 2) if codec == "f16" else ("F32", 4)
        if table.keys() != self._names or area % itemsize:
            return None
        ranges = []
        for name, pos, count, shape in self._plan:
            info = table[name]
            if (not isinstance(info, dict) or info.keys() != _ENTRY_KEYS or info["dtype"] != dtype
                    or info["shape"] != shape or not all(type(d) is int for d in info["shape"])):
                return None  # (type check: 8.0 == 8 in Python, and a float is no shape to serde)
            offsets = info["data_offsets"]
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or not all(type(o) is int for o in offsets)):
                return None
            begin, end = offsets
            if end - begin != count * itemsize or begin % itemsize:
                return None
            ranges.append((begin, pos, count))
        ranges.sort()
        expected_begin = 0
        for begin, _, count in ranges:
            if begin != expected_begin:
                return None
            expected_begin = begin + count * itemsize
        if expected_begin != area:
            return None
        return ranges

    def _fill(self, data: bytes, start: int, ranges: list[tuple[int, int, int]], codec: str) -> np.ndarray | None:
        """The flat float32 buffer in bundle order; None if a value is inf or NaN."""
        if codec == "f16":
            src = np.frombuffer(data, dtype="<u2", offset=start)
            bits = np.empty(self.size, np.uint32)
            for begin, pos, count in ranges:  # widen each tensor into its place in bundle order
                i = begin // 2
                bits[pos:pos + count] = src[i:i + count]
            return _half_bits_to_float32(bits)
        src = np.frombuffer(data, dtype="<f4", offset=start)
        out = np.empty(self.size, np.float32)
        for begin, pos, count in ranges:
            i = begin // 4
            out[pos:pos + count] = src[i:i + count]
        return out if np.isfinite(out).all() else None

    def _slow(self, data: bytes, checks: dict) -> tuple[ModelMessage, np.ndarray]:
        msg = decode_message(data, expected=self.expected, bundle_id=self.bundle_id, max_bytes=self.max_bytes,
                             **checks)
        out = np.empty(self.size, np.float32)
        for name, pos, count, _ in self._plan:
            out[pos:pos + count] = np.asarray(msg.tensors[name]).reshape(-1)
        return dataclasses.replace(msg, tensors={}), out


_META_PREFIX = b'{"__metadata__":{'


def _strict_json(raw: bytes) -> Any:
    """json.loads with the canonical-header rules below; None where it fails. Decoded as ASCII
    first: given bytes, json.loads would guess UTF-16/32 from NUL bytes, which serde refuses."""
    try:
        return json.loads(raw.decode("ascii"), object_pairs_hook=_canonical_pairs, parse_constant=_reject_constant,
                          parse_float=_reject_constant, parse_int=_canonical_int)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _canonical_int(text: str) -> int:
    # A safetensors header holds sizes and offsets only. serde reads "-0" as a float, and no
    # negative number is valid, so any sign sends the payload to the reference decoder.
    if text.startswith("-"):
        raise ValueError("signed integer in a safetensors header")
    return int(text)


def _canonical_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects of a canonical header: no repeated key, and numbers only as ints (no float,
    no bool: safetensors has neither, and Python's `==` would equate 8.0 or False with 8 or 0,
    which the layout cache relies on not happening)."""
    d = _no_duplicate_keys(pairs)
    for v in d.values():
        if type(v) is bool or (type(v) is list and any(type(x) is not int for x in v)):
            raise ValueError("not a canonical safetensors header")
    return d


def _check_head(head: ModelMessage, *, bundle_id: str | None, expect_kind: str | None,
                expect_sender: str | None, expect_job: str | None) -> None:
    if expect_kind is not None and head.kind != expect_kind:
        raise WireError("wrong_kind", f"kind {head.kind!r}, expected {expect_kind!r}")
    if expect_job is not None and head.job != expect_job:
        raise WireError("wrong_job", f"job {head.job!r}, expected {expect_job!r}")
    if expect_sender is not None and head.sender != expect_sender:
        raise WireError("wrong_sender", f"sender {head.sender!r} but it came from {expect_sender!r}")
    if bundle_id is not None and head.bundle_id != bundle_id:
        raise WireError("wrong_bundle", f"made for bundle {head.bundle_id!r}, this is {bundle_id!r}")


# -------------------------------------------------------------------------------- chunks


def _encode_chunk(update_id: str, index: int, total: int, size: int, sha256: str, piece: bytes) -> bytes:
    meta = {"proto": PROTO, "kind": "chunk", "update_id": update_id, "index": str(index),
            "total": str(total), "size": str(size), "sha256": sha256}
    return _safetensors_save({"data": np.frombuffer(piece, dtype=np.uint8)}, metadata=meta)


def split_payload(payload: bytes, *, update_id: str, limit: int) -> list[bytes]:
    """[payload] if it fits in `limit` bytes, else chunks of at most `limit` bytes each.

    `limit` is the broker's payload limit minus room for the topic and MQTT header.
    """
    payload = _as_bytes(payload)
    if _UPDATE_ID_RE.fullmatch(update_id) is None:
        raise WireError("bad_id", f"update_id {update_id!r} is not 32 lowercase hex digits")
    if limit < MIN_CHUNK_LIMIT:
        raise ValueError(f"limit {limit} is below {MIN_CHUNK_LIMIT} bytes; a chunk's header alone is ~300")
    if len(payload) <= limit:
        return [payload]
    sha = hashlib.sha256(payload).hexdigest()
    piece, grown = limit - 512, False
    while True:
        # headers differ only in the digits of index and offsets, so the chunk with the largest
        # index and a full piece is the largest: fit that one. Grow once into the slack, then
        # shrink until it fits (a digit more or less in the header can flip the result).
        total = -(-len(payload) // piece)
        probe = len(_encode_chunk(update_id, total - 1, total, len(payload), sha, b"\0" * piece))
        if probe > limit:
            piece -= probe - limit
        elif probe == limit or grown:
            break
        else:
            piece, grown = piece + limit - probe, True
    chunks = [_encode_chunk(update_id, i, total, len(payload), sha, payload[i * piece:(i + 1) * piece])
              for i in range(total)]
    assert all(len(c) <= limit for c in chunks)
    return chunks


def _small_safetensors_meta(data: bytes) -> dict | None:
    """The __metadata__ of a payload whose header is small, without running the full parser."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > min(len(data) - 8, CHUNK_HEADER_MAX):
        return None
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def is_chunk(data: bytes) -> bool:
    """Cheap test (reads only a header of at most CHUNK_HEADER_MAX bytes); never raises on bytes."""
    meta = _small_safetensors_meta(_as_bytes(data))
    return meta is not None and meta.get("kind") == "chunk"


@dataclass(frozen=True)
class _Chunk:
    update_id: str
    index: int
    total: int
    size: int
    sha256: str
    piece: bytes | bytearray


def _decode_chunk(data: bytes, max_total_bytes: int) -> _Chunk:
    _check_size(data, max_total_bytes + CHUNK_HEADER_MAX + 8)
    meta, raw = _parse_safetensors(data)
    if meta.get("proto") != PROTO:
        raise WireError("bad_proto", f"proto {_short(str(meta.get('proto')), 40)!r} is not {PROTO!r}")
    if meta.get("kind") != "chunk":
        raise WireError("bad_chunk", "not a chunk")
    missing = [k for k in ("update_id", "index", "total", "size", "sha256") if k not in meta]
    if missing:
        raise WireError("bad_chunk", f"missing metadata: {', '.join(missing)}")
    if _UPDATE_ID_RE.fullmatch(meta["update_id"]) is None or _SHA256_RE.fullmatch(meta["sha256"]) is None:
        raise WireError("bad_chunk", "update_id or sha256 malformed")
    index, total, size = (_meta_int(meta, k, "bad_chunk") for k in ("index", "total", "size"))
    if size > max_total_bytes:
        raise WireError("too_large", f"reassembled payload would be {size} bytes, limit {max_total_bytes}")
    # every chunk carries at least one byte, so total <= size
    if not (0 <= index < total <= size):
        raise WireError("bad_chunk", f"index {index}, total {total}, size {size} are inconsistent")
    t = raw.get("data")
    if len(raw) != 1 or t is None or t.dtype != "U8" or len(t.shape) != 1 or not 1 <= t.shape[0] <= size:
        raise WireError("bad_chunk", "a chunk holds exactly one non-empty 1-D U8 tensor named data")
    return _Chunk(meta["update_id"], index, total, size, meta["sha256"], t.data)


@dataclass
class _PartialSet:
    total: int
    size: int
    sha256: str
    started: float
    parts: dict[int, bytes | bytearray] = field(default_factory=dict)
    buffered: int = 0


class Reassembler:
    """Collects chunks into whole payloads, in any order, with bounded memory.

    Memory is bounded by `max_sets` in-flight sets of at most `max_total_bytes` each; a set is
    dropped `timeout_s` after its first chunk arrived. There is no clock inside: `now` is
    passed in (seconds, any monotonic origin).

    A completed set is forgotten at once: if all its chunks arrive again (the sender re-sends
    because the ack was lost), the payload is returned again, so the node can re-ack it as a
    duplicate.
    """

    def __init__(self, timeout_s: float, max_total_bytes: int, max_sets: int = 16) -> None:
        if not timeout_s > 0 or max_total_bytes <= 0 or max_sets <= 0:
            raise ValueError("timeout_s, max_total_bytes and max_sets must be positive")
        self.timeout_s = float(timeout_s)
        self.max_total_bytes = int(max_total_bytes)
        self.max_sets = int(max_sets)
        self._sets: dict[str, _PartialSet] = {}
        self._dropped: list[str] = []  # ids dropped incomplete since the last expire()

    @property
    def in_flight(self) -> int:
        return len(self._sets)

    @property
    def buffered_bytes(self) -> int:
        return sum(s.buffered for s in self._sets.values())

    def add(self, chunk: bytes, now: float) -> bytes | None:
        """The whole payload once the last chunk of its set arrives, else None."""
        c = _decode_chunk(_as_bytes(chunk), self.max_total_bytes)
        self._drop_expired(now)
        s = self._sets.get(c.update_id)
        if s is None:
            if len(self._sets) >= self.max_sets:
                # evict the oldest: a set that has waited longest is the likeliest to be dead
                oldest = min(self._sets, key=lambda k: self._sets[k].started)
                del self._sets[oldest]
                self._dropped.append(oldest)
            s = self._sets[c.update_id] = _PartialSet(c.total, c.size, c.sha256, started=now)
        elif (s.total, s.size, s.sha256) != (c.total, c.size, c.sha256):
            # the set keeps its first description; the sender re-sends a consistent set on timeout
            raise WireError("chunk_mismatch", f"chunk of {c.update_id} disagrees on total/size/sha256")
        old = s.parts.get(c.index)
        if old is not None:
            if old != c.piece:
                raise WireError("chunk_conflict",
                                f"chunk {c.index} of {c.update_id} arrived with other content")
            return None  # QoS 1 redelivery of the same chunk
        if s.buffered + len(c.piece) > s.size:
            raise WireError("chunk_mismatch", f"chunks of {c.update_id} exceed the declared {s.size} bytes")
        s.parts[c.index] = c.piece
        s.buffered += len(c.piece)
        if len(s.parts) < s.total:
            return None
        del self._sets[c.update_id]
        payload = b"".join(s.parts[i] for i in range(s.total))
        if len(payload) != s.size or hashlib.sha256(payload).hexdigest() != s.sha256:
            raise WireError("bad_checksum", f"reassembled {c.update_id} does not match its sha256/size")
        return payload

    def expire(self, now: float) -> list[str]:
        """Drop sets older than timeout_s. Returns the ids of all sets dropped incomplete since the
        last call, whether by age (here or in add) or by eviction."""
        self._drop_expired(now)
        dropped, self._dropped = self._dropped, []
        return dropped

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, s in self._sets.items() if now - s.started > self.timeout_s]:
            del self._sets[key]
            self._dropped.append(key)


# ---------------------------------------------------------------------------- small JSON


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
