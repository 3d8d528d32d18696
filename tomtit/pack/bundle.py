"""The device part of a bundle: the files the board's training backend(s) read, inference and the
tokenizer; the other backend's files are left out and the manifest's file list says so, so the
packed bundle opens (and verifies its hashes) with device_runtime.bundle like any other.

The bundle id does not change: it names the model (base weights, adapter layout, labels), not the
files, so the packed board syncs with nodes that hold the full bundle.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tomtit.fsutil import sha256_file
from tomtit.manifest import MANIFEST_FILE, BundleError, Manifest
from tomtit.pack import PackError

# A board needs these whatever it trains with: inference (served and `tomtit infer`) and text.
DEVICE_ROLES = ("inference_model", "tokenizer", "initial_adapter")

# Which backends each platform's wheels can run. onnxruntime-training has no aarch64 wheel.
PLATFORM_BACKENDS = {"linux-aarch64": ("portable",), "linux-x86_64": ("portable", "ort-training")}
# The `tomtit` extra that brings a backend's onnxruntime (never both: they own the same folder).
BACKEND_EXTRA = {"portable": "device", "ort-training": "device-training"}


def choose_backends(platform: str, backend: str) -> tuple[str, ...]:
    """`auto` is the portable step everywhere (stock onnxruntime, the leanest memory); x86_64
    boards may take ORT's training build instead (`ort-training`) or with it (`both`)."""
    allowed = PLATFORM_BACKENDS[platform]
    wanted = {"auto": ("portable",), "both": ("portable", "ort-training")}.get(backend, (backend,))
    for b in wanted:
        if b not in allowed:
            raise PackError(f"--backend {backend}: {platform} boards run only {', '.join(allowed)} "
                            f"(onnxruntime-training has no wheel for it)")
    return wanted


def extra_for(backends: tuple[str, ...]) -> str:
    """One onnxruntime per venv: ORT's training build runs the portable step too."""
    return BACKEND_EXTRA["ort-training"] if "ort-training" in backends else BACKEND_EXTRA["portable"]


def pack_bundle(src: Path, dst: Path, *, backends: tuple[str, ...], platform: str) -> Manifest:
    """Copy the device part of bundle `src` (verified first) into the new folder `dst`."""
    from device_runtime.bundle import open_bundle
    from device_runtime.trainer import BACKEND_ROLES

    try:
        bundle = open_bundle(src)  # every file's size and sha256, before anything is copied
    except BundleError as e:
        raise PackError(f"--bundle: {e}") from None
    m = bundle.manifest
    files = m.files
    for b in backends:
        lacking = [r for r in BACKEND_ROLES[b] if r not in files]
        if lacking:
            raise PackError(f"bundle {src} has no {b} files ({', '.join(lacking)}): re-export it with "
                            f"`tomtit export ... --backend {'both' if b == 'portable' else b}`")
    if "tokenizer" not in files:
        raise PackError(f"bundle {src} has no tokenizer")
    keep = set(DEVICE_ROLES) | {r for b in backends for r in BACKEND_ROLES[b]}
    # Roles nobody here knows (a newer export) go along: better a file too many than a board that fails.
    known = {r for roles in BACKEND_ROLES.values() for r in roles} | set(DEVICE_ROLES)
    keep |= {r for r in files if r not in known}
    kept = {role: entry for role, entry in files.items() if role in keep}
    dst.mkdir(parents=True)
    for entry in kept.values():
        shutil.copyfile(bundle.root / entry["name"], dst / entry["name"])
        if sha256_file(dst / entry["name"]) != entry["sha256"]:
            raise PackError(f"copying {entry['name']} changed it (a disk error?)")
    raw = json.loads((bundle.root / MANIFEST_FILE).read_text())
    raw["files"] = kept
    extra = raw.setdefault("extra", {})
    extra["backends"] = [b for b in ("ort-training", "portable") if b in backends]
    extra["pack"] = {"platform": platform, "left_out": sorted(set(files) - set(kept))}
    (dst / MANIFEST_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True))
    packed = open_bundle(dst)  # the packed bundle opens and verifies like any bundle
    if packed.manifest.bundle_id != m.bundle_id:
        raise PackError("the packed bundle's id changed")
    return packed.manifest
