"""On-device inference: plain ONNX Runtime on `inference.onnx`, adapter fed as inputs.

The adapter tensors are graph inputs (see export), so one session serves any adapter: the
device's own, a parent's model, or the cloud's candidate global model during evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_runtime.adapter import unflatten
from device_runtime.bundle import Bundle
from device_runtime.text import TextEncoder, trim_batch
from tomtit.manifest import BundleError


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    probabilities: dict[str, float]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def refuse_causal(manifest, root) -> None:
    """A causal-LM bundle has no labels to classify into: say which command it needs."""
    if manifest.task == "causal-lm":
        raise BundleError(f"bundle {root} is a causal language model, not a classifier: "
                          "use `tomtit generate --bundle ...` (or `tomtit infer --remote ... --max-new-tokens`)")


class Classifier:
    def __init__(self, bundle: Bundle, threads: int = 1, memory: str = "fast", *, token_logits: bool = False):
        """`token_logits=True` accepts a causal-LM bundle for its (B, S, vocab) logits (TokenLoss);
        otherwise a causal bundle is refused before any session loads (predict would fail on it).
        `memory="lean"`: no weight pre-packing, no constant folding, no memory-pattern planner,
        initializers outside the arena -- the session next to a training one on a board (served
        inference). MiniLM-L6, 16 x 64 tokens, one thread: +122 MB RSS instead of +168 MB, at the
        same speed (144-162 ms per batch either way, measured here)."""
        from device_runtime.ort_api import load_onnxruntime

        if not token_logits:
            refuse_causal(bundle.manifest, bundle.root)
        ort = load_onnxruntime()

        if memory not in ("fast", "lean"):
            raise ValueError(f"memory profile {memory!r}: choose fast or lean")
        self.manifest = bundle.manifest
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        extra = {}
        if memory == "lean":
            so.add_session_config_entry("session.disable_prepacking", "1")
            so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
            so.enable_mem_pattern = False
            extra["disabled_optimizers"] = ["ConstantFolding"]
        try:
            self._session = ort.InferenceSession(
                str(bundle.path("inference_model")), so, providers=["CPUExecutionProvider"], **extra
            )
        except Exception as e:  # ORT raises several pybind exception types for a bad model
            raise BundleError(f"{bundle.path('inference_model')} does not load: {e}") from None
        self.encoder = TextEncoder(bundle.path("tokenizer"), self.manifest.max_length)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, adapter: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        feed.update(unflatten(np.asarray(adapter, np.float32), self.manifest.trainable))
        return self._session.run([self.manifest.logits_output], feed)[0]

    def logits_for_texts(self, texts, adapter: np.ndarray, batch_size: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.encoder.encode(texts[i : i + batch_size])
            out.append(self.logits(ids, mask, adapter))
        return np.concatenate(out) if out else np.zeros((0, len(self.manifest.labels)), np.float32)

    def predict(self, texts, adapter: np.ndarray) -> list[Prediction]:
        probs = softmax(self.logits_for_texts(list(texts), adapter))
        labels = self.manifest.labels
        return [
            Prediction(t, labels[int(p.argmax())], {labels[k]: float(p[k]) for k in range(len(labels))})
            for t, p in zip(texts, probs)
        ]

    def accuracy(self, ids: np.ndarray, mask: np.ndarray, label_ids: np.ndarray, adapter: np.ndarray,
                 batch_size: int = 64) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) over pre-encoded examples."""
        correct = 0
        nll = 0.0
        for i in range(0, len(label_ids), batch_size):
            b_ids, b_mask = trim_batch(ids[i : i + batch_size], mask[i : i + batch_size])
            logits = self.logits(b_ids, b_mask, adapter)
            y = label_ids[i : i + batch_size]
            correct += int((logits.argmax(axis=1) == y).sum())
            z = logits - logits.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            nll -= float(logp[np.arange(len(y)), y].sum())
        n = max(1, len(label_ids))
        return correct / n, nll / n



class TokenLoss:
    """Mean token cross-entropy of an adapter on pre-encoded causal-LM examples (the cloud's
    held-out loss), from the bundle's full-sequence inference graph (forward only; plain
    onnxruntime, no torch). The masking is the training step's: labels are shifted here as the
    step graph shifts them (position t is scored against labels[t + 1]), and only labels that are
    not -100 count (the response of prompt/response rows, every token of text rows).

    Batches are summed token by token, so the result is the mean over every scored token,
    whatever the batching. `classifier` is a `Classifier` on the causal bundle (its `logits`
    gives (B, S, vocab))."""

    def __init__(self, classifier: Classifier, input_ids: np.ndarray, attention_mask: np.ndarray,
                 labels: np.ndarray, batch_size: int = 8):
        if labels.ndim != 2 or len(labels) == 0:
            raise ValueError("TokenLoss needs causal-LM examples: labels of shape (N, max_length)")
        self.classifier = classifier
        self._batches = []  # (ids, mask, labels) per batch, trimmed to its longest row
        for i in range(0, len(labels), batch_size):
            ids, mask, y = input_ids[i:i + batch_size], attention_mask[i:i + batch_size], labels[i:i + batch_size]
            # >= 3 columns: the bundle's graphs are exported for sequences of at least 3 tokens
            width = min(y.shape[1], max(3, int(mask.sum(axis=1).max())))
            if (y[:, 1:width] != -100).any():
                cut = lambda a: np.ascontiguousarray(a[:, :width], np.int64)  # noqa: E731
                self._batches.append((cut(ids), cut(mask), cut(y)))
        self.tokens = sum(int((y[:, 1:] != -100).sum()) for _, _, y in self._batches)
        if not self.tokens:
            raise ValueError("no held-out token carries loss (every label is -100)")

    def __call__(self, adapter: np.ndarray) -> float:
        total = 0.0
        for ids, mask, y in self._batches:
            logits = self.classifier.logits(ids, mask, adapter)[:, :-1]
            target = y[:, 1:]
            scored = target != -100
            z = logits[scored]  # (tokens, vocab): only the rows that count
            top = z.max(axis=1, keepdims=True)
            lse = np.log(np.exp(z - top, dtype=np.float64).sum(axis=1)) + top[:, 0]
            total += float((lse - z[np.arange(len(z)), target[scored]]).sum())
        return total / self.tokens
