"""The adapter as one flat float32 buffer, and as named tensors in safetensors files.

The flat buffer is what ORT trains, what the wire carries (as named tensors) and what
aggregators average; the manifest's trainable list (names, shapes, buffer order) is the only
mapping between the two views. Files are safetensors, never pickle: loading an adapter must not
be able to run code.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tomtit.errors import TomtitError
from tomtit.fsutil import atomic_write_bytes
from tomtit.manifest import Manifest, TensorSpec


class AdapterError(TomtitError, ValueError):
    """An adapter file or buffer does not fit this bundle."""


def unflatten(buffer: np.ndarray, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    total = sum(s.numel for s in specs)
    if buffer.ndim != 1 or buffer.size != total:
        raise AdapterError(f"adapter buffer has {buffer.size} values, the bundle needs {total}")
    out: dict[str, np.ndarray] = {}
    pos = 0
    for s in specs:
        out[s.name] = buffer[pos : pos + s.numel].reshape(s.shape)
        pos += s.numel
    return out


def flatten(tensors: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> np.ndarray:
    names = {s.name for s in specs}
    if tensors.keys() != names:
        extra = sorted(set(tensors) - names)
        missing = sorted(names - set(tensors))
        raise AdapterError(
            f"adapter tensors do not match the bundle: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    out = np.empty(sum(s.numel for s in specs), np.float32)
    pos = 0
    for s in specs:  # one preallocated buffer and a slice copy per tensor: on a node's hot path
        t = np.asarray(tensors[s.name])
        if t.shape != s.shape:
            raise AdapterError(f"{s.name} has shape {tuple(t.shape)}, the bundle needs {s.shape}")
        out[pos : pos + s.numel] = t.reshape(-1)
        pos += s.numel
    return out


def save_adapter(path: str | Path, buffer: np.ndarray, manifest: Manifest, **metadata: str) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half-written adapter."""
    from safetensors.numpy import save

    path = Path(path)
    meta = {"bundle_id": manifest.bundle_id, "base_model": manifest.base_model, "format": "tomtit-adapter-1"}
    meta.update({k: str(v) for k, v in metadata.items()})
    data = save({k: np.ascontiguousarray(v) for k, v in unflatten(buffer, manifest.trainable).items()}, metadata=meta)
    atomic_write_bytes(path, data)


def load_adapter(path: str | Path, manifest: Manifest) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist")
    raw = path.read_bytes()
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, json.JSONDecodeError, OverflowError) as e:
        raise AdapterError(f"{path} is not a safetensors adapter: {e}") from None
    if meta.get("bundle_id") not in (None, manifest.bundle_id):
        raise AdapterError(
            f"{path} was trained for bundle {meta.get('bundle_id')} "
            f"({meta.get('base_model', '?')}), not this bundle {manifest.bundle_id} ({manifest.base_model})"
        )
    buffer = flatten(tensors, manifest.trainable)
    if not np.all(np.isfinite(buffer)):
        raise AdapterError(f"{path} holds NaN or infinite values")
    return buffer
