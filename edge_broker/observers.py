"""What a node does with each new model of its own, plugged in rather than branched on.

The cloud's evaluate-and-stop is one observer: it scores every committed global model on
held-out data and says "stop" at the target accuracy. The node core calls `on_model` after each
commit (and once at start, for the untrained model) and finishes the run when an observer
returns a reason. The simulator uses the very same observer.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

log = logging.getLogger("tomtit.node")


class ModelObserver(ABC):
    @abstractmethod
    def on_model(self, version: int, model: np.ndarray, elapsed_s: float) -> str | None:
        """A committed model; return a reason to finish the run, or None to go on."""

    def telemetry(self) -> dict[str, Any]:
        """Numbers added to the node's telemetry message."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Keys added to the node's run summary."""
        return {}


class Evaluator:
    """Accuracy and loss of an adapter on pre-encoded held-out examples."""

    def __init__(self, classifier, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray):
        self.classifier, self.ids, self.mask, self.labels = classifier, ids, mask, labels

    def __call__(self, adapter: np.ndarray) -> tuple[float, float]:
        return self.classifier.accuracy(self.ids, self.mask, self.labels, adapter)


class EvaluateAndStop(ModelObserver):
    """Held-out accuracy of every new model; finish at `target_accuracy` (None: never)."""

    def __init__(self, evaluator, target_accuracy: float | None = None):
        self.evaluator = evaluator
        self.target_accuracy = target_accuracy
        self.history: list[dict] = []
        self._last_version: int | None = None

    def on_model(self, version: int, model: np.ndarray, elapsed_s: float) -> str | None:
        if version == self._last_version:
            return None
        self._last_version = version
        acc, loss = self.evaluator(model)
        self.history.append({"t": round(elapsed_s, 3), "version": version, "accuracy": float(acc),
                             "loss": float(loss)})
        log.info("v%d%s: held-out accuracy %.4f, loss %.4f", version, " (untrained head)" if version == 0 else "",
                 acc, loss)
        if self.target_accuracy is not None and acc >= self.target_accuracy:
            return f"target accuracy {self.target_accuracy} reached"
        return None

    def telemetry(self) -> dict[str, Any]:
        return {"accuracy": self.history[-1]["accuracy"]} if self.history else {}

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.history}
