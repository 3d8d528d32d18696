"""Hugging Face PEFT interop: a bundle's adapter out as a PEFT LoRA folder, and a PEFT folder in.

Out: the ONNX initializer names of trainables are exactly PEFT's parameter names (the export
strips only its own wrapper prefix), so writing a PEFT adapter is: rebuild the PEFT model from
the manifest, load the buffer by name, `save_pretrained`. The head (PEFT `modules_to_save`)
travels inside `adapter_model.safetensors`, as PEFT expects. A sidecar `tomtit.json` records the
bundle id, base-weights hash and labels so an import can refuse an adapter made for another model.
Causal LMs (task "causal-lm") go the same way on the plain float32 `LlamaForCausalLM` that
export/causal_lm.load_causal_lm builds (for SmolLM2: dequantised from its GGUF, so the adapter
belongs on those weights, not on the hub's bf16 original; the sidecar names the GGUF).

In: `import_peft` maps a PEFT folder's tensors onto a bundle's adapter buffer by name (PEFT's
saved names are ours without the adapter name), with numpy only: for a causal LM, rebuilding
the model just to read 1.8 MB would cost seconds and ~1 GB. (A classifier bundle can also be
seeded at export time with `tomtit export --init-adapter`.)
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


def _json_object(path: Path) -> dict:
    """A JSON file that must hold an object (adapter_config.json, tomtit.json): anything else is a
    PeftInteropError naming the file, not a traceback."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftInteropError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(obj, dict):
        raise PeftInteropError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def _number(cfg: dict, key: str, cfg_file: Path) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PeftInteropError(f"{cfg_file}: {key} is {v!r}, not a number")
    return float(v)


def _pattern_problems(cfg: dict, key: str, want: float, cfg_file: Path) -> list[str]:
    """alpha_pattern / rank_pattern give some modules another alpha or rank: the bundle's graphs
    have one scaling (alpha / r) for all, so any entry that differs is refused."""
    pattern = cfg.get(key) or {}
    if not isinstance(pattern, dict):
        raise PeftInteropError(f"{cfg_file}: {key} is {pattern!r}, not an object")
    odd = {k: v for k, v in pattern.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != want}
    if not odd:
        return []
    shown = ", ".join(f"{k}: {v!r}" for k, v in list(odd.items())[:3])
    return [f"{key} {{{shown}{', ...' if len(odd) > 3 else ''}}} (the bundle uses {want:g} for every module)"]


def check_peft_adapter_dir(path: Path, source: ModelSource, *, labels: tuple[str, ...]) -> None:
    """Refuse, with a reason, a PEFT folder that cannot seed a bundle of this base model."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise PeftInteropError(f"{path} is not a PEFT adapter folder (needs adapter_config.json + adapter_model.safetensors)")
    cfg = _json_object(cfg_file)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise PeftInteropError(f"{path} holds a {cfg.get('peft_type')!r} adapter; only LoRA is supported")
    sidecar = path / SIDECAR
    if sidecar.is_file():
        info = _json_object(sidecar)
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


def causal_source_for(manifest: Manifest, base: str | None):
    """The causal base model the bundle was exported from (export records `model_spec`: the
    built-in name, or the weights file -- of an HF folder, whose folder is the model)."""
    from export.causal_lm import resolve_causal_model

    spec = base or manifest.extra.get("model_spec") or manifest.base_model
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix != ".gguf":
        spec = str(path.parent)
    source = resolve_causal_model(spec)
    if source.weights_sha256 != manifest.base_weights_sha256:
        raise ModelSourceError(
            f"base model at {source.weights_file} is not the one this bundle was made from "
            f"(weights sha256 {source.weights_sha256[:12]} != {manifest.base_weights_sha256[:12]})"
        )
    return source


def build_causal_peft_model(manifest: Manifest, source):
    """The causal PEFT model the bundle was exported from (base as export/causal_lm loads it),
    with fresh adapter values; train mode off."""
    from peft import LoraConfig, get_peft_model

    from export.causal_lm import load_causal_lm

    base, _ = load_causal_lm(source)
    a = manifest.adapter
    cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.eval()
    return model


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
    sidecar = {"bundle_id": manifest.bundle_id, "base_model": manifest.base_model,
               "base_weights_sha256": manifest.base_weights_sha256, "labels": list(manifest.labels),
               "architecture": manifest.architecture, "task": manifest.task}
    if manifest.task == "causal-lm":
        from export.causal_lm import BUILTIN_CAUSAL_MODELS

        source = causal_source_for(manifest, base)
        model = build_causal_peft_model(manifest, source)
        # a built-in model is named as on the hub (what a reader recognises); the sidecar says the
        # weights are the GGUF's, dequantised, which is what the adapter was trained on
        builtin = manifest.extra.get("model_spec") in BUILTIN_CAUSAL_MODELS
        base_name = manifest.base_model if builtin else str(source.folder)
        sidecar["base_weights_file"] = source.weights_file.name
        if source.gguf_file:
            sidecar["base_note"] = (f"base = {source.gguf_file} dequantised to float32 (export/causal_lm.py "
                                    "load_causal_lm), not the hub's original weights")
    else:
        source = _model_dir_for(manifest, base)
        model = build_peft_model(manifest, source)
        base_name = manifest.base_model if manifest.extra.get("model_spec") == "minilm-l6" else str(source.path)
    load_buffer_into(model, manifest, buffer)
    model.peft_config["default"].base_model_name_or_path = base_name
    tmp = staging_dir(out)
    try:
        model.save_pretrained(str(tmp))
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def peft_key(name: str) -> str:
    """Our trainable name (the PEFT model's parameter name, adapter "default") -> the key PEFT's
    save_pretrained writes: the adapter name dropped (`lora_A.default.weight` -> `lora_A.weight`,
    `classifier.modules_to_save.default.weight` -> `classifier.weight`)."""
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def import_peft(bundle_dir: Path, peft_dir: Path, out: Path, *, force: bool = False) -> Path:
    """A PEFT LoRA folder -> a tomtit adapter file for this bundle (`tomtit train --adapter`,
    `tomtit generate --adapter`, a node's initial model). Refused with a reason when the folder's
    LoRA configuration (rank, alpha, targets, variants) or its recorded base model differ from
    the bundle's, or when a tensor is missing or the wrong shape. numpy only."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from device_runtime.adapter import flatten, save_adapter

    manifest = load_manifest(bundle_dir)
    peft_dir = Path(peft_dir)
    out = Path(out)
    if out.exists() and not force:
        raise PeftInteropError(f"--out {out} exists (pass --force to replace it)")
    cfg_file, weights = peft_dir / "adapter_config.json", peft_dir / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise PeftInteropError(f"{peft_dir} is not a PEFT adapter folder (needs adapter_config.json + "
                               "adapter_model.safetensors)")
    cfg = _json_object(cfg_file)
    a = manifest.adapter
    targets = cfg.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise PeftInteropError(f"{cfg_file}: target_modules is {cfg.get('target_modules')!r}, not a list of names")
    targets = sorted(targets)
    mts = cfg.get("modules_to_save") or []
    if not isinstance(mts, list) or not all(isinstance(t, str) for t in mts):
        raise PeftInteropError(f"{cfg_file}: modules_to_save is {mts!r}, not a list of names")
    problems = []
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        problems.append(f"a {cfg.get('peft_type')!r} adapter, not LoRA")
    if cfg.get("r") != a.rank:
        problems.append(f"rank {cfg.get('r')} (the bundle's: {a.rank})")
    if _number(cfg, "lora_alpha", cfg_file) != a.alpha:  # alpha/r is a constant inside the bundle's graphs
        problems.append(f"lora_alpha {cfg.get('lora_alpha')} (the bundle's: {a.alpha:g})")
    problems += _pattern_problems(cfg, "alpha_pattern", a.alpha, cfg_file)
    problems += _pattern_problems(cfg, "rank_pattern", a.rank, cfg_file)
    if targets != sorted(a.target_modules):
        problems.append(f"target_modules {targets} (the bundle's: {sorted(a.target_modules)})")
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            problems.append(f"{flag} (the bundle's graphs compute plain LoRA)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} (the bundle trains no biases)")
    # PEFT's SEQ_CLS task adds its usual head names ("classifier", "score") to modules_to_save; a name
    # without a module in the model saves nothing, so the tensors, checked below, are what counts
    if not set(manifest.head_modules) <= set(cfg.get("modules_to_save") or []):
        problems.append(f"modules_to_save {cfg.get('modules_to_save')} "
                        f"(the bundle trains {list(manifest.head_modules)})")
    if problems:
        raise PeftInteropError(f"{peft_dir} does not fit bundle {manifest.bundle_id[:12]}: " + "; ".join(problems))
    sidecar = peft_dir / SIDECAR
    if sidecar.is_file():
        info = _json_object(sidecar)
        if info.get("base_weights_sha256") not in (None, manifest.base_weights_sha256):
            raise PeftInteropError(
                f"{peft_dir} was trained on base model {info.get('base_model')} (weights "
                f"{str(info.get('base_weights_sha256'))[:12]}), not on this bundle's {manifest.base_model} "
                f"({manifest.base_weights_sha256[:12]})")
        if info.get("labels") not in (None, list(manifest.labels)):
            raise PeftInteropError(f"{peft_dir} classifies {info.get('labels')}, the bundle {list(manifest.labels)}")
    try:
        saved = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise PeftInteropError(f"{weights} is not readable safetensors: {e}") from None
    tensors, missing = {}, []
    for spec in manifest.trainable:
        key = peft_key(spec.name)
        if key not in saved:
            missing.append(key)
            continue
        t = saved[key]
        if tuple(t.shape) != spec.shape:
            raise PeftInteropError(f"{peft_dir}: {key} has shape {tuple(t.shape)}, the bundle needs {spec.shape}")
        tensors[spec.name] = t.astype(np.float32)
    if missing:
        raise PeftInteropError(f"{peft_dir} lacks {len(missing)} of the bundle's {len(manifest.trainable)} tensors, "
                               f"e.g. {missing[0]}")
    buffer = flatten(tensors, manifest.trainable)
    if not np.all(np.isfinite(buffer)):
        raise PeftInteropError(f"{peft_dir} holds NaN or infinite values")
    unused = sorted(set(saved) - {peft_key(s.name) for s in manifest.trainable})
    if unused:  # e.g. saved embeddings of a resized vocabulary: the bundle's graphs cannot take them
        raise PeftInteropError(f"{peft_dir} holds {len(unused)} tensor(s) the bundle has no place for, "
                               f"e.g. {unused[0]}")
    save_adapter(out, buffer, manifest, source="peft", peft_dir=str(peft_dir.resolve()))
    return out
