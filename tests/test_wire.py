"""Wire-format tests. Expected bytes, topics and error bounds are written out here by hand or
computed independently (safetensors.numpy directly, numpy float16/rounding, hashlib), never by
asking tomtit.wire to check itself."""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import random

import numpy as np
import pytest
import safetensors.numpy as stn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tomtit.errors import TomtitError
from tomtit.manifest import TensorSpec
from tomtit.wire import (
    Ack,
    ErrorReport,
    ModelMessage,
    Presence,
    Reassembler,
    RunConfig,
    Topics,
    WireError,
    MAX_ACKS_PER_MESSAGE,
    FlatDecoder,
    decode_ack,
    decode_acks,
    decode_error,
    decode_message,
    decode_presence,
    decode_run_config,
    decode_telemetry,
    encode_ack,
    encode_acks,
    encode_error,
    encode_message,
    encode_presence,
    encode_run_config,
    encode_telemetry,
    is_chunk,
    split_payload,
)

BUNDLE = hashlib.sha256(b"test bundle").hexdigest()
UID = "0123456789abcdef0123456789abcdef"
MAX = 1 << 20
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def msg(tensors, **kw) -> ModelMessage:
    fields = dict(kind="update", sender="dev-1", job="job1", bundle_id=BUNDLE, base_version=3,
                  version=7, num_samples=120, local_steps=15, train_loss=0.6931, energy_j=12.5,
                  is_delta=True, created_at=1_700_000_000.25, update_id=UID, tensors=tensors)
    fields.update(kw)
    return ModelMessage(**fields)


def specs_of(tensors) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(v.shape)) for name, v in tensors.items()]


def small_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"lora_A": rng.normal(0, 0.05, (4, 6)).astype(np.float32),
            "lora_B": rng.normal(0, 0.05, (6, 4)).astype(np.float32),
            "bias": rng.normal(0, 0.05, (1,)).astype(np.float32)}


GOOD_SPECS = specs_of(small_tensors())


def good_meta(**kw) -> dict[str, str]:
    """A valid message header written out by hand, for crafting bad ones."""
    meta = {"proto": "1", "kind": "update", "sender": "dev-1", "job": "job1", "bundle_id": BUNDLE,
            "base_version": "3", "version": "7", "num_samples": "120", "local_steps": "15",
            "train_loss": "0.6931", "energy_j": "12.5", "update_id": UID,
            "created_at": "1700000000.25", "codec": "f32", "is_delta": "true"}
    meta.update(kw)
    return {k: v for k, v in meta.items() if v is not None}


def decode(data: bytes, tensors=None, **kw) -> ModelMessage:
    args = dict(expected=specs_of(tensors) if tensors is not None else GOOD_SPECS,
                bundle_id=BUNDLE, max_bytes=MAX)
    args.update(kw)
    return decode_message(data, **args)


def reason_of(fn, *args, **kw) -> str:
    with pytest.raises(WireError) as info:
        fn(*args, **kw)
    return info.value.reason


def header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])


# ------------------------------------------------------------------------------ topics


def test_topics_are_exact_strings():
    t = Topics("job1")
    assert t.up("edge-1", "dev_7") == "tomtit/job1/node/edge-1/up/dev_7"
    assert t.up_filter("edge-1") == "tomtit/job1/node/edge-1/up/+"
    assert t.down("cloud") == "tomtit/job1/node/cloud/down"
    assert t.ack("edge-1", "dev.7") == "tomtit/job1/node/edge-1/ack/dev.7"
    assert t.status("dev-1") == "tomtit/job1/status/dev-1"
    assert t.status_filter() == "tomtit/job1/status/+"
    assert t.telemetry("dev-1") == "tomtit/job1/telemetry/dev-1"
    assert t.errors("edge-1") == "tomtit/job1/errors/edge-1"


def test_topics_parse():
    t = Topics("job1")
    assert t.parse_up("tomtit/job1/node/edge-1/up/dev_7") == ("edge-1", "dev_7")
    assert t.parse_ack("tomtit/job1/node/edge-1/ack/dev_7") == ("edge-1", "dev_7")
    assert t.parse_status("tomtit/job1/status/dev-1") == "dev-1"
    for bad in ["tomtit/job2/node/edge-1/up/dev_7", "tomtit/job1/node/edge-1/ack/dev_7",
                "tomtit/job1/node/edge-1/up/+", "tomtit/job1/node/edge-1/up/dev/x",
                "tomtit/job1/node/edge-1/up/", "tomtit/job1/node/edge-1/down", "/tomtit/job1/node/e/up/d",
                "other/job1/node/edge-1/up/dev_7", "", "tomtit/job1/node/e#/up/d"]:
        assert reason_of(t.parse_up, bad) == "bad_topic", bad
    assert reason_of(t.parse_ack, "tomtit/job1/node/edge-1/up/dev_7") == "bad_topic"
    assert reason_of(t.parse_status, "tomtit/job1/status/a/b") == "bad_topic"
    assert reason_of(t.parse_up, None) == "bad_topic"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a+", "x#", "a b", "x" * 65, "é", "a\n",
                                 "$SYS", None, 7])
def test_bad_ids_rejected(bad):
    t = Topics("job1")
    assert reason_of(Topics, bad) == "bad_id"
    assert reason_of(t.up, "edge", bad) == "bad_id"
    assert reason_of(t.up, bad, "dev") == "bad_id"
    assert reason_of(t.down, bad) == "bad_id"
    assert reason_of(t.status, bad) == "bad_id"
    with pytest.raises(ValueError):  # WireError is also a ValueError for callers that expect one
        t.ack("edge", bad)


def test_longest_id_accepted():
    assert Topics("j").down("x" * 64) == "tomtit/j/node/" + "x" * 64 + "/down"


def test_wire_error_is_typed():
    e = WireError("too_large", "5 > 4")
    assert isinstance(e, TomtitError) and isinstance(e, ValueError)
    assert str(e) == "too_large: 5 > 4"
    back = pickle.loads(pickle.dumps(e))
    assert (back.reason, back.detail) == ("too_large", "5 > 4")


# ----------------------------------------------------------------------------- codecs


SHAPES = [(1,), (7,), (3, 5), (8, 384), (2, 3, 4), ()]


def _values(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.05, shape).astype(np.float32)
    if x.size > 2:
        x.flat[0], x.flat[1] = 1.7, 0.0  # an outlier (sets the int8 scale) and an exact zero
    return x


@pytest.mark.parametrize("codec", ["f32", "f16", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip(codec, shape):
    x = _values(shape, seed=len(shape) * 100 + sum(shape))
    tensors = {"w": x, "other.weight": _values((2, 2), 1)}
    m = msg(tensors, codec=codec)
    data = encode_message(m)
    out = decode(data, tensors)

    for f in ("kind", "sender", "job", "bundle_id", "base_version", "version", "num_samples",
              "local_steps", "train_loss", "energy_j", "is_delta", "created_at", "codec", "update_id"):
        assert getattr(out, f) == getattr(m, f), f
    assert set(out.tensors) == set(tensors)
    for name, want in tensors.items():
        got = out.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape
        w64, g64 = want.astype(np.float64), got.astype(np.float64)
        if codec == "f32":
            assert np.array_equal(got, want)
        elif codec == "f16":
            # round-to-nearest: half an ulp, 2^-11 relative for normals; 2^-25 absolute below
            # the smallest normal (6.1e-5) where float16 spacing is the fixed 2^-24
            assert np.all(np.abs(g64 - w64) <= np.abs(w64) * 2.0**-11 + 2.0**-25)
        else:
            scale = np.float64(np.float32(np.max(np.abs(w64)) / 127.0))
            # half a quantisation step, plus float32 rounding of q * scale on the way out
            assert np.all(np.abs(g64 - w64) <= scale / 2 + np.abs(w64) * 2.0**-23)

    # what actually travels, read with safetensors directly
    wire = stn.load(data)
    want_dtype = {"f32": np.float32, "f16": np.float16, "int8": np.int8}[codec]
    assert wire["w"].dtype == want_dtype
    if codec == "int8":
        assert set(wire) == {"w", "w.__scale__", "other.weight", "other.weight.__scale__"}
        assert wire["w.__scale__"].dtype == np.float32 and wire["w.__scale__"].shape == (1,)
        assert np.abs(wire["w"].astype(int)).max() <= 127
    else:
        assert set(wire) == set(tensors)


def test_metadata_is_plain_strings_with_proto():
    data = encode_message(msg(small_tensors(), kind="model", is_delta=False, codec="f16"))
    meta = header(data)["__metadata__"]
    assert meta == good_meta(kind="model", is_delta="false", codec="f16")


def test_encode_codec_argument_overrides_message_codec():
    data = encode_message(msg(small_tensors(), codec="f32"), codec="int8")
    out = decode(data)
    assert out.codec == "int8"
    assert header(data)["__metadata__"]["codec"] == "int8"


def test_int8_all_zero_tensor():
    tensors = {"z": np.zeros((3, 3), np.float32)}
    out = decode(encode_message(msg(tensors), codec="int8"), tensors)
    assert np.array_equal(out.tensors["z"], tensors["z"])


def test_decoded_arrays_are_writable_copies():
    out = decode(encode_message(msg(small_tensors())))
    out.tensors["lora_A"][0, 0] = 5.0  # must not raise: callers update models in place


def _lora_adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """Shaped like a MiniLM-L6 LoRA update: r=8 on query/value of 6 layers, hidden 384, plus
    a 4-label head. Gaussian entries are a harder case for int8 than uniform ones (heavier tail)."""
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {}
    for layer in range(6):
        for mod in ("query", "value"):
            p = f"bert.encoder.layer.{layer}.attention.self.{mod}"
            t[f"{p}.lora_A.weight"] = rng.normal(0, 1 / math.sqrt(384), (8, 384)).astype(np.float32)
            t[f"{p}.lora_B.weight"] = rng.normal(0, 2e-3, (384, 8)).astype(np.float32)
    t["classifier.weight"] = rng.normal(0, 0.02, (4, 384)).astype(np.float32)
    t["classifier.bias"] = rng.normal(0, 0.01, (4,)).astype(np.float32)
    return t


def _rel_l2(got: dict, want: dict) -> float:
    num = sum(float(np.sum((got[k].astype(np.float64) - want[k]) ** 2)) for k in want)
    den = sum(float(np.sum(want[k].astype(np.float64) ** 2)) for k in want)
    return math.sqrt(num / den)


def test_accuracy_cost_of_compressed_codecs():
    tensors = _lora_adapter()
    sizes, errors = {}, {}
    for codec in ("f32", "f16", "int8"):
        data = encode_message(msg(tensors), codec=codec)
        sizes[codec] = len(data)
        errors[codec] = _rel_l2(decode(data, tensors).tensors, tensors)
    assert errors["f32"] == 0.0
    # f16: round-to-nearest with an 11-bit significand; per element |err| <= 2^-11 |x| for
    # normals, so the relative L2 error is < 2^-11 (~4.9e-4); uniform rounding noise predicts
    # ~2^-11/sqrt(3) ~ 2.8e-4.
    assert errors["f16"] < 2.0**-11
    # int8: rounding noise ~ uniform(-s/2, s/2) with s = max|x|/127, so per tensor
    # rel_err ~ s*sqrt(n/12)/||x|| = max|x| / (127 * sqrt(12) * rms(x)). For Gaussian tensors of
    # 3072 entries max/rms is ~3.5-4, i.e. ~0.8-0.9%: the 1% bound holds with a margin, and the
    # measured error must match the noise model computed here independently.
    predicted_sq = sum((np.max(np.abs(v)) / 127.0) ** 2 / 12 * v.size for v in tensors.values())
    predicted = math.sqrt(predicted_sq / sum(float(np.sum(v.astype(np.float64) ** 2)) for v in tensors.values()))
    assert errors["int8"] < 0.01
    assert 0.85 * predicted < errors["int8"] < 1.15 * predicted
    # and what the error buys: 2x and ~4x fewer bytes on the uplink
    assert sizes["f16"] < 0.52 * sizes["f32"]
    assert sizes["int8"] < 0.27 * sizes["f32"]


# ------------------------------------------------------------------------- rejections


def _raw(meta: dict[str, str] | None, tensors: dict[str, np.ndarray]) -> bytes:
    return stn.save(tensors, metadata=meta)


def _handmade(header_obj_text: str, body: bytes) -> bytes:
    h = header_obj_text.encode()
    return len(h).to_bytes(8, "little") + h + body


GOOD = small_tensors()
F16 = {k: v.astype(np.float16) for k, v in GOOD.items()}


def _int8_parts(scale=0.01, scale_shape=(1,), drop_scale=None):
    out = {}
    for k, v in GOOD.items():
        out[k] = np.clip(np.rint(v / 0.01), -127, 127).astype(np.int8)
        if k != drop_scale:
            out[k + ".__scale__"] = np.full(scale_shape, scale, np.float32)
    return out


def _layout(entries):
    """Header entries for tensors laid out back to back: (name, dtype, shape, nbytes)."""
    out, offset = {}, 0
    for name, dtype, shape, nbytes in entries:
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return out


def _with(name, value, base=GOOD):
    t = dict(base)
    t[name] = value
    return t


def _without(name, base=GOOD):
    return {k: v for k, v in base.items() if k != name}


VALID = _raw(good_meta(), GOOD)
NAN_A = _with("lora_A", np.where(np.eye(4, 6) > 0, np.nan, GOOD["lora_A"]).astype(np.float32))

MALFORMED = {
    # size
    "empty": (b"", "empty"),
    # parse
    "truncated_by_one": (VALID[:-1], "not_safetensors"),
    "truncated_half": (VALID[: len(VALID) // 2], "not_safetensors"),
    "only_length": (VALID[:8], "not_safetensors"),
    "shorter_than_length": (VALID[:5], "not_safetensors"),
    "huge_header_length": ((2**63).to_bytes(8, "little") + VALID[8:], "not_safetensors"),
    "length_past_end": ((len(VALID)).to_bytes(8, "little") + VALID[8:], "not_safetensors"),
    "garbage": (bytes(range(256)) * 4, "not_safetensors"),
    "pickle": (pickle.dumps({"lora_A": GOOD["lora_A"]}), "not_safetensors"),
    "json_not_object": (_handmade("[1, 2]", b""), "not_safetensors"),
    "duplicate_header_key": (_handmade(
        '{"__metadata__":{"proto":"1"},"__metadata__":{"proto":"1"}}', b""), "not_safetensors"),
    # metadata
    "no_metadata": (_raw(None, GOOD), "bad_metadata"),
    "no_proto": (_raw(good_meta(proto=None), GOOD), "bad_proto"),
    "future_proto": (_raw(good_meta(proto="2"), GOOD), "bad_proto"),
    "missing_sender": (_raw(good_meta(sender=None), GOOD), "bad_metadata"),
    "missing_update_id": (_raw(good_meta(update_id=None), GOOD), "bad_metadata"),
    "unknown_kind": (_raw(good_meta(kind="gradient"), GOOD), "bad_metadata"),
    "version_float": (_raw(good_meta(version="1.5"), GOOD), "bad_metadata"),
    "version_underscore": (_raw(good_meta(version="1_0"), GOOD), "bad_metadata"),
    "version_negative": (_raw(good_meta(base_version="-1"), GOOD), "bad_metadata"),
    "samples_negative": (_raw(good_meta(num_samples="-5"), GOOD), "bad_metadata"),
    "steps_text": (_raw(good_meta(local_steps="many"), GOOD), "bad_metadata"),
    "loss_nan": (_raw(good_meta(train_loss="nan"), GOOD), "bad_metadata"),
    "energy_inf": (_raw(good_meta(energy_j="inf"), GOOD), "bad_metadata"),
    "energy_negative": (_raw(good_meta(energy_j="-1.0"), GOOD), "bad_metadata"),
    "created_text": (_raw(good_meta(created_at="yesterday"), GOOD), "bad_metadata"),
    "update_id_short": (_raw(good_meta(update_id="abc"), GOOD), "bad_metadata"),
    "update_id_upper": (_raw(good_meta(update_id=UID.upper()), GOOD), "bad_metadata"),
    "is_delta_yes": (_raw(good_meta(is_delta="yes"), GOOD), "bad_metadata"),
    "sender_slash": (_raw(good_meta(sender="a/b"), GOOD), "bad_metadata"),
    "unknown_codec": (_raw(good_meta(codec="int4"), GOOD), "bad_codec"),
    "chunk_to_decoder": (split_payload(VALID + bytes(2000), update_id=UID, limit=1024)[0], "wrong_kind"),
    # identity
    "wrong_bundle": (_raw(good_meta(bundle_id="0" * 64), GOOD), "wrong_bundle"),
    # tensors
    "missing_tensor": (_raw(good_meta(), _without("bias")), "wrong_tensors"),
    "extra_tensor": (_raw(good_meta(), _with("lora_C", GOOD["bias"])), "wrong_tensors"),
    "scale_name_under_f32": (_raw(good_meta(), _with("bias.__scale__", GOOD["bias"])), "wrong_tensors"),
    "wrong_shape": (_raw(good_meta(), _with("lora_A", GOOD["lora_A"].T.copy())), "wrong_shape"),
    "flattened": (_raw(good_meta(), _with("lora_A", GOOD["lora_A"].ravel())), "wrong_shape"),
    "bf16_under_f32": (_handmade(json.dumps({"__metadata__": good_meta(), **_layout(
        [("lora_A", "F32", [4, 6], 96), ("lora_B", "F32", [6, 4], 96), ("bias", "BF16", [1], 2)])}),
        bytes(194)), "wrong_dtype"),
    "f64_under_f32": (_raw(good_meta(), _with("bias", GOOD["bias"].astype(np.float64))), "wrong_dtype"),
    "i32_under_f32": (_raw(good_meta(), _with("bias", np.array([1], np.int32))), "wrong_dtype"),
    "f32_under_f16": (_raw(good_meta(codec="f16"), _with("bias", GOOD["bias"], F16)), "wrong_dtype"),
    "f32_under_int8": (_raw(good_meta(codec="int8"), _with("bias", GOOD["bias"], _int8_parts())), "wrong_dtype"),
    "int8_no_scale": (_raw(good_meta(codec="int8"), _int8_parts(drop_scale="bias")), "bad_codec"),
    "int8_orphan_scale": (_raw(good_meta(codec="int8"),
                               _with("zz.__scale__", np.ones(1, np.float32), _int8_parts())), "bad_codec"),
    "int8_scale_shape": (_raw(good_meta(codec="int8"), _int8_parts(scale_shape=(2,))), "bad_codec"),
    "int8_negative_scale": (_raw(good_meta(codec="int8"), _int8_parts(scale=-0.01)), "bad_codec"),
    "int8_nan_scale": (_raw(good_meta(codec="int8"), _int8_parts(scale=np.nan)), "not_finite"),
    "int8_overflowing_scale": (_raw(good_meta(codec="int8"), _int8_parts(scale=3e38)), "not_finite"),
    # values
    "nan": (_raw(good_meta(), NAN_A), "not_finite"),
    "inf": (_raw(good_meta(), _with("bias", np.array([np.inf], np.float32))), "not_finite"),
    "neg_inf_f16": (_raw(good_meta(codec="f16"), _with("bias", np.array([-np.inf], np.float16), F16)), "not_finite"),
    # order: the earlier check wins
    "bad_bundle_and_nan": (_raw(good_meta(bundle_id="0" * 64), NAN_A), "wrong_bundle"),
    "bad_metadata_and_missing_tensor": (_raw(good_meta(version="x"), _without("bias")), "bad_metadata"),
    "wrong_tensors_and_nan": (_raw(good_meta(), _without("bias", NAN_A)), "wrong_tensors"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_rejected_with_reason(case):
    data, reason = MALFORMED[case]
    assert reason_of(decode, data) == reason


def test_valid_handmade_message_accepted():
    out = decode(VALID)
    assert (out.sender, out.version, out.train_loss, out.is_delta) == ("dev-1", 7, 0.6931, True)
    assert np.array_equal(out.tensors["lora_B"], GOOD["lora_B"])


def test_int8_handmade_decodes_to_q_times_scale():
    out = decode(_raw(good_meta(codec="int8"), _int8_parts()))
    want = np.clip(np.rint(GOOD["lora_A"] / 0.01), -127, 127) * np.float32(0.01)
    assert np.allclose(out.tensors["lora_A"], want, rtol=1e-6, atol=0)


def test_size_bound():
    assert reason_of(decode, VALID, max_bytes=len(VALID) - 1) == "too_large"
    assert decode(VALID, max_bytes=len(VALID)).sender == "dev-1"
    assert reason_of(decode, b"\0" * 100, max_bytes=10) == "too_large"  # before parsing


def test_identity_checks_in_order():
    assert reason_of(decode, VALID, expect_sender="dev-2") == "wrong_sender"
    assert reason_of(decode, VALID, expect_kind="model") == "wrong_kind"
    assert reason_of(decode, VALID, expect_job="job2") == "wrong_job"
    # sender is checked before the bundle
    assert reason_of(decode, VALID, expect_sender="dev-2", bundle_id="0" * 64) == "wrong_sender"
    out = decode(VALID, expect_sender="dev-1", expect_kind="update", expect_job="job1")
    assert out.kind == "update"


def test_expected_spec_dtype_must_be_float32():
    specs = [TensorSpec(s.name, s.shape, "float16") if s.name == "bias" else s for s in specs_of(GOOD)]
    assert reason_of(decode_message, VALID, expected=specs, bundle_id=BUNDLE, max_bytes=MAX) == "wrong_dtype"


def test_no_expectations_skips_comparisons():
    out = decode_message(_raw(good_meta(), {"anything": np.ones(3, np.float32)}),
                         expected=None, bundle_id=None, max_bytes=MAX)
    assert list(out.tensors) == ["anything"]


def test_unknown_metadata_keys_ignored():
    assert decode(_raw(good_meta(future_field="x"), GOOD)).sender == "dev-1"


def test_decoder_accepts_bytearray_and_memoryview():
    assert decode(bytearray(VALID)).sender == decode(memoryview(VALID)).sender == "dev-1"


@pytest.mark.parametrize("bad, reason", [
    (_with("bias", np.array([np.nan], np.float32)), "not_finite"),
    (_with("bias", np.array([1e300])), "not_finite"),  # float64 beyond float32 range
    (_with("bias", np.array(["a"])), "wrong_dtype"),
    (_with("x.__scale__", np.ones(1, np.float32)), "wrong_tensors"),
    (_with("__metadata__", np.ones(1, np.float32)), "wrong_tensors"),
    (_with("", np.ones(1, np.float32)), "wrong_tensors"),
])
def test_encoder_refuses(bad, reason):
    assert reason_of(encode_message, msg(bad)) == reason


def test_encoder_refuses_f16_overflow_and_unknown_codec():
    assert reason_of(encode_message, msg(_with("bias", np.array([7e4], np.float32))), codec="f16") == "not_finite"
    assert encode_message(msg(_with("bias", np.array([7e4], np.float32))), codec="int8")  # int8 copes
    assert reason_of(encode_message, msg(GOOD), codec="bf16") == "bad_codec"


@pytest.mark.parametrize("field, value, reason", [
    ("kind", "chunk", "bad_metadata"), ("codec", "f8", "bad_codec"), ("version", -1, "bad_metadata"),
    ("version", True, "bad_metadata"), ("num_samples", 1.0, "bad_metadata"),
    ("train_loss", float("nan"), "bad_metadata"), ("energy_j", -0.1, "bad_metadata"),
    ("update_id", "not-hex", "bad_metadata"), ("sender", "a/b", "bad_metadata"),
    ("bundle_id", "", "bad_metadata"), ("is_delta", "yes", "bad_metadata"),
])
def test_message_constructor_validates(field, value, reason):
    assert reason_of(msg, GOOD, **{field: value}) == reason


def test_message_normalises_numpy_scalars_and_makes_update_ids():
    m = ModelMessage(kind="model", sender="edge-1", job="j", bundle_id=BUNDLE, base_version=np.int64(2),
                     version=np.int32(3), num_samples=0, local_steps=0, train_loss=np.float32(0.5),
                     energy_j=0, is_delta=np.bool_(False), created_at=0, tensors={})
    assert type(m.version) is int and type(m.train_loss) is float and m.is_delta is False
    other = ModelMessage(kind="model", sender="edge-1", job="j", bundle_id=BUNDLE, base_version=0,
                         version=0, num_samples=0, local_steps=0, train_loss=0, energy_j=0,
                         is_delta=False, created_at=0, tensors={})
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in (m.update_id, other.update_id))
    assert m.update_id != other.update_id


# ----------------------------------------------------------------------------- chunks


def _payload(n_bytes: int = 20_000, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_message(msg({"w": rng.normal(size=(n_bytes // 4,)).astype(np.float32)}))


def test_small_payload_is_not_chunked():
    payload = _payload()
    assert split_payload(payload, update_id=UID, limit=len(payload)) == [payload]
    assert len(split_payload(payload, update_id=UID, limit=len(payload) - 1)) == 2


def test_chunks_fit_the_limit_and_carry_their_facts():
    payload = _payload()
    chunks = split_payload(payload, update_id=UID, limit=4096)
    assert 1 < len(chunks) <= math.ceil(len(payload) / (4096 - 400))
    assert all(len(c) <= 4096 for c in chunks)
    assert all(is_chunk(c) for c in chunks) and not is_chunk(payload) and not is_chunk(b"junk")
    sha = hashlib.sha256(payload).hexdigest()
    pieces = []
    for i, c in enumerate(chunks):
        meta = header(c)["__metadata__"]
        assert meta == {"proto": "1", "kind": "chunk", "update_id": UID, "index": str(i),
                        "total": str(len(chunks)), "size": str(len(payload)), "sha256": sha}
        pieces.append(stn.load(c)["data"].tobytes())
    assert b"".join(pieces) == payload


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled", "with_duplicates"])
def test_reassembly_orders(order):
    payload = _payload()
    chunks = split_payload(payload, update_id=UID, limit=2048)
    if order == "reverse":
        chunks = chunks[::-1]
    elif order == "shuffled":
        random.Random(1).shuffle(chunks)
    elif order == "with_duplicates":
        chunks = [c for c in chunks for _ in range(2)]
        random.Random(2).shuffle(chunks)
    r = Reassembler(timeout_s=30, max_total_bytes=MAX)
    results = [r.add(c, now=0.0) for c in chunks]
    done = [x for x in results if x is not None]
    # a duplicate after completion starts a new set: allowed, it simply never completes alone
    assert done == [payload] and results.index(payload) >= len(set(chunks)) - 1
    assert decode_message(done[0], expected=[TensorSpec("w", (5000,))], bundle_id=BUNDLE,
                          max_bytes=MAX).sender == "dev-1"


def test_resent_set_is_returned_again_for_re_ack():
    payload = _payload()
    chunks = split_payload(payload, update_id=UID, limit=4096)
    r = Reassembler(timeout_s=30, max_total_bytes=MAX)
    assert [r.add(c, 0.0) for c in chunks][-1] == payload
    assert [r.add(c, 1.0) for c in chunks][-1] == payload
    assert r.in_flight == 0


def _rechunk(chunk: bytes, *, data: bytes | None = None, **meta_changes) -> bytes:
    """Re-encode a chunk with safetensors directly, changing its data or metadata."""
    meta = dict(header(chunk)["__metadata__"])
    meta.update({k: str(v) for k, v in meta_changes.items()})
    arr = stn.load(chunk)["data"] if data is None else np.frombuffer(data, np.uint8)
    return stn.save({"data": arr}, metadata=meta)


def test_corrupted_chunk_fails_checksum_and_drops_set():
    payload = _payload()
    chunks = split_payload(payload, update_id=UID, limit=4096)
    piece = stn.load(chunks[1])["data"].tobytes()
    chunks[1] = _rechunk(chunks[1], data=bytes([piece[0] ^ 1]) + piece[1:])
    r = Reassembler(timeout_s=30, max_total_bytes=MAX)
    for c in chunks[:-1]:
        assert r.add(c, 0.0) is None
    assert reason_of(r.add, chunks[-1], 0.0) == "bad_checksum"
    assert r.in_flight == 0


def test_inconsistent_chunks_rejected():
    payload = _payload()
    chunks = split_payload(payload, update_id=UID, limit=4096)
    r = Reassembler(timeout_s=30, max_total_bytes=MAX)
    assert r.add(chunks[0], 0.0) is None
    n = len(chunks)
    assert reason_of(r.add, _rechunk(chunks[1], total=n + 1), 0.0) == "chunk_mismatch"
    assert reason_of(r.add, _rechunk(chunks[1], sha256="0" * 64), 0.0) == "chunk_mismatch"
    assert reason_of(r.add, _rechunk(chunks[1], size=len(payload) + 1), 0.0) == "chunk_mismatch"
    other = stn.load(chunks[0])["data"].tobytes()[::-1]
    assert reason_of(r.add, _rechunk(chunks[0], data=other), 0.0) == "chunk_conflict"
    assert r.add(chunks[0], 0.0) is None  # the identical duplicate is harmless
    # the set survived the bad chunks and still completes with the genuine ones
    assert [r.add(c, 0.0) for c in chunks[1:]][-1] == payload


@pytest.mark.parametrize("change, reason", [
    (dict(index=99), "bad_chunk"), (dict(index=-1), "bad_chunk"), (dict(total=0), "bad_chunk"),
    (dict(total="x"), "bad_chunk"), (dict(update_id="xyz"), "bad_chunk"), (dict(sha256="ab"), "bad_chunk"),
    (dict(kind="update"), "bad_chunk"), (dict(proto="9"), "bad_proto"), (dict(size=10**9), "too_large"),
    (dict(total=10**6), "bad_chunk"),  # more chunks than bytes
])
def test_bad_chunk_metadata(change, reason):
    chunk = split_payload(_payload(), update_id=UID, limit=4096)[0]
    assert reason_of(Reassembler(30, MAX).add, _rechunk(chunk, **change), 0.0) == reason


def test_bad_chunk_shapes():
    r = Reassembler(30, MAX)
    meta = header(split_payload(_payload(), update_id=UID, limit=4096)[0])["__metadata__"]
    assert reason_of(r.add, stn.save({"data": np.ones(4, np.float32)}, metadata=meta), 0) == "bad_chunk"
    assert reason_of(r.add, stn.save({"data": np.ones((2, 2), np.uint8)}, metadata=meta), 0) == "bad_chunk"
    assert reason_of(r.add, stn.save({"x": np.ones(4, np.uint8)}, metadata=meta), 0) == "bad_chunk"
    assert reason_of(r.add, stn.save({"data": np.ones(0, np.uint8)}, metadata=meta), 0) == "bad_chunk"
    assert reason_of(r.add, VALID, 0) == "bad_chunk"
    assert reason_of(r.add, b"", 0) == "empty"
    assert reason_of(r.add, b"\xff" * 64, 0) == "not_safetensors"


def test_oversize_set_rejected():
    chunks = split_payload(_payload(), update_id=UID, limit=4096)
    r = Reassembler(timeout_s=30, max_total_bytes=10_000)  # payload is ~20 kB
    assert reason_of(r.add, chunks[0], 0.0) == "too_large"
    assert r.in_flight == 0


def test_timeout_expiry():
    payload = _payload()
    chunks = split_payload(payload, update_id=UID, limit=4096)
    half = len(chunks) // 2
    r = Reassembler(timeout_s=10, max_total_bytes=MAX)
    for c in chunks[:half]:
        r.add(c, now=100.0)
    assert r.expire(110.0) == []  # exactly timeout_s old: not yet older
    assert r.in_flight == 1 and r.buffered_bytes > 0
    assert r.expire(110.5) == [("", UID)]
    assert r.in_flight == 0 and r.buffered_bytes == 0
    assert r.expire(111.0) == []
    # the rest arriving late cannot complete the dropped set
    assert all(r.add(c, now=111.0) is None for c in chunks[half:])
    # and add() itself drops what is stale, reporting it at the next expire()
    r.add(split_payload(_payload(seed=1), update_id="f" * 32, limit=4096)[0], now=200.0)
    assert r.in_flight == 1 and r.expire(200.0) == [("", UID)]


def test_in_flight_sets_are_capped():
    r = Reassembler(timeout_s=100, max_total_bytes=MAX, max_sets=2)
    ids = [f"{i:032x}" for i in range(3)]
    payloads = [_payload(seed=i) for i in range(3)]
    sets = [split_payload(p, update_id=u, limit=4096) for p, u in zip(payloads, ids)]
    for t, chunks in enumerate(sets):
        r.add(chunks[0], now=float(t))
    assert r.in_flight == 2
    assert r.expire(3.0) == [("", ids[0])]  # the oldest was evicted
    assert [r.add(c, 4.0) for c in sets[2][1:]][-1] == payloads[2]


def test_a_chunk_set_never_combines_chunks_from_two_sources():
    payload = _payload()
    chunks = split_payload(payload, update_id=UID, limit=4096)
    r = Reassembler(timeout_s=10, max_total_bytes=MAX)
    half = len(chunks) // 2
    assert all(r.add(c, 0.0, source="d01") is None for c in chunks[:half])
    # the other half, on another child's topic, opens a second set instead of completing the first
    assert all(r.add(c, 0.0, source="d02") is None for c in chunks[half:])
    assert r.in_flight == 2
    assert sorted(r.expire(11.0)) == [("d01", UID), ("d02", UID)]
    assert [r.add(c, 20.0, source="d01") for c in chunks][-1] == payload  # one source, whole set


def test_split_payload_arguments():
    with pytest.raises(ValueError):
        split_payload(b"x" * 5000, update_id=UID, limit=100)
    assert reason_of(split_payload, b"x" * 5000, update_id="nope", limit=2048) == "bad_id"


@pytest.mark.parametrize("size, limit", [(1025, 1024), (10_007, 1024), (300_000, 65_536)])
def test_split_sizes(size, limit):
    payload = random.Random(size).randbytes(size)
    chunks = split_payload(payload, update_id=UID, limit=limit)
    assert len(chunks) > 1 and all(len(c) <= limit for c in chunks)
    # close to the limit: no more chunks than a 400-byte header each would need
    assert len(chunks) <= math.ceil(size / (limit - 400))
    r = Reassembler(30, MAX)
    assert [r.add(c, 0) for c in chunks][-1] == payload


# -------------------------------------------------------------------------------- JSON

ACK_OK = {"update_id": UID, "status": "applied", "reason": "", "node_version": 1}



def test_ack_bytes_are_exact():
    ack = Ack(update_id=UID, status="rejected", reason="wrong_bundle", node_version=4)
    data = encode_ack(ack)
    assert data == (b'{"node_version":4,"reason":"wrong_bundle","status":"rejected","update_id":"'
                    + UID.encode() + b'"}')
    assert decode_ack(data) == ack


def test_ack_batches():
    acks = [Ack(update_id=f"{i:032x}", status=s, reason="stale" if s == "rejected" else "", node_version=i)
            for i, s in enumerate(["applied", "rejected", "duplicate"])]
    data = encode_acks(acks)
    assert json.loads(data) == {"acks": [{"node_version": a.node_version, "reason": a.reason, "status": a.status,
                                          "update_id": a.update_id} for a in acks]}
    assert decode_acks(data) == acks
    # a single ack (what encode_ack writes) is a batch of one
    assert decode_acks(encode_ack(acks[1])) == [acks[1]]
    # the largest batch at its largest fits the batch size limit
    worst = [Ack(update_id=UID, status="duplicate", reason="r" * 32, node_version=2**63 - 1)] * MAX_ACKS_PER_MESSAGE
    assert decode_acks(encode_acks(worst)) == worst
    assert reason_of(encode_acks, []) == "bad_schema"
    assert reason_of(encode_acks, worst + worst[:1]) == "bad_schema"


@pytest.mark.parametrize("obj", [
    {"acks": []}, {"acks": {"update_id": UID}}, {"acks": [ACK_OK, 3]}, {"acks": [ACK_OK] * 257},
    {"acks": [dict(ACK_OK, status="lost")]}, {"acks": [{"update_id": UID}]}, {"acks": None},
], ids=["empty", "not_a_list", "not_objects", "too_many", "bad_status", "incomplete", "null"])
def test_bad_ack_batches_rejected(obj):
    assert reason_of(decode_acks, json.dumps(obj).encode()) == "bad_schema"


def test_presence_and_error_round_trip():
    p = Presence(id="dev-1", state="offline", role="device", version=3, ts=1700000000.5)
    assert encode_presence(p) == b'{"id":"dev-1","role":"device","state":"offline","ts":1700000000.5,"version":3}'
    assert decode_presence(encode_presence(p)) == p
    assert decode_presence(b'{"id":"e","state":"online","role":"node","version":0,"ts":0}').ts == 0.0
    e = ErrorReport(update_id="", sender="dev-1", reason="not_safetensors", detail="x" * 5000)
    back = decode_error(encode_error(e))
    assert back == e and back.detail == "x" * 512  # truncated, not refused
    # the worst case for size: every detail char escaped to 6 bytes, every other field at its maximum
    worst = ErrorReport(update_id=UID, sender="s" * 64, reason="r" * 32, detail="\x01" * 5000)
    assert decode_error(encode_error(worst)) == worst


def test_telemetry_round_trip():
    t = {"loss": 0.25, "energy_j": 3, "interval_s": 60.0, "state": "training", "charging": False}
    assert decode_telemetry(encode_telemetry(t)) == t
    assert reason_of(encode_telemetry, {"x": float("nan")}) == "bad_schema"
    assert reason_of(encode_telemetry, {"x": [1, 2]}) == "bad_schema"
    assert reason_of(encode_telemetry, {"x": "y" * 20_000}) == "too_large"


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b" " * 5000, "too_large"),
    (b"\xff\xfe{}", "not_json"),
    (b"{", "not_json"),
    (b"[1]", "not_json"),
    (b'"applied"', "not_json"),
    (b'{"a":1,"a":2}', "not_json"),
    (b'{"update_id":"' + UID.encode() + b'","status":"applied","reason":"","node_version":NaN}', "not_json"),
    (b"[" * 3000 + b"]" * 3000, "too_large"),
    (b"[" * 2000 + b"]" * 2000, "not_json"),  # too deep to parse
    (_j({k: v for k, v in ACK_OK.items() if k != "status"}), "bad_schema"),
    (_j({**ACK_OK, "status": "maybe"}), "bad_schema"),
    (_j({**ACK_OK, "update_id": "u1"}), "bad_schema"),
    (_j({**ACK_OK, "node_version": "1"}), "bad_schema"),
    (_j({**ACK_OK, "node_version": True}), "bad_schema"),
    (_j({**ACK_OK, "node_version": -1}), "bad_schema"),
    (_j({**ACK_OK, "node_version": 1.0}), "bad_schema"),
    (_j({**ACK_OK, "reason": "Has Spaces"}), "bad_schema"),
    (_j({**ACK_OK, "reason": None}), "bad_schema"),
])
def test_bad_ack_rejected(data, reason):
    assert reason_of(decode_ack, data) == reason


def test_json_extra_keys_ignored():
    assert decode_ack(_j({**ACK_OK, "later": [1, 2]})) == Ack(UID, "applied", "", 1)


@pytest.mark.parametrize("obj", [
    {"id": "a/b", "state": "online", "role": "device", "version": 0, "ts": 0},
    {"id": "a", "state": "away", "role": "device", "version": 0, "ts": 0},
    {"id": "a", "state": "online", "role": "device", "version": 0, "ts": -1},
    {"id": "a", "state": "online", "role": "device", "version": 0, "ts": 10**400},
    {"id": "a", "state": "online", "role": "", "version": 0, "ts": 0},
])
def test_bad_presence_rejected(obj):
    assert reason_of(decode_presence, _j(obj)) == "bad_schema"


def test_bad_error_reports_and_telemetry_rejected():
    assert reason_of(decode_error, _j({"update_id": "", "sender": "", "reason": "x", "detail": ""})) == "bad_schema"
    assert reason_of(decode_error, _j({"update_id": "", "sender": "d", "reason": "", "detail": ""})) == "bad_schema"
    assert reason_of(decode_telemetry, b'{"a":{"b":1}}') == "bad_schema"
    assert reason_of(decode_telemetry, b'{"a":Infinity}') == "not_json"
    assert reason_of(decode_telemetry, b'{"":1}') == "bad_schema"
    assert reason_of(decode_telemetry, b"[]") == "not_json"


# ------------------------------------------------------------------- FlatDecoder (node hot path)
# The contract: exactly what decode_message + flatten accept, with the same values and, on
# rejection, the same reason. Every case below is run through both and compared.

_FLAT = FlatDecoder(GOOD_SPECS, bundle_id=BUNDLE, max_bytes=MAX)


def _flat_agrees(data: bytes, decoder: FlatDecoder = _FLAT, **expect) -> np.ndarray | None:
    """Decode with both; assert they agree; the flat values (None when both rejected)."""
    try:
        slow = decode_message(data, expected=decoder.expected, bundle_id=decoder.bundle_id,
                              max_bytes=decoder.max_bytes, **expect)
    except WireError as e:
        assert reason_of(decoder.decode, data, **expect) == e.reason
        return None
    head, flat = decoder.decode(data, **expect)
    want = np.concatenate([np.asarray(slow.tensors[s.name], np.float32).ravel() for s in decoder.expected])
    assert flat.dtype == np.float32 and flat.shape == want.shape
    assert np.array_equal(flat.view(np.uint32), want.view(np.uint32))  # bit for bit, signs of zero too
    for f in ("kind", "sender", "job", "bundle_id", "base_version", "version", "num_samples", "local_steps",
              "train_loss", "energy_j", "is_delta", "created_at", "codec", "update_id"):
        assert getattr(head, f) == getattr(slow, f), f
    return flat


@pytest.mark.parametrize("case", list(MALFORMED))
def test_flat_decoder_rejects_like_decode_message(case):
    data, reason = MALFORMED[case]
    assert _flat_agrees(data) is None
    assert reason_of(_FLAT.decode, data) == reason


@pytest.mark.parametrize("codec", ["f32", "f16", "int8"])
def test_flat_decoder_values_in_bundle_order(codec):
    data = encode_message(msg(GOOD, codec=codec))
    flat = _flat_agrees(data)
    # bundle order is the spec order (lora_A, lora_B, bias), not the wire's (sorted by name)
    parts = [decode(data).tensors[s.name].ravel() for s in GOOD_SPECS]
    assert np.array_equal(flat, np.concatenate(parts))
    assert _flat_agrees(data, expect_kind="model") is None  # wrong_kind, as decode_message says
    assert _flat_agrees(data, expect_sender="dev-2") is None
    assert _flat_agrees(data, expect_job="other") is None


def test_flat_decoder_any_valid_layout_and_its_cache():
    """A valid payload may order its tensors' bytes any way; the decoder keeps the last layout it
    checked, so alternate between layouts to catch a stale cache."""
    f16 = {k: v.astype(np.float16) for k, v in GOOD.items()}
    names = ["bias", "lora_B", "lora_A"]  # a byte order no encoder of ours writes
    body = b"".join(f16[n].tobytes() for n in names)
    entries = [(n, "F16", list(f16[n].shape), f16[n].nbytes) for n in names]
    reordered = _handmade(json.dumps({"__metadata__": good_meta(codec="f16"), **_layout(entries)}), body)
    standard = encode_message(msg(GOOD, codec="f16"))
    want = np.concatenate([f16[s.name].astype(np.float32).ravel() for s in GOOD_SPECS])
    for data in (standard, reordered, standard, reordered):
        assert np.array_equal(_flat_agrees(data), want)
    # same table, different data-area length (a truncated body): the cache must not accept it
    assert _flat_agrees(standard[:-2]) is None


def test_flat_decoder_is_exact_for_every_float16():
    """All 63,488 finite float16 values (and both zeros) decode to numpy's own float32 of them."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    spec = [TensorSpec("all", (finite.size,))]
    dec = FlatDecoder(spec, bundle_id=BUNDLE, max_bytes=MAX)
    data = _raw(good_meta(codec="f16"), {"all": finite})
    head, flat = dec.decode(data)
    assert np.array_equal(flat.view(np.uint32), finite.astype(np.float32).view(np.uint32))
    for bad in (np.inf, -np.inf, np.nan):
        one = finite.copy()
        one[12345] = bad
        assert reason_of(dec.decode, _raw(good_meta(codec="f16"), {"all": one})) == "not_finite"


@pytest.mark.parametrize("edit", ["float_shape", "float_offset", "bool_offset", "extra_key", "leading_space",
                                  "escaped_name", "offsets_swapped", "gap", "overlap", "utf16", "utf32",
                                  "minus_zero"])
def test_flat_decoder_irregular_headers_follow_the_reference(edit):
    """Header forms the fast path does not take itself: it must hand them to the reference."""
    h = header(VALID)
    body = VALID[8 + int.from_bytes(VALID[:8], "little"):]
    text = None
    if edit == "float_shape":
        h["lora_A"]["shape"] = [4.0, 6]
    elif edit == "float_offset":
        h["bias"]["data_offsets"] = [0.0, 4]
    elif edit == "bool_offset":
        h["bias"]["data_offsets"] = [False, 4]
    elif edit == "extra_key":
        h["bias"]["note"] = "x"
    elif edit == "offsets_swapped":
        h["lora_A"]["data_offsets"], h["lora_B"]["data_offsets"] = h["lora_B"]["data_offsets"], h["lora_A"]["data_offsets"]
    elif edit == "gap":
        h["bias"]["data_offsets"] = [h["bias"]["data_offsets"][0] + 4, h["bias"]["data_offsets"][1] + 4]
        body += bytes(4)
    elif edit == "overlap":
        h["lora_B"]["data_offsets"] = list(h["lora_A"]["data_offsets"])
    elif edit == "leading_space":
        text = " " + json.dumps(h)
    elif edit == "escaped_name":
        text = json.dumps(h).replace('"bias"', '"\\u0062ias"')
    elif edit == "minus_zero":  # Python reads -0 as the int 0; serde reads a float
        text = json.dumps(h, separators=(",", ":")).replace('"data_offsets":[0,', '"data_offsets":[-0,', 1)
        assert "[-0," in text
    elif edit in ("utf16", "utf32"):  # json.loads(bytes) would guess these from the NUL bytes
        raw = json.dumps(h).encode("utf-16-le" if edit == "utf16" else "utf-32-le")
        assert _flat_agrees(len(raw).to_bytes(8, "little") + raw + body) is None
        return
    _flat_agrees(_handmade(text if text is not None else json.dumps(h), body))


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_fuzz_flat_decoder_agrees(seed):
    rng = random.Random(seed)
    base = rng.choice([VALID, _VALID_F16, _VALID_INT8])
    _flat_agrees(_mutate(rng, base))
    meta = dict(header(base)["__metadata__"])
    key = rng.choice(list(meta) + ["extra"])
    meta[key] = rng.choice(_INTERESTING)
    _flat_agrees(stn.save(stn.load(base), metadata=meta))


# -------------------------------------------------------------------------------- fuzz

_DECODERS = (
    lambda b: decode(b),
    lambda b: decode_message(b, expected=None, bundle_id=None, max_bytes=MAX),
    lambda b: Reassembler(30, MAX).add(b, 0.0),
    decode_ack, decode_acks, decode_presence, decode_error, decode_telemetry,
    lambda b: _FLAT.decode(b),
)


def _only_wire_errors(data: bytes) -> None:
    for fn in _DECODERS:
        try:
            fn(data)
        except WireError:
            pass  # the one allowed failure
    assert isinstance(is_chunk(data), bool)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _only_wire_errors(data)
    # the same bytes behind a header length that fits, so the parser gets past the first check
    _only_wire_errors(len(data).to_bytes(8, "little") + data)
    _only_wire_errors(max(len(data) - 4, 0).to_bytes(8, "little") + data)


_VALID_F16 = encode_message(msg(GOOD, codec="f16"))
_VALID_INT8 = encode_message(msg(GOOD, codec="int8"))
_CHUNK_PAYLOAD = _payload(6000)
_CHUNKS = split_payload(_CHUNK_PAYLOAD, update_id=UID, limit=2048)
_VALID_JSON = (
    (decode_ack, encode_ack(Ack(UID, "rejected", "not_finite", 3))),
    (decode_acks, encode_acks([Ack(UID, "rejected", "not_finite", 3), Ack("f" * 32, "applied", "", 4)])),
    (decode_presence, encode_presence(Presence("dev-1", "online", "device", 2, 1.5))),
    (decode_error, encode_error(ErrorReport(UID, "dev-1", "wrong_bundle", "made for another"))),
    (decode_telemetry, encode_telemetry({"loss": 0.5, "state": "idle", "n": 3, "ok": True})),
)
_INTERESTING = ["", "-1", "0", "1e309", "nan", "-0.0", "99999999999999999999", "model", "update",
                "chunk", "int8", "f16", "f32", "true", "false", UID, BUNDLE, "dev-1", "job1", "\x00",
                "a/b", "1" * 70]


def _mutate(rng: random.Random, base: bytes) -> bytes:
    """1-4 byte-level edits; half of them land in the header, where the parser has decisions to make."""
    b = bytearray(base)
    hot = 8 + int.from_bytes(base[:8], "little") if len(base) >= 8 else len(base)
    for _ in range(rng.randint(1, 4)):
        if not b:
            break
        i = rng.randrange(min(len(b), hot) if rng.random() < 0.5 else len(b))
        op = rng.randrange(6)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, ord('"'), ord("{"), ord("}"), ord(","), ord("9")])
        elif op == 2:
            del b[i:]
        elif op == 3:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 4:
            del b[i:i + rng.randint(1, 16)]
        else:  # splice in a copy of another stretch of the same payload
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 32)]
    return bytes(b)


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**70, 10**400])
    if kind == 3:
        return rng.choice([0.5, -1e308, float("nan"), float("inf"), 1e-320])
    if kind in (4, 5):
        return rng.choice(_INTERESTING + ["applied", "online", "offline", "node"])
    if kind == 6:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["update_id", "status", "reason", "node_version", "id", "state", "role", "version", "ts",
            "sender", "detail", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def _check_decoded(out: ModelMessage) -> None:
    """Whatever gets through satisfies everything the decoder promises."""
    assert out.codec in ("f32", "f16", "int8") and out.kind in ("update", "model")
    assert min(out.version, out.base_version, out.num_samples, out.local_steps) >= 0
    assert math.isfinite(out.train_loss) and math.isfinite(out.energy_j)
    assert set(out.tensors) == set(GOOD)
    for name, v in GOOD.items():
        t = out.tensors[name]
        assert t.dtype == np.float32 and t.shape == v.shape and np.isfinite(t).all()


@FUZZ
@given(st.integers(0, 2**64 - 1))
def test_fuzz_mutations(seed):
    # hypothesis draws only a seed: the mutations themselves are cheap to make with random, which
    # keeps thousands of cases within a few seconds; a failure prints the seed to replay
    rng = random.Random(seed)

    # byte-level edits of a valid message
    data = _mutate(rng, rng.choice([VALID, _VALID_F16, _VALID_INT8]))
    try:
        _check_decoded(decode(data))
    except WireError:
        pass
    assert isinstance(is_chunk(data), bool)

    # well-formed safetensors whose metadata was edited
    base = rng.choice([VALID, _VALID_F16, _VALID_INT8])
    meta = dict(header(base)["__metadata__"])
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(meta) + ["extra"])
        if rng.random() < 0.2:
            meta.pop(key, None)
        else:
            meta[key] = rng.choice(_INTERESTING)
    try:
        _check_decoded(decode(stn.save(stn.load(base), metadata=meta)))
    except WireError:
        pass

    # a chunk set with one edited chunk, in random order: the whole payload or nothing
    chunks = list(_CHUNKS)
    k = rng.randrange(len(chunks))
    chunks[k] = _mutate(rng, chunks[k])
    rng.shuffle(chunks)
    r = Reassembler(30, MAX)
    for c in chunks:
        try:
            out = r.add(c, 0.0)
        except WireError:
            continue
        assert out is None or out == _CHUNK_PAYLOAD  # the sha256 guards the result

    # JSON payloads: edited valid ones, and random JSON values
    fn, data = rng.choice(_VALID_JSON)
    for candidate in (_mutate(rng, data), json.dumps(_random_json(rng)).encode()):
        try:
            fn(candidate)
        except WireError:
            pass


# ------------------------------------------------------------------------ run configuration

RUN_OK = {"job": "job1", "bundle_id": BUNDLE, "up_codec": "f16", "device_scheduler": "marginal:tau_min=2,tau_max=50",
          "edge_scheduler": "fixed:10", "k_updates": 3, "max_wait_s": 30.0, "max_staleness": 10,
          "staleness_exponent": 0.5, "target_accuracy": 0.9, "deadline_s": 3600.0, "created_at": 1_700_000_000.25}


def _run_error(data: bytes) -> WireError:
    with pytest.raises(WireError) as info:
        decode_run_config(data)
    return info.value


def test_run_topic():
    assert Topics("job1").run() == "tomtit/job1/run"


def test_run_config_round_trip():
    cfg = RunConfig(**RUN_OK)
    data = encode_run_config(cfg)
    assert data == json.dumps(RUN_OK, sort_keys=True, separators=(",", ":")).encode()
    assert decode_run_config(data) == cfg
    # optional limits travel as null; whole numbers are accepted for the float fields
    loose = {**RUN_OK, "target_accuracy": None, "deadline_s": None, "max_wait_s": 30, "created_at": 0,
             "staleness_exponent": 0, "max_staleness": 0, "k_updates": 1}
    back = decode_run_config(_j(loose))
    assert (back.target_accuracy, back.deadline_s) == (None, None)
    assert type(back.max_wait_s) is float and back.max_wait_s == 30.0
    assert decode_run_config(encode_run_config(back)) == back
    assert decode_run_config(_j({**RUN_OK, "target_accuracy": 1})).target_accuracy == 1.0
    assert decode_run_config(bytearray(data)) == cfg


def test_run_config_normalises_numpy_scalars():
    cfg = RunConfig(**{**RUN_OK, "k_updates": np.int64(4), "max_wait_s": np.float32(2.5),
                       "target_accuracy": np.float64(0.75)})
    assert type(cfg.k_updates) is int and type(cfg.max_wait_s) is float and type(cfg.target_accuracy) is float
    assert json.loads(encode_run_config(cfg))["k_updates"] == 4


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b" " * 5000, "too_large"),
    (b"\xff\xfe{}", "not_json"),
    (b"{", "not_json"),
    (b"[1]", "not_json"),
    (b"null", "not_json"),
    (b'{"job":"a","job":"b"}', "not_json"),
    (_j(RUN_OK).replace(b"0.5", b"NaN"), "not_json"),
    (b"[" * 2000 + b"]" * 2000, "not_json"),
])
def test_run_config_not_json(data, reason):
    assert _run_error(data).reason == reason


def test_run_config_unknown_key_named():
    e = _run_error(_j({**RUN_OK, "server_lr": 1.0}))
    assert e.reason == "bad_schema" and "server_lr" in str(e)


@pytest.mark.parametrize("name", list(RUN_OK))
def test_run_config_missing_key_named(name):
    e = _run_error(_j({k: v for k, v in RUN_OK.items() if k != name}))
    assert e.reason == "bad_schema" and name in str(e)


@pytest.mark.parametrize("name, value, reason", [
    # wrong types (bool is not an int, a number in a string is not a number)
    ("job", 7, "bad_id"), ("bundle_id", None, "bad_id"), ("up_codec", 16, "bad_codec"),
    ("device_scheduler", 10, "bad_schema"), ("edge_scheduler", None, "bad_schema"),
    ("k_updates", True, "bad_schema"), ("k_updates", 3.0, "bad_schema"), ("k_updates", "3", "bad_schema"),
    ("max_wait_s", "30", "bad_schema"), ("max_wait_s", False, "bad_schema"), ("max_wait_s", None, "bad_schema"),
    ("max_staleness", True, "bad_schema"), ("max_staleness", [10], "bad_schema"),
    ("staleness_exponent", None, "bad_schema"), ("staleness_exponent", {"a": 1}, "bad_schema"),
    ("target_accuracy", "0.9", "bad_schema"), ("target_accuracy", True, "bad_schema"),
    ("deadline_s", [], "bad_schema"), ("deadline_s", True, "bad_schema"), ("created_at", None, "bad_schema"),
    # out of range
    ("k_updates", 0, "bad_schema"), ("k_updates", -1, "bad_schema"),
    ("max_wait_s", 0, "bad_schema"), ("max_wait_s", -1.5, "bad_schema"), ("max_wait_s", 10**400, "bad_schema"),
    ("max_staleness", -1, "bad_schema"), ("staleness_exponent", -0.5, "bad_schema"),
    ("target_accuracy", 0, "bad_schema"), ("target_accuracy", 1.5, "bad_schema"),
    ("target_accuracy", -0.1, "bad_schema"), ("deadline_s", 0, "bad_schema"), ("deadline_s", -5, "bad_schema"),
    ("created_at", -1, "bad_schema"),
    # codecs, ids and scheduler specs
    ("up_codec", "f64", "bad_codec"), ("up_codec", "F16", "bad_codec"), ("up_codec", "", "bad_codec"),
    ("job", "a/b", "bad_id"), ("job", "", "bad_id"), ("job", "x" * 65, "bad_id"), ("job", "+", "bad_id"),
    ("bundle_id", "a b", "bad_id"), ("bundle_id", "é", "bad_id"),
    ("device_scheduler", "", "bad_schema"), ("device_scheduler", "fixed: 10", "bad_schema"),
    ("device_scheduler", "a/b", "bad_schema"), ("edge_scheduler", "#", "bad_schema"),
    ("edge_scheduler", "fixed:" + "9" * 200, "bad_schema"), ("edge_scheduler", ":10", "bad_schema"),
])
def test_run_config_bad_field_named(name, value, reason):
    e = _run_error(_j({**RUN_OK, name: value}))
    assert e.reason == reason and name in str(e), str(e)
    with pytest.raises(WireError):  # the sender cannot make one either
        RunConfig(**{**RUN_OK, name: value})


def test_run_config_huge_float_rejected():
    # JSON has no infinity, but Python's parser reads 1e400 as one
    e = _run_error(_j(RUN_OK).replace(b"3600.0", b"1e400"))
    assert e.reason == "bad_schema" and "deadline_s" in str(e)


def _json_values():
    # NaN and infinities are in: json.dumps writes them as NaN/Infinity, which is not JSON
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80)
    return st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                      max_size=4), max_leaves=8)


def _decode_run_or_wire_error(data: bytes) -> RunConfig | None:
    """The decoded config, or None on WireError; any other exception fails the test."""
    try:
        cfg = decode_run_config(data)
    except WireError:
        return None
    # whatever decodes holds up to the promises of the type
    assert type(cfg.k_updates) is int and cfg.k_updates >= 1
    assert type(cfg.max_staleness) is int and cfg.max_staleness >= 0
    assert type(cfg.max_wait_s) is float and 0 < cfg.max_wait_s < math.inf
    assert type(cfg.staleness_exponent) is float and 0 <= cfg.staleness_exponent < math.inf
    assert cfg.target_accuracy is None or (type(cfg.target_accuracy) is float and 0 < cfg.target_accuracy <= 1)
    assert cfg.deadline_s is None or (type(cfg.deadline_s) is float and 0 < cfg.deadline_s < math.inf)
    assert type(cfg.created_at) is float and 0 <= cfg.created_at < math.inf
    assert cfg.up_codec in ("f32", "f16", "int8")
    assert decode_run_config(encode_run_config(cfg)) == cfg
    return cfg


_VALID_RUN = encode_run_config(RunConfig(**RUN_OK))


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 2**64 - 1))
def test_fuzz_run_config_bytes(data, seed):
    # arbitrary bytes, and byte-level edits of a valid config: WireError or a valid RunConfig
    _decode_run_or_wire_error(data)
    _decode_run_or_wire_error(_mutate(random.Random(seed), _VALID_RUN))


@FUZZ
@given(st.sampled_from(list(RUN_OK) + ["extra"]), _json_values())
def test_fuzz_run_config_field_values(name, value):
    # one field (or an unknown key) set to any JSON value
    cfg = _decode_run_or_wire_error(_j({**RUN_OK, name: value}))
    assert cfg is None or name != "extra"  # an unknown key is refused, whatever its value


def test_atheris_coverage_guided_fuzz_of_every_decoder(tmp_path):
    """Bounded coverage-guided fuzzing (tests/fuzz_wire_atheris.py): 100,000 inputs grown from
    valid messages of every kind; libFuzzer exits non-zero on any exception but WireError."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI"):
            pytest.fail("atheris is not installed: .ci/run installs it with the test extra (x86_64 Linux)")
        pytest.skip("atheris is not installed (pip install atheris; x86_64 Linux wheels)")
    harness = Path(__file__).with_name("fuzz_wire_atheris.py")
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(harness), "--write-seeds", str(corpus)], check=True, capture_output=True)
    assert len(list(corpus.iterdir())) >= 9
    out = subprocess.run([sys.executable, str(harness), str(corpus), "-runs=100000", "-max_len=4096",
                          "-timeout=10", "-seed=1"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    tail = out.stderr[-3000:]
    assert out.returncode == 0, f"atheris found an input that breaks a decoder:\n{tail}"
    assert "Done 100000 runs" in out.stderr, tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
