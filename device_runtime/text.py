"""Tokenisation on the device with HF `tokenizers` (Rust, no transformers/torch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tomtit.manifest import BundleError


class TextEncoder:
    """Texts -> (input_ids, attention_mask) int64, padded to the longest text in the batch.

    Padding to the batch's longest rather than to max_length: short texts (headlines, sensor
    notes) then cost proportionally less on a board. Truncation at the bundle's max_length.
    """

    def __init__(self, tokenizer_path: Path, max_length: int):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise BundleError(f"{tokenizer_path} is not a tokenizers JSON file: {e}") from None
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)
        self.pad_id = self._tok.token_to_id("[PAD]") or 0
        self.max_length = max_length

    def encode(self, texts: list[str] | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        enc = self._tok.encode_batch(list(texts))
        width = max(1, max(len(e.ids) for e in enc))
        ids = np.full((len(enc), width), self.pad_id, np.int64)
        mask = np.zeros((len(enc), width), np.int64)
        for i, e in enumerate(enc):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask


def load_tokenizer(tokenizer_path: Path):
    """A bare `tokenizers.Tokenizer` (no padding, no truncation): causal-LM encoding and decoding."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise BundleError(f"{tokenizer_path} is not a tokenizers JSON file: {e}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def trim_batch(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop trailing columns that are padding in every row (rows pre-encoded for a whole file)."""
    width = max(1, int(mask.sum(axis=1).max()))
    return np.ascontiguousarray(ids[:, :width]), np.ascontiguousarray(mask[:, :width])
