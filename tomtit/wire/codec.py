"""Model and update messages: `ModelMessage`, `encode_message`, `decode_message`.

Layout of a model/update message (safetensors):
  - one tensor per trainable parameter, by name; dtype F32, F16 or I8 according to the codec;
  - codec "int8": each value tensor `w` is symmetric per-tensor quantised, q = round(w / s) with
    s = max|w| / 127, and its scale travels as a float32 tensor of shape (1,) named
    `w.__scale__` (a tensor, not metadata text, so the scale is carried bit-exact);
  - `__metadata__`: `proto`, `kind`, `sender`, `job`, `bundle_id`, `base_version`, `version`,
    `num_samples`, `local_steps`, `train_loss`, `energy_j`, `update_id`, `created_at`, `codec`,
    `is_delta`, all strings. Unknown extra keys are ignored so a newer sender can add facts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import safetensors
from safetensors.numpy import save as _safetensors_save

from tomtit.manifest import TensorSpec
from tomtit.wire.errors import (_ID_RE, _UPDATE_ID_RE, WireError, _as_bytes, _check_size, _float_field,
                                _int_field, _no_duplicate_keys, _reject_constant, _short, new_update_id)

PROTO = "1"  # bump when a receiver of the old format would misread the new one
KINDS = ("update", "model")
CODECS = ("f32", "f16", "int8")
SCALE_SUFFIX = ".__scale__"
# safetensors dtype of a value tensor on the wire, per codec
_CODEC_DTYPE = {"f32": "F32", "f16": "F16", "int8": "I8"}
_NUMPY_DTYPE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I8": np.dtype("i1"),
                "U8": np.dtype("u1")}

_INT_RE = re.compile(r"-?[0-9]{1,19}")  # strict: int() alone would also take " 1_0 "


# Ranges of the numeric metadata, checked in one place (`ModelMessage.__post_init__`) for a sender
# before encoding and for a receiver on decoding. Why bounds at all: a node sums and averages
# what its children report and pushes the result upward in a message of this same type, so a
# value that is legal alone must not make the node's own message illegal (a 19-digit
# num_samples, two train_loss of 1e308 averaging to inf). Each bound is far above any real value,
# and small enough that a sum over a million children or a mean stays finite and in range.
MAX_VERSION = 2**53  # versions count aggregations; 2**53 is where float64 stops being exact
MAX_NUM_SAMPLES = 2**40  # ~1.1e12 examples; a node's sum over children is clamped to it
MAX_LOCAL_STEPS = 2**31  # nodes enforce their own, much smaller, max_local_steps
MAX_ABS_LOSS = 1e9  # a training loss; a mean of values within +-1e9 cannot overflow
MAX_ENERGY_J = 1e15  # joules (a 1 GW plant for 12 days)
MAX_CREATED_AT = 1e11  # seconds since the epoch (year ~5100)


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
        for name, top in (("base_version", MAX_VERSION), ("version", MAX_VERSION),
                          ("num_samples", MAX_NUM_SAMPLES), ("local_steps", MAX_LOCAL_STEPS)):
            object.__setattr__(self, name, _int_field(getattr(self, name), name, maximum=top))
        object.__setattr__(self, "train_loss", _float_field(self.train_loss, "train_loss", nonneg=False,
                                                            limit=MAX_ABS_LOSS))
        for name, top in (("energy_j", MAX_ENERGY_J), ("created_at", MAX_CREATED_AT)):
            object.__setattr__(self, name, _float_field(getattr(self, name), name, nonneg=True, limit=top))


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
