"""Greedy text generation on the device: plain ONNX Runtime on a causal-LM bundle, no torch.

Two ways, chosen by what the bundle holds:
- with a KV cache (`kv_cache: true` in the manifest, graph `generation_model`): the prompt runs
  once (prefill, past length 0), then each new token is one decode step that feeds back the
  keys/values of every layer, so a token costs about the same at any length (generation is
  linear in length);
- without (bundles exported before the cache, or packed without its graph): every new token
  re-runs the whole sequence through `inference.onnx`, so a token costs time linear in the
  length so far (generation is quadratic in length).
Either way the adapter is fed as graph inputs, the weights file is memory-mapped and shared with
the training graph, and the session options are the lean ones the trainer uses. Only the graph
the chosen way needs is loaded.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from device_runtime.adapter import unflatten
from device_runtime.bundle import Bundle
from device_runtime.local_data import LMFormat, encode_lm_row
from device_runtime.text import load_tokenizer
from tomtit.manifest import BundleError, Manifest

KV_ROLE = "generation_model"


def has_kv_cache(manifest: Manifest) -> bool:
    """The bundle carries the KV-cache generation graph (exported with it and not packed without it)."""
    return bool(manifest.extra.get("kv_cache")) and KV_ROLE in manifest.files and "kv_graph" in manifest.extra


def generation_roles(manifest: Manifest, kv_cache: bool | None = None) -> tuple[str, ...]:
    """The bundle files a Generator reads (for open_bundle's checks)."""
    use_kv = has_kv_cache(manifest) if kv_cache is None else kv_cache
    graph = KV_ROLE if use_kv else "inference_model"
    return (graph, "tokenizer", "initial_adapter") + (("weights",) if "weights" in manifest.files else ())


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    kv_cache: bool = False  # which way the tokens were made
    prefill_ms: float = 0.0  # the first forward pass: the whole prompt -> the first new token
    decode_ms: list[float] = field(default_factory=list)  # each later token's forward pass (+ argmax)
    prompt_cut: int = 0  # prompt-body tokens dropped so the prompt fits the bundle's max length
    hit_max_length: bool = False  # generation stopped at the bundle's max length, before max_new_tokens or eos

    @property
    def truncated(self) -> bool:
        return bool(self.prompt_cut) or self.hit_max_length

    def truncation_note(self, max_length: int) -> str:
        """One line saying what was cut ('' if nothing)."""
        parts = []
        if self.prompt_cut:
            parts.append(f"the prompt was cut by {self.prompt_cut} tokens")
        if self.hit_max_length:
            parts.append(f"generation stopped after {self.new_tokens} new tokens")
        return f"{' and '.join(parts)} to fit the bundle's max length of {max_length} tokens" if parts else ""

    @property
    def token_ms(self) -> list[float]:
        """Wall time of each new token, the first one being the prefill."""
        return ([self.prefill_ms] if self.prefill_ms or self.decode_ms else []) + list(self.decode_ms)

    @property
    def ms_per_token(self) -> float:
        t = self.token_ms
        return sum(t) / len(t) if t else 0.0

    @property
    def decode_ms_per_token(self) -> float:
        return sum(self.decode_ms) / len(self.decode_ms) if self.decode_ms else 0.0


class Generator:
    def __init__(self, bundle: Bundle, threads: int = 1, *, kv_cache: bool | None = None):
        """`kv_cache` None uses the cache when the bundle has it; False forces the full re-run
        (benchmarks compare the two); True refuses a bundle without it."""
        from device_runtime.ort_api import load_onnxruntime
        from device_runtime.trainer import _disabled_optimizers, _session_options

        if bundle.manifest.task != "causal-lm":
            raise BundleError(f"bundle {bundle.root} is a {bundle.manifest.task} bundle, not a causal LM: "
                              "use `tomtit infer` for classifiers")
        self.manifest = bundle.manifest
        available = has_kv_cache(self.manifest)
        if kv_cache and not available:
            raise BundleError(f"bundle {bundle.root} has no KV-cache generation graph: re-export it "
                              "with this version of `tomtit export`")
        self.kv_cache = available if kv_cache is None else bool(kv_cache)
        role = KV_ROLE if self.kv_cache else "inference_model"
        ort = load_onnxruntime()
        try:
            self._session = ort.InferenceSession(str(bundle.path(role)), _session_options(threads, "lean"),
                                                 providers=["CPUExecutionProvider"],
                                                 disabled_optimizers=_disabled_optimizers("lean"))
        except Exception as e:  # ORT raises several pybind exception types for a bad model
            raise BundleError(f"{bundle.path(role)} does not load: {e}") from None
        if self.kv_cache:
            kv = self.manifest.extra["kv_graph"]
            self._past_names = list(kv["past_inputs"])
            self._outputs = list(kv["outputs"])
            self._empty_past = np.zeros((1, int(kv["kv_heads"]), 0, int(kv["head_dim"])), np.float32)
            names = {i.name for i in self._session.get_inputs()}
            missing = [n for n in ("input_ids", "attention_mask", "position_ids", *self._past_names) if n not in names]
            if missing:
                raise BundleError(f"{bundle.path(role)} lacks the input(s) {', '.join(missing[:3])} its manifest names")
        self._tok = load_tokenizer(bundle.path("tokenizer"))
        self.eos_id = int(self.manifest.extra["eos_id"])
        self._format = LMFormat.of(self.manifest)

    def token_ids(self, ids: Iterable[int], adapter: np.ndarray, *, max_new_tokens: int = 32,
                  stats: GenerationStats | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        """Greedy new token ids after the prompt `ids`, until eos (not yielded), max_new_tokens or
        the bundle's max length (prompt + new tokens never exceed it). `stop_at_eos=False` keeps
        going past eos (benchmarks want a fixed length)."""
        stats = stats if stats is not None else GenerationStats()
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("generation needs at least one prompt token")
        stats.prompt_tokens, stats.kv_cache = len(ids), self.kv_cache
        stats.new_tokens, stats.prefill_ms, stats.decode_ms, stats.hit_max_length = 0, 0.0, [], False
        feed = dict(unflatten(np.asarray(adapter, np.float32), self.manifest.trainable))
        step = self._kv_steps(ids, feed) if self.kv_cache else self._full_steps(ids, feed)
        limit = self.manifest.max_length
        for n in range(max_new_tokens):
            if len(ids) >= limit:
                stats.hit_max_length = True
                break
            t0 = time.perf_counter()
            nxt = int(np.argmax(next(step)))
            ms = 1000 * (time.perf_counter() - t0)
            if n == 0:
                stats.prefill_ms = ms
            else:
                stats.decode_ms.append(ms)
            if stop_at_eos and nxt == self.eos_id:
                break
            ids.append(nxt)  # the step generators read this list: the token is their next input
            stats.new_tokens = n + 1
            yield nxt

    def _full_steps(self, ids: list[int], feed: dict) -> Iterator[np.ndarray]:
        """No cache: each call runs the whole sequence so far; yields the last position's logits."""
        while True:
            x = np.array([ids], np.int64)
            logits = self._session.run([self.manifest.logits_output],
                                       {"input_ids": x, "attention_mask": np.ones_like(x), **feed})[0]
            yield logits[0, -1]

    def _kv_steps(self, ids: list[int], feed: dict) -> Iterator[np.ndarray]:
        """KV cache: the first call runs the prompt (past length 0), every later call only the
        token appended since, with the keys/values of the call before."""
        past = [self._empty_past] * len(self._past_names)
        done = 0  # tokens already in the cache
        while True:
            new = ids[done:]
            total = len(ids)
            out = self._session.run(self._outputs, {
                "input_ids": np.array([new], np.int64),
                "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(done, total, dtype=np.int64)[None],
                **dict(zip(self._past_names, past)), **feed})
            past, done = out[1:], total
            yield out[0][0]

    def stream(self, prompt: str, adapter: np.ndarray, *, max_new_tokens: int = 32,
               stats: GenerationStats | None = None) -> Iterator[str]:
        """Yield the decoded text piece by piece, greedily, until eos, max_new_tokens or the
        bundle's max length. A long prompt body is cut to leave max_new_tokens positions, but
        never below training's floor (half the room the template leaves); a short prompt is never
        cut. `stats` says what was cut and whether the max length stopped generation."""
        stats = stats if stats is not None else GenerationStats()
        ex = encode_lm_row(self._tok, self._format, prompt, None, reserve=max_new_tokens)
        ids = ex.ids
        new: list[int] = []
        shown = ""
        stats.prompt_cut = ex.prompt_cut  # token_ids leaves this field alone
        for nxt in self.token_ids(ids, adapter, max_new_tokens=max_new_tokens, stats=stats):
            new.append(nxt)
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
