"""Local adapter training on the device.

One interface, `Trainer`, so the agent does not care which ONNX Runtime backend runs the step.
`OrtTrainingBackend` drives the ORT on-device training artifacts (onnxruntime-training).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from device_runtime.bundle import Bundle
from tomtit.manifest import BundleError


@dataclass(frozen=True)
class TrainerConfig:
    threads: int = 1  # ORT intra-op threads: 1 leaves a core for MQTT and the OS on a Pi
    learning_rate: float = 1e-3  # AdamW lr for LoRA + head; LoRA tolerates ~10x full fine-tuning lr


class Trainer(ABC):
    """A model whose adapter trains by steps and can be read and replaced as one flat buffer."""

    backend: str

    @abstractmethod
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> float:
        """One forward/backward/AdamW update on a batch; returns the batch's mean loss."""

    @abstractmethod
    def get_adapter(self) -> np.ndarray:
        """A copy of the trainable parameters, in the manifest's buffer order."""

    @abstractmethod
    def set_adapter(self, buffer: np.ndarray) -> None:
        """Replace the trainable parameters (e.g. with a new model from the parent)."""

    @abstractmethod
    def set_learning_rate(self, lr: float) -> None: ...


def _session_options(threads: int):
    from device_runtime.ort_api import load_onnxruntime

    ort = load_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # ORT warns about unused dropout constants; not the user's problem
    return so


class OrtTrainingBackend(Trainer):
    backend = "ort-training"

    def __init__(self, bundle: Bundle, config: TrainerConfig = TrainerConfig()):
        from device_runtime.ort_api import load_training_api

        api, self._OrtValue = load_training_api()
        CheckpointState, Module, Optimizer = api.CheckpointState, api.Module, api.Optimizer
        self._manifest = bundle.manifest
        try:
            self._state = CheckpointState.load_checkpoint(str(bundle.path("checkpoint")))
        except RuntimeError as e:
            raise BundleError(f"{bundle.path('checkpoint')} is not a valid ORT checkpoint: {e}") from None
        try:
            self._module = Module(
                str(bundle.path("training_model")),
                self._state,
                str(bundle.path("eval_model")),
                device="cpu",
                session_options=_session_options(config.threads),
            )
            self._optimizer = Optimizer(str(bundle.path("optimizer_model")), self._module)
        except RuntimeError as e:
            raise BundleError(f"bundle {bundle.root} does not load in ORT: {e}") from None
        size = self._module.get_parameters_size(trainable_only=True)
        if size != self._manifest.buffer_size:
            raise BundleError(
                f"the checkpoint has {size} trainable values but the manifest lists "
                f"{self._manifest.buffer_size}: the bundle's files do not belong together"
            )
        self._optimizer.set_learning_rate(config.learning_rate)
        self._module.train()

    def step(self, input_ids, attention_mask, labels) -> float:
        loss = self._module(input_ids, attention_mask, labels)
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return float(np.asarray(loss).reshape(-1)[0])

    def get_adapter(self) -> np.ndarray:
        return np.array(self._module.get_contiguous_parameters(trainable_only=True).numpy(), np.float32)

    def set_adapter(self, buffer: np.ndarray) -> None:
        buffer = np.ascontiguousarray(buffer, dtype=np.float32)
        if buffer.shape != (self._manifest.buffer_size,):
            raise ValueError(f"adapter buffer shape {buffer.shape} != ({self._manifest.buffer_size},)")
        # The pybind method wants the low-level C OrtValue, not the Python wrapper.
        self._module.copy_buffer_to_parameters(self._OrtValue.ortvalue_from_numpy(buffer)._ortvalue, trainable_only=True)

    def set_learning_rate(self, lr: float) -> None:
        self._optimizer.set_learning_rate(lr)


def make_trainer(bundle: Bundle, config: TrainerConfig = TrainerConfig(), backend: str = "auto") -> Trainer:
    if backend in ("auto", "ort-training"):
        return OrtTrainingBackend(bundle, config)
    raise BundleError(f"unknown trainer backend {backend!r} (choices: auto, ort-training)")
