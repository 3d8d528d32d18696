"""Hugging Face PEFT interop: a bundle's adapter out as a PEFT LoRA folder, and a PEFT folder in.

Out: the ONNX initializer names of trainables are exactly PEFT's parameter names (the export
strips only its own wrapper prefix), so writing a PEFT adapter is: rebuild the PEFT model from
the manifest, load the buffer by name, `save_pretrained`. The head (PEFT `modules_to_save`)
travels inside `adapter_model.safetensors`, as PEFT expects. A sidecar `tomtit.json` records the
bundle id, base-weights hash and labels so an import can refuse an adapter made for another model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from export.model_source import ModelSource, ModelSourceError, resolve_model
from tomtit.errors import TomtitError
from tomtit.fsutil import publish_dir, staging_dir
from tomtit.manifest import Manifest, load_manifest

SIDECAR = "tomtit.json"


class PeftInteropError(TomtitError, ValueError):
    """A PEFT adapter folder cannot be written or does not fit the base model."""


def check_peft_adapter_dir(path: Path, source: ModelSource, *, labels: tuple[str, ...]) -> None:
    """Refuse, with a reason, a PEFT folder that cannot seed a bundle of this base model."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise PeftInteropError(f"{path} is not a PEFT adapter folder (needs adapter_config.json + adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PeftInteropError(f"{cfg_file} is not readable JSON: {e}") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise PeftInteropError(f"{path} holds a {cfg.get('peft_type')!r} adapter; only LoRA is supported")
    sidecar = path / SIDECAR
    if sidecar.is_file():
        info = json.loads(sidecar.read_text())
        if info.get("base_weights_sha256") not in (None, source.weights_sha256):
            raise PeftInteropError(
                f"{path} was trained on base model {info.get('base_model')} (weights "
                f"{str(info.get('base_weights_sha256'))[:12]}), not on {source.model_id} "
                f"({source.weights_sha256[:12]})"
            )
        if info.get("labels") not in (None, list(labels)):
            raise PeftInteropError(f"{path} classifies {info.get('labels')}, but the data's labels are {list(labels)}")
    num_labels = len(labels)
    with safe_open(str(weights), "np") as f:
        head = [k for k in f.keys() if k.endswith("classifier.weight") or k.endswith("classifier.modules_to_save.weight")]
        if head:
            rows = f.get_slice(head[0]).get_shape()[0]
            if rows != num_labels:
                raise PeftInteropError(f"{path} has a {rows}-class head but the data has {num_labels} labels")


def _model_dir_for(manifest: Manifest, base: str | None) -> ModelSource:
    spec = base or manifest.extra.get("model_spec") or manifest.base_model
    source = resolve_model(spec)
    if source.weights_sha256 != manifest.base_weights_sha256:
        raise ModelSourceError(
            f"base model at {source.path} is not the one this bundle was made from "
            f"(weights sha256 {source.weights_sha256[:12]} != {manifest.base_weights_sha256[:12]})"
        )
    return source


def build_peft_model(manifest: Manifest, source: ModelSource):
    """The PEFT model the bundle was exported from, with fresh (unloaded) adapter values."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    labels = list(manifest.labels)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(source.path), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={y: i for i, y in enumerate(labels)}, attn_implementation="eager",
    )
    a = manifest.adapter
    cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
                     modules_to_save=list(manifest.head_modules), task_type="SEQ_CLS")
    model = get_peft_model(base, cfg)
    model.eval()
    return model


def load_buffer_into(model, manifest: Manifest, buffer: np.ndarray) -> None:
    import torch

    from device_runtime.adapter import unflatten

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in unflatten(buffer, manifest.trainable).items():
            if name not in params:
                raise PeftInteropError(f"PEFT model has no parameter {name}")
            params[name].copy_(torch.from_numpy(np.array(value)))


def export_peft(bundle_dir: Path, out: Path, *, adapter: Path | None = None, base: str | None = None,
                force: bool = False) -> Path:
    from device_runtime.adapter import load_adapter
    from device_runtime.bundle import open_bundle
    from export.bundle_builder import _quiet_libraries

    _quiet_libraries()
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise PeftInteropError(f"--out {out} exists and is not empty (pass --force to replace it)")
    manifest = load_manifest(bundle_dir)
    bundle = open_bundle(bundle_dir, roles=("initial_adapter",))
    buffer = load_adapter(adapter or bundle.path("initial_adapter"), manifest)
    source = _model_dir_for(manifest, base)
    model = build_peft_model(manifest, source)
    load_buffer_into(model, manifest, buffer)
    model.peft_config["default"].base_model_name_or_path = (
        manifest.base_model if manifest.extra.get("model_spec") == "minilm-l6" else str(source.path)
    )
    tmp = staging_dir(out)
    try:
        model.save_pretrained(str(tmp))
        (tmp / SIDECAR).write_text(json.dumps({
            "bundle_id": manifest.bundle_id,
            "base_model": manifest.base_model,
            "base_weights_sha256": manifest.base_weights_sha256,
            "labels": list(manifest.labels),
            "architecture": manifest.architecture,
        }, indent=2))
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
