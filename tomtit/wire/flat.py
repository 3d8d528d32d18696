"""`FlatDecoder`: `decode_message` for a node's hot path, straight into one flat float32 buffer,
with the float16 bit conversion it uses."""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tomtit.manifest import TensorSpec
from tomtit.wire.codec import ModelMessage, _check_head, _message_head, decode_message
from tomtit.wire.errors import _as_bytes, _check_size, _no_duplicate_keys, _reject_constant

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
