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
    # "lean" (boards: a Pi 4 has 1-2 GB) or "fast" (ORT's defaults). See MEMORY_PROFILES.
    memory: str = "lean"


# ORT's defaults hold the frozen weights more than once and size a step's buffers generously:
# constant folding materialises folded copies of weight-derived constants, pre-packing keeps a
# GEMM-friendly copy of every constant MatMul operand, the memory-pattern planner reserves each
# step's peak up front, and initializers sit in the arena. Measured on the portable MiniLM-L6
# step, B8 x T64, 1 thread (bench/train_step.py): peak RSS 386 -> 261 MB (PyTorch eager: 662 MB)
# for 184 -> 195 ms per step. A board is short of memory before it is short of time, so "lean"
# is the default; "fast" keeps ORT's defaults for a workstation (the simulator uses it).
MEMORY_PROFILES = ("lean", "fast")


def _lean(memory: str) -> bool:
    if memory not in MEMORY_PROFILES:
        raise ValueError(f"memory profile {memory!r}: choose {' or '.join(MEMORY_PROFILES)}")
    return memory == "lean"


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


def _session_options(threads: int, memory: str = "fast"):
    from device_runtime.ort_api import load_onnxruntime

    ort = load_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # ORT warns about unused dropout constants; not the user's problem
    if _lean(memory):
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        so.enable_mem_pattern = False
    return so


def _disabled_optimizers(memory: str) -> list[str]:
    # Constant folding of the step graph's weight-derived subgraphs (transposes of frozen
    # weights...) stores a second copy of them; unfolded, they cost ~1% of a step.
    return ["ConstantFolding"] if _lean(memory) else []


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
                session_options=_session_options(config.threads, config.memory),
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


class PortableBackend(Trainer):
    """The exported step graph (`train_step.onnx`) on plain onnxruntime — any platform with an
    onnxruntime wheel, aarch64 boards included.

    Parameters and Adam moments live in ORT memory as OrtValues between steps: IOBinding feeds
    each step's outputs back as the next step's inputs, so nothing round-trips through numpy
    except the batch going in and the loss coming out.
    """

    backend = "portable"

    def __init__(self, bundle: Bundle, config: TrainerConfig = TrainerConfig(), *,
                 share_session_of: "PortableBackend | None" = None):
        """`share_session_of`: run on another trainer's ORT session (same bundle) instead of
        opening one. The session holds the frozen weights and the graph; each trainer holds only
        its adapter and Adam moments as OrtValues, bound per step by IOBinding. The simulator
        runs every simulated device this way: a device costs its state, not a session."""
        from device_runtime.adapter import load_adapter, unflatten
        from device_runtime.ort_api import load_onnxruntime

        self._ort = load_onnxruntime()
        self._manifest = bundle.manifest
        entry = bundle.manifest.extra.get("portable")
        if not entry:
            raise BundleError(f"bundle {bundle.root} has no portable training step; re-export with --backend both")
        self._inputs, self._outputs = list(entry["inputs"]), list(entry["outputs"])
        n = len(bundle.manifest.trainable)
        if len(self._inputs) != 3 * n + 5 or len(self._outputs) != 3 * n + 2:
            raise BundleError("the portable step's inputs/outputs do not match the manifest's trainables")
        if share_session_of is not None:
            if share_session_of._manifest.bundle_id != bundle.manifest.bundle_id:
                raise BundleError("a shared session must come from a trainer of the same bundle")
            self._session = share_session_of._session
        else:
            try:
                self._session = self._ort.InferenceSession(str(bundle.path("train_step")),
                                                           _session_options(config.threads, config.memory),
                                                           providers=["CPUExecutionProvider"],
                                                           disabled_optimizers=_disabled_optimizers(config.memory))
            except Exception as e:  # onnxruntime raises assorted pybind exceptions for a bad model
                raise BundleError(f"{bundle.path('train_step')} does not load: {e}") from None
        self._n = n
        initial = load_adapter(bundle.path("initial_adapter"), bundle.manifest)
        self._params = [self._value(a) for a in unflatten(initial, bundle.manifest.trainable).values()]
        self._m = [self._value(np.zeros(t.shape, np.float32)) for t in bundle.manifest.trainable]
        self._v = [self._value(np.zeros(t.shape, np.float32)) for t in bundle.manifest.trainable]
        self._step = self._value(np.array(0.0, np.float32))
        self._lr = self._value(np.array(config.learning_rate, np.float32))

    def _value(self, a: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def step(self, input_ids, attention_mask, labels) -> float:
        io = self._session.io_binding()
        state = [*self._params, *self._m, *self._v, self._step, self._lr]
        for name, value in zip(self._inputs, state):
            io.bind_ortvalue_input(name, value)
        for name, array in zip(self._inputs[-3:], (input_ids, attention_mask, labels)):
            io.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, np.int64)))
        for name in self._outputs:
            io.bind_output(name, "cpu")
        self._session.run_with_iobinding(io)
        out = io.get_outputs()
        n = self._n
        self._params, self._m, self._v = out[1:1 + n], out[1 + n:1 + 2 * n], out[1 + 2 * n:1 + 3 * n]
        # The exporter may give the step counter shape (1,); keep it the scalar the input declares.
        self._step = self._value(out[1 + 3 * n].numpy().reshape(()))
        return float(out[0].numpy().reshape(()))

    def get_adapter(self) -> np.ndarray:
        return np.concatenate([p.numpy().reshape(-1) for p in self._params]).astype(np.float32)

    def set_adapter(self, buffer: np.ndarray) -> None:
        from device_runtime.adapter import unflatten

        buffer = np.ascontiguousarray(buffer, dtype=np.float32)
        if buffer.shape != (self._manifest.buffer_size,):
            raise ValueError(f"adapter buffer shape {buffer.shape} != ({self._manifest.buffer_size},)")
        self._params = [self._value(a) for a in unflatten(buffer, self._manifest.trainable).values()]

    def set_learning_rate(self, lr: float) -> None:
        self._lr = self._value(np.array(lr, np.float32))

    def optimizer_state(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(m, v, step) as flat buffers: for tests that compare against a reference optimizer."""
        flat = lambda vs: np.concatenate([x.numpy().reshape(-1) for x in vs])  # noqa: E731
        return flat(self._m), flat(self._v), float(self._step.numpy().reshape(()))


BACKENDS = ("auto", "ort-training", "portable")
# The bundle files each backend reads (verified against the manifest's hashes before use).
BACKEND_ROLES = {
    "ort-training": ("training_model", "eval_model", "optimizer_model", "checkpoint"),
    "portable": ("train_step", "initial_adapter"),
}


def resolve_backend(manifest, backend: str = "auto") -> str:
    """`auto`: ORT's training API when this onnxruntime has it and the bundle has its artifacts,
    else the portable step graph (plain onnxruntime, any platform)."""
    from device_runtime.ort_api import OrtTrainingUnavailable, load_training_api

    if backend not in BACKENDS:
        raise BundleError(f"unknown trainer backend {backend!r} (choices: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    has_ort_files = "checkpoint" in manifest.files
    if has_ort_files:
        try:
            load_training_api()
            return "ort-training"
        except OrtTrainingUnavailable:
            pass
    if "train_step" in manifest.files:
        return "portable"
    raise BundleError("this onnxruntime has no training API and the bundle has no portable step "
                      "(re-export with --backend both, or pip install onnxruntime-training-cpu)")


def make_trainer(bundle: Bundle, config: TrainerConfig = TrainerConfig(), backend: str = "auto") -> Trainer:
    backend = resolve_backend(bundle.manifest, backend)
    return PortableBackend(bundle, config) if backend == "portable" else OrtTrainingBackend(bundle, config)


def open_training_bundle(root, backend: str = "auto") -> tuple[Bundle, str]:
    """Open a bundle for training, verifying exactly the files the chosen backend will read."""
    from device_runtime.bundle import open_bundle

    unverified = open_bundle(root, roles=(), verify=False)
    chosen = resolve_backend(unverified.manifest, backend)
    # A causal-LM bundle's step keeps its frozen weights in a shared external file: verify it too.
    extra = ("weights",) if "weights" in unverified.manifest.files else ()
    return open_bundle(root, roles=BACKEND_ROLES[chosen] + ("tokenizer",) + extra), chosen
