"""Small shared pieces for federation tests: a synthetic manifest, a numpy trainer, messages."""
from __future__ import annotations

import numpy as np

from device_runtime.trainer import Trainer
from tomtit.manifest import AdapterConfig, Manifest, TensorSpec
from tomtit.wire import ModelMessage, encode_message, new_update_id

SPECS = (TensorSpec("a.lora_A", (2, 3)), TensorSpec("a.lora_B", (3, 2)), TensorSpec("head.bias", (2,)))
SIZE = sum(s.numel for s in SPECS)


def synthetic_manifest(bundle_id: str = "b0b0b0b0b0b0b0b0", specs: tuple[TensorSpec, ...] = SPECS) -> Manifest:
    return Manifest(
        format_version=1, bundle_id=bundle_id, base_model="synthetic", base_weights_sha256="0" * 64,
        architecture="none", adapter=AdapterConfig("lora", 2, 4.0, 0.0, ("q",)), trainable=specs,
        head_modules=("head",), labels=("x", "y"), max_length=8, inputs=("input_ids", "attention_mask"),
        label_input="labels", logits_output="logits",
    )


class QuadraticTrainer(Trainer):
    """Gradient descent on ||w - target||^2: a deterministic stand-in for ORT in protocol tests."""

    backend = "numpy"

    def __init__(self, target: np.ndarray, lr: float = 0.1):
        self.w = np.zeros_like(target, dtype=np.float32)
        self.target = target.astype(np.float32)
        self.lr = lr
        self.steps = 0

    def step(self, input_ids, attention_mask, labels) -> float:
        loss = float(np.sum((self.w - self.target) ** 2))
        self.w = (self.w - self.lr * 2 * (self.w - self.target)).astype(np.float32)
        self.steps += 1
        return loss

    def get_adapter(self) -> np.ndarray:
        return self.w.copy()

    def set_adapter(self, buffer: np.ndarray) -> None:
        self.w = np.array(buffer, np.float32)

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr


class DummyBatches:
    def next(self):
        return np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64), np.zeros(1, np.int64)


def update_bytes(delta: np.ndarray, *, sender: str, manifest: Manifest, base_version: int = 0,
                 num_samples: int = 10, local_steps: int = 5, update_id: str | None = None,
                 job: str = "t", codec: str = "f32", is_delta: bool = True, train_loss: float = 1.0
                 ) -> tuple[str, bytes]:
    from device_runtime.adapter import unflatten

    uid = update_id or new_update_id()
    msg = ModelMessage(kind="update", sender=sender, job=job, bundle_id=manifest.bundle_id,
                       base_version=base_version, version=1, num_samples=num_samples, local_steps=local_steps,
                       train_loss=train_loss, energy_j=2.0, is_delta=is_delta, created_at=1.0, codec=codec,
                       update_id=uid,
                       tensors=unflatten(np.asarray(delta, np.float32), manifest.trainable))
    return uid, encode_message(msg)


class CountingMeter:
    """Deterministic joules that a test advances by hand (`meter.j += ...`)."""

    name, estimated = "counting", False

    def __init__(self):
        self.j = 0.0

    def joules(self):
        return self.j

    def reserve_fraction(self):
        return None
