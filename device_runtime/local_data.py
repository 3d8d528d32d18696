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
    labels: np.ndarray  # (N,) int64 indices into manifest.labels

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
        ids, mask = trim_batch(self._data.input_ids[idx], self._data.attention_mask[idx])
        return ids, mask, self._data.labels[idx]
