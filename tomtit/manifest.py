"""The bundle manifest: the one description of a bundle that every tier reads.

Export writes it; the device, the edge and the wire codec read it. It is plain JSON so a board
needs nothing beyond the standard library to understand what a bundle contains.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tomtit.errors import TomtitError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class BundleError(TomtitError, ValueError):
    """A bundle folder is missing, incomplete, corrupt or made for something else."""


@dataclass(frozen=True)
class TensorSpec:
    """One trainable tensor, in the order it sits in the flat adapter buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class AdapterConfig:
    kind: str  # only "lora" today; the field exists so a bundle says what it holds
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    format_version: int
    bundle_id: str  # sha256 over the identity of the bundle: base weights, adapter config, trainables, labels
    base_model: str  # e.g. "sentence-transformers/all-MiniLM-L6-v2" or a local path's name
    base_weights_sha256: str
    architecture: str  # transformers class the PEFT export rebuilds, e.g. BertForSequenceClassification
    adapter: AdapterConfig
    trainable: tuple[TensorSpec, ...]  # buffer order of the ORT flat parameter buffer
    head_modules: tuple[str, ...]  # modules trained in full (PEFT modules_to_save)
    labels: tuple[str, ...]
    max_length: int
    inputs: tuple[str, ...]  # inference/training model input names (input_ids, attention_mask)
    label_input: str  # name of the labels input of the training model
    logits_output: str
    files: dict = field(default_factory=dict)  # role -> file name inside the bundle
    extra: dict = field(default_factory=dict)  # export-time facts kept for humans (opset, seed...)

    @property
    def task(self) -> str:
        """"classify" (every bundle before causal LMs) or "causal-lm"."""
        return str(self.extra.get("task", "classify"))

    @property
    def buffer_size(self) -> int:
        return sum(t.numel for t in self.trainable)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        try:
            if d.get("format_version") != FORMAT_VERSION:
                raise BundleError(
                    f"manifest format_version {d.get('format_version')!r} is not {FORMAT_VERSION}"
                )
            adapter = AdapterConfig(
                kind=str(d["adapter"]["kind"]),
                rank=int(d["adapter"]["rank"]),
                alpha=float(d["adapter"]["alpha"]),
                dropout=float(d["adapter"]["dropout"]),
                target_modules=tuple(d["adapter"]["target_modules"]),
            )
            trainable = tuple(
                TensorSpec(name=str(t["name"]), shape=tuple(int(s) for s in t["shape"]),
                           dtype=str(t["dtype"]))
                for t in d["trainable"]
            )
            return cls(
                format_version=int(d["format_version"]),
                bundle_id=str(d["bundle_id"]),
                base_model=str(d["base_model"]),
                base_weights_sha256=str(d["base_weights_sha256"]),
                architecture=str(d["architecture"]),
                adapter=adapter,
                trainable=trainable,
                head_modules=tuple(d["head_modules"]),
                labels=tuple(str(x) for x in d["labels"]),
                max_length=int(d["max_length"]),
                inputs=tuple(d["inputs"]),
                label_input=str(d["label_input"]),
                logits_output=str(d["logits_output"]),
                files=dict(d.get("files", {})),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"manifest is malformed: {type(e).__name__}: {e}") from None


def load_manifest(bundle_dir: str | Path) -> Manifest:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist")
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: no {MANIFEST_FILE}")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not readable JSON: {e}") from None
    return Manifest.from_dict(d)
