"""The one place that imports ONNX Runtime (and its on-device training API) on the device.

`import onnxruntime.training` runs that package's `__init__`, which imports `.optim`, which
imports torch. A board has no torch, so we register an empty stand-in for the
`onnxruntime.training` package (same `__path__`, no `__init__` side effects) and import only
its `api` subpackage, which needs nothing but the compiled ORT extension.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

from tomtit.errors import TomtitError


class OrtTrainingUnavailable(TomtitError):
    """onnxruntime-training is not installed (or is shadowed by plain onnxruntime)."""


def load_onnxruntime():
    """`import onnxruntime`, without the training build dragging torch in. Idempotent."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    spec = importlib.util.find_spec("onnxruntime")  # top-level: finds without importing
    if spec is None or not spec.submodule_search_locations:
        raise OrtTrainingUnavailable("onnxruntime is not installed: `pip install 'tomtit[device]'`")
    pkg_dir = next(iter(spec.submodule_search_locations))
    if "onnxruntime.training" not in sys.modules and os.path.isdir(os.path.join(pkg_dir, "training", "api")):
        # Register the stand-in *before* `import onnxruntime`: the training build's own
        # import-time validation imports onnxruntime.training.ortmodule, whose package __init__
        # imports torch whenever torch happens to be installed (seconds and ~300 MB of RSS).
        stub = types.ModuleType("onnxruntime.training")
        stub.__path__ = [os.path.join(pkg_dir, "training")]
        # A real path keeps inspect-based tools (torch.library, debuggers) happy; it is not executed.
        stub.__file__ = os.path.join(pkg_dir, "training", "__init__.py")
        stub.__package__ = "onnxruntime.training"
        sys.modules["onnxruntime.training"] = stub
        # None makes `from onnxruntime.training.ortmodule import ORTModule` raise ImportError,
        # which ORT's validation treats as "no ORTModule" (true for our purposes).
        sys.modules.setdefault("onnxruntime.training.ortmodule", None)
    return importlib.import_module("onnxruntime")


def load_training_api():
    """ORT's on-device training API (CheckpointState, Module, Optimizer), torch-free."""
    ort = load_onnxruntime()
    try:
        api = importlib.import_module("onnxruntime.training.api")
    except ImportError as e:
        raise OrtTrainingUnavailable(
            "this onnxruntime has no training API (plain `onnxruntime` is installed, or it "
            f"overwrote onnxruntime-training-cpu in the same environment): {e}"
        ) from None
    return api, ort.OrtValue
