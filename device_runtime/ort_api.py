"""The one place that imports ONNX Runtime's on-device training API.

`import onnxruntime.training` runs that package's `__init__`, which imports `.optim`, which
imports torch. A board has no torch, so we register an empty stand-in for the
`onnxruntime.training` package (same `__path__`, no `__init__` side effects) and import only
its `api` subpackage, which needs nothing but the compiled ORT extension.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from tomtit.errors import TomtitError


class OrtTrainingUnavailable(TomtitError):
    """onnxruntime-training is not installed (or is shadowed by plain onnxruntime)."""


def _load_api():
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise OrtTrainingUnavailable(
            "onnxruntime is not installed: `pip install 'tomtit[device]'` "
            "(onnxruntime-training-cpu==1.19.2)"
        )
    if "onnxruntime.training" not in sys.modules:
        pkg_dir = next(iter(spec.submodule_search_locations))
        training_spec = importlib.util.find_spec("onnxruntime.training")
        if training_spec is None:
            raise OrtTrainingUnavailable(
                "this onnxruntime has no training API (plain `onnxruntime` is installed, or it "
                "overwrote onnxruntime-training-cpu in the same environment)"
            )
        import onnxruntime  # noqa: F401  (the real package; its __init__ is torch-free)

        stub = types.ModuleType("onnxruntime.training")
        stub.__path__ = [f"{pkg_dir}/training"]
        stub.__file__ = None
        stub.__package__ = "onnxruntime.training"
        sys.modules["onnxruntime.training"] = stub
    try:
        api = importlib.import_module("onnxruntime.training.api")
    except ImportError as e:
        raise OrtTrainingUnavailable(f"onnxruntime training API failed to import: {e}") from None
    return api


_api = _load_api()
CheckpointState = _api.CheckpointState
Module = _api.Module
Optimizer = _api.Optimizer

from onnxruntime import OrtValue, SessionOptions  # noqa: E402

__all__ = ["CheckpointState", "Module", "Optimizer", "OrtValue", "SessionOptions", "OrtTrainingUnavailable"]
