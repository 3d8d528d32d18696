"""A device's labelled examples, tokenised once and served as shuffled minibatches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_runtime.text import TextEncoder, trim_batch
from tomtit.data import DataError, Dataset
from tomtit.manifest import Manifest


@dataclass(frozen=True)
class EncodedData:
    input_ids: np.ndarray  # (N, max_length) int64, right-padded
    attention_mask: np.ndarray  # (N, max_length) int64
    labels: np.ndarray  # (N,) int64 indices into manifest.labels; causal LM: (N, max_length) token ids / -100

    def __len__(self) -> int:
        return len(self.labels)


def encode_dataset(ds: Dataset, encoder: TextEncoder, manifest: Manifest) -> EncodedData:
    index = {y: i for i, y in enumerate(manifest.labels)}
    unknown = sorted(set(ds.labels) - set(index))
    if unknown:
        raise DataError(
            f"{ds.source} has labels the bundle does not know: {unknown[:5]} "
            f"(bundle labels: {', '.join(manifest.labels)})"
        )
    ids, mask = encoder.encode(ds.texts)
    width = encoder.max_length
    pad_ids = np.full((len(ds), width), encoder.pad_id, np.int64)
    pad_mask = np.zeros((len(ds), width), np.int64)
    pad_ids[:, : ids.shape[1]] = ids
    pad_mask[:, : mask.shape[1]] = mask
    return EncodedData(pad_ids, pad_mask, np.array([index[y] for y in ds.labels], np.int64))


IGNORE_INDEX = -100  # causal-lm labels that carry no loss (the prompt, padding)


def encode_lm_example(tok, manifest: Manifest, prompt: str, response: str | None,
                      reserve: int = 0) -> tuple[list[int], int]:
    """Token ids of one causal-LM example and where its response starts.

    A prompt is wrapped in the bundle's prompt template (the chat template rendered at export);
    `response` None gives the generation prompt, with `reserve` tokens left for the answer. Plain text (prompt "") is scored on every token.
    The prompt body is cut, never the template or the response (which is cut to half the length).
    """
    extra = manifest.extra
    limit = manifest.max_length
    eos = int(extra["eos_id"])
    enc = lambda t: tok.encode(t, add_special_tokens=False).ids if t else []  # noqa: E731
    if not prompt:
        ids = enc(response or "")[: limit - 1] + [eos]
        return ids, 0
    tpl = extra.get("prompt_template") or {"prefix": "", "suffix": "\n"}
    pre, body, post = enc(tpl["prefix"]), enc(prompt), enc(tpl["suffix"])
    resp = [] if response is None else (enc(response)[: max(1, limit // 2) - 1] + [eos])
    budget = limit - len(pre) - len(post) - len(resp) - (min(reserve, limit // 2) if response is None else 0)
    if budget < 1:
        raise DataError(f"the prompt template and response need {limit - budget + 1} tokens; "
                        f"the bundle's max length is {limit}")
    ids = pre + body[:budget] + post
    return ids + resp, len(ids)


def encode_lm_dataset(ds, tokenizer_path, manifest: Manifest) -> EncodedData:
    """Causal-LM examples -> (ids, mask, labels) of shape (N, max_length); labels are the ids
    with IGNORE_INDEX on the prompt and the padding (the step graph shifts them)."""
    from device_runtime.text import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    n, width = len(ds), manifest.max_length
    pad = int(manifest.extra.get("pad_id", 0))
    ids = np.full((n, width), pad, np.int64)
    mask = np.zeros((n, width), np.int64)
    labels = np.full((n, width), IGNORE_INDEX, np.int64)
    for i, (prompt, response) in enumerate(zip(ds.prompts, ds.responses)):
        row, start = encode_lm_example(tok, manifest, prompt, response)
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, start : len(row)] = row[start:]
    return EncodedData(ids, mask, labels)


def encode_for_bundle(spec, bundle) -> EncodedData:
    """Load a device's data file and encode it the way the bundle's task needs."""
    from device_runtime.text import TextEncoder
    from tomtit.data import load_dataset

    m = bundle.manifest
    if m.task == "causal-lm":
        from tomtit.lm_data import load_lm_dataset

        return encode_lm_dataset(load_lm_dataset(spec), bundle.path("tokenizer"), m)
    return encode_dataset(load_dataset(spec), TextEncoder(bundle.path("tokenizer"), m.max_length), m)


class BatchStream:
    """Endless epochs of shuffled minibatches, deterministic for a seed.

    A batch never wraps across epochs so each example is seen once per epoch; the last short
    batch of an epoch is kept (a device with 5 examples still trains).
    """

    def __init__(self, data: EncodedData, batch_size: int, seed: int = 0):
        if len(data) == 0:
            raise DataError("no examples to train on")
        self._data = data
        self._batch = max(1, min(batch_size, len(data)))
        self._rng = np.random.default_rng(seed)
        self._order = np.zeros(0, np.int64)
        self._pos = 0
        self.epoch = 0

    def next(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._pos >= len(self._order):
            self._order = self._rng.permutation(len(self._data))
            self._pos = 0
            self.epoch += 1
        idx = self._order[self._pos : self._pos + self._batch]
        self._pos += len(idx)
        labels = self._data.labels[idx]
        if labels.ndim == 2:  # causal LM: token labels trimmed with the batch; the graph needs >= 3 tokens
            width = min(labels.shape[1], max(3, int(self._data.attention_mask[idx].sum(axis=1).max())))
            cut = lambda a: np.ascontiguousarray(a[:, :width])  # noqa: E731
            return cut(self._data.input_ids[idx]), cut(self._data.attention_mask[idx]), cut(labels)
        ids, mask = trim_batch(self._data.input_ids[idx], self._data.attention_mask[idx])
        return ids, mask, labels
