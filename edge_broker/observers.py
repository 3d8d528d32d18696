"""What a node does with each new model of its own, plugged in rather than branched on.

The cloud's evaluate-and-stop is one observer: it scores every committed global model on
held-out data and says "stop" at the target accuracy (a classifier) or the target held-out loss
(a causal LM: `HeldOutLossAndStop`). The node core calls `on_model` after each
commit (and once at start, for the untrained model) and finishes the run when an observer
returns a reason. The simulator uses the very same observer.
"""
from __future__ import annotations

import logging
import math
import re
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


def unigram_f1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1: the harmonic mean of unigram precision and recall, words lower-cased, each
    word counted as often as it occurs in both (a multiset overlap). 0 when either is empty."""
    from collections import Counter

    pred, ref = Counter(re.findall(r"\w+", prediction.lower())), Counter(re.findall(r"\w+", reference.lower()))
    overlap = sum((pred & ref).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


class GenerationScore:
    """Mean unigram F1 of greedy generations against the references, on a small fixed subset of
    held-out prompt/response examples (headlines: a few words each). `generator` has the
    `device_runtime.generation.Generator.generate(prompt, adapter, max_new_tokens=N)` API."""

    def __init__(self, generator, prompts: list[str], references: list[str], max_new_tokens: int = 24):
        if not prompts or len(prompts) != len(references):
            raise ValueError("GenerationScore needs as many references as prompts, at least one")
        self.generator, self.prompts, self.references = generator, list(prompts), list(references)
        self.max_new_tokens = max_new_tokens
        self.last: list[str] = []  # the latest generations, for the log

    def __call__(self, adapter: np.ndarray) -> float:
        self.last = [self.generator.generate(p, adapter, max_new_tokens=self.max_new_tokens) for p in self.prompts]
        return sum(unigram_f1(g, r) for g, r in zip(self.last, self.references)) / len(self.prompts)


class HeldOutLossAndStop(ModelObserver):
    """A causal LM's held-out loss (mean token cross-entropy, nats) and perplexity for every new
    model, and optionally a generation score; finish at `target_loss` (None: never).

    `loss_fn(adapter) -> loss` (device_runtime.inference.TokenLoss); `score_fn(adapter) -> F1` or None.
    """

    def __init__(self, loss_fn, target_loss: float | None = None, score_fn=None):
        self.loss_fn, self.score_fn = loss_fn, score_fn
        self.target_loss = target_loss
        self.history: list[dict] = []  # finite evaluations only
        self.non_finite: list[int] = []  # versions whose held-out loss was NaN/inf
        self._last_version: int | None = None

    def on_model(self, version: int, model: np.ndarray, elapsed_s: float) -> str | None:
        if version == self._last_version:
            return None
        self._last_version = version
        loss = float(self.loss_fn(model))
        if not math.isfinite(loss):
            # a diverged model (or a NaN adapter): logged and listed in the summary, never in the
            # history or telemetry (the wire refuses non-finite numbers), never "reaching" the target
            log.warning("v%d: held-out loss is %s: left out of telemetry, the run goes on", version, loss)
            self.non_finite.append(version)
            return None
        # exp overflows past ~709 nats; no model that trains is anywhere near (ln 49,152 = 10.8)
        entry = {"t": round(elapsed_s, 3), "version": version, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                 "tokens": int(getattr(self.loss_fn, "tokens", 0))}
        if self.score_fn is not None:
            entry["unigram_f1"] = float(self.score_fn(model))
        self.history.append(entry)
        score = f", unigram F1 {entry['unigram_f1']:.4f}" if "unigram_f1" in entry else ""
        log.info("v%d%s: held-out loss %.4f (perplexity %.2f)%s", version, " (base model)" if version == 0 else "",
                 loss, entry["perplexity"], score)
        if self.score_fn is not None and getattr(self.score_fn, "last", None):
            log.info("v%d: generated %r", version, self.score_fn.last[0][:120])
        if self.target_loss is not None and loss <= self.target_loss:
            return f"target loss {self.target_loss} reached"
        return None

    def telemetry(self) -> dict[str, Any]:
        if not self.history:
            return {}
        last = self.history[-1]
        out = {"heldout_loss": last["loss"], "perplexity": last["perplexity"]}
        if "unigram_f1" in last:
            out["unigram_f1"] = last["unigram_f1"]
        return out

    def summary(self) -> dict[str, Any]:
        return {"task": "causal-lm", "heldout_loss": self.history, "target_loss": self.target_loss,
                "non_finite_versions": self.non_finite}
