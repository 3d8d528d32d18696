"""Greedy text generation on the device: plain ONNX Runtime on a causal-LM bundle's
`inference.onnx` (next-token logits, adapter fed as inputs), no torch.

No KV cache yet: every new token re-runs the whole sequence, so a token costs time linear in
the length so far (generation is quadratic in length). The weights file is memory-mapped and
shared with the training graph; the session options are the lean ones the trainer uses.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from device_runtime.adapter import unflatten
from device_runtime.bundle import Bundle
from device_runtime.local_data import encode_lm_example
from device_runtime.text import load_tokenizer
from tomtit.manifest import BundleError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    token_ms: list[float] = field(default_factory=list)  # wall time of each new token

    @property
    def ms_per_token(self) -> float:
        return sum(self.token_ms) / len(self.token_ms) if self.token_ms else 0.0


class Generator:
    def __init__(self, bundle: Bundle, threads: int = 1):
        from device_runtime.ort_api import load_onnxruntime
        from device_runtime.trainer import _disabled_optimizers, _session_options

        if bundle.manifest.task != "causal-lm":
            raise BundleError(f"bundle {bundle.root} is a {bundle.manifest.task} bundle, not a causal LM: "
                              "use `tomtit infer` for classifiers")
        ort = load_onnxruntime()
        self.manifest = bundle.manifest
        try:
            self._session = ort.InferenceSession(str(bundle.path("inference_model")), _session_options(threads, "lean"),
                                                 providers=["CPUExecutionProvider"],
                                                 disabled_optimizers=_disabled_optimizers("lean"))
        except Exception as e:  # ORT raises several pybind exception types for a bad model
            raise BundleError(f"{bundle.path('inference_model')} does not load: {e}") from None
        self._tok = load_tokenizer(bundle.path("tokenizer"))
        self.eos_id = int(self.manifest.extra["eos_id"])

    def stream(self, prompt: str, adapter: np.ndarray, *, max_new_tokens: int = 32,
               stats: GenerationStats | None = None) -> Iterator[str]:
        """Yield the decoded text piece by piece, greedily, until eos, max_new_tokens or the
        bundle's max length."""
        stats = stats if stats is not None else GenerationStats()
        ids, _ = encode_lm_example(self._tok, self.manifest, prompt, None, reserve=max_new_tokens)
        stats.prompt_tokens = len(ids)
        feed = dict(unflatten(np.asarray(adapter, np.float32), self.manifest.trainable))
        new: list[int] = []
        shown = ""
        for _ in range(max_new_tokens):
            if len(ids) >= self.manifest.max_length:
                break
            t0 = time.perf_counter()
            x = np.array([ids], np.int64)
            logits = self._session.run([self.manifest.logits_output],
                                       {"input_ids": x, "attention_mask": np.ones_like(x), **feed})[0]
            nxt = int(np.argmax(logits[0, -1]))
            stats.token_ms.append(1000 * (time.perf_counter() - t0))
            if nxt == self.eos_id:
                break
            ids.append(nxt)
            new.append(nxt)
            stats.new_tokens = len(new)
            text = self._tok.decode(new)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
                continue
            yield text[len(shown):]
            shown = text
        text = self._tok.decode(new)
        if len(text) > len(shown):
            yield text[len(shown):]

    def generate(self, prompt: str, adapter: np.ndarray, **kw) -> str:
        return "".join(self.stream(prompt, adapter, **kw))
