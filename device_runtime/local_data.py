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
    skipped: int = 0  # causal LM: rows left out because they cannot fit the bundle's max length
    cut: int = 0  # causal LM: rows whose response (or text) was cut to fit, without eos

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
# The fewest positions a generation prompt leaves for new tokens. A caller asks for more with
# `reserve` (generation passes its max_new_tokens): a long prompt body is cut to leave that many,
# but never below training's floor (half the room), so a headline fits after an article the way
# it did in training; a short prompt is never cut, and generation stops at the bundle's max length.
GENERATION_ROOM = 4


@dataclass(frozen=True)
class LMFormat:
    """How a causal-LM example becomes tokens: the bundle's max length, eos and prompt template
    (the chat template rendered at export). Export builds one before the bundle exists."""

    max_length: int
    eos_id: int
    prefix: str = ""
    suffix: str = "\n"  # no chat template: the prompt, a newline, the response

    @classmethod
    def of(cls, manifest: Manifest) -> "LMFormat":
        tpl = manifest.extra.get("prompt_template") or {"prefix": "", "suffix": "\n"}
        return cls(manifest.max_length, int(manifest.extra["eos_id"]), tpl["prefix"], tpl["suffix"])


@dataclass(frozen=True)
class LMExample:
    ids: list[int]
    start: int  # where the scored part starts (0: plain text, every token)
    prompt_cut: int = 0  # prompt-body tokens dropped to fit
    response_cut: int = 0  # response (or text) tokens dropped; then no eos is appended


class RowTooLong(DataError):
    """Even one response token after the template and one prompt token does not fit."""


def encode_lm_row(tok, fmt: LMFormat, prompt: str, response: str | None,
                  reserve: int = GENERATION_ROOM) -> LMExample:
    """One causal-LM example as token ids; `response` None gives the generation prompt.

    Never cut: the template. Cut first: the prompt body, down to a floor of half the room the
    template leaves; then the response (at least one token kept). A cut response or text gets no
    eos: the model must not learn to stop mid-sentence. A generation prompt keeps its body as
    long as `reserve` (at least GENERATION_ROOM) positions stay free for new tokens, and never less
    than training's floor of half the room.
    """
    limit = fmt.max_length
    enc = lambda t: tok.encode(t, add_special_tokens=False).ids if t else []  # noqa: E731
    if not prompt:  # plain text: every token scored
        ids = enc(response or "")
        if len(ids) < limit:
            return LMExample(ids + [fmt.eos_id], 0)
        return LMExample(ids[:limit], 0, response_cut=len(ids) - limit)
    pre, body, post = enc(fmt.prefix), enc(prompt), enc(fmt.suffix)
    room = limit - len(pre) - len(post)  # for the prompt body and the response
    if response is None:
        if room < 2:
            raise RowTooLong(f"the prompt template needs {len(pre) + len(post)} tokens, plus one prompt token and "
                             f"room for one new token: {len(pre) + len(post) + 2} in all; the bundle's max length "
                             f"is {limit}")
        # the body keeps at least training's floor (half the room), and all of it when `reserve`
        # positions stay free
        keep = min(len(body), max(room - max(1, GENERATION_ROOM, reserve), room // 2))
        ids = pre + body[:keep] + post
        return LMExample(ids, len(ids), prompt_cut=len(body) - keep)
    if room < 2:
        raise RowTooLong(f"the prompt template needs {len(pre) + len(post)} tokens, plus one prompt and one "
                         f"response token: {len(pre) + len(post) + 2} in all; the bundle's max length is {limit}")
    resp = enc(response)
    want = len(resp) + 1  # with eos
    floor = min(len(body), max(1, room // 2))
    keep = max(floor, min(len(body), room - want))
    space = room - keep  # >= 1: floor <= room // 2 < room
    ids = pre + body[:keep] + post
    start = len(ids)
    if space >= want:
        ids = ids + resp + [fmt.eos_id]
    else:
        ids = ids + resp[:space]
    return LMExample(ids, start, prompt_cut=len(body) - keep, response_cut=max(0, len(resp) - space))


def encode_lm_example(tok, manifest: Manifest, prompt: str, response: str | None,
                      reserve: int = GENERATION_ROOM) -> tuple[list[int], int]:
    """(token ids, where the response starts) of one example: see encode_lm_row."""
    ex = encode_lm_row(tok, LMFormat.of(manifest), prompt, response, reserve)
    return ex.ids, ex.start


def encode_lm_rows(ds, tok, fmt: LMFormat, log=None) -> tuple[list[LMExample | None], int, int]:
    """Every row of `ds` encoded (None: skipped, it cannot fit), with the numbers of rows skipped
    and cut; one warning per kind names the first rows (path:line)."""
    import logging

    log = log or logging.getLogger(__name__).warning
    lines = getattr(ds, "lines", ()) or ()
    where = lambda i: f"{ds.source}:{lines[i]}" if lines else f"{ds.source} row {i + 1}"  # noqa: E731
    out: list[LMExample | None] = []
    skipped, cut, first_skip, why = [], [], [], ""
    for i, (prompt, response) in enumerate(zip(ds.prompts, ds.responses)):
        try:
            ex = encode_lm_row(tok, fmt, prompt, response)
        except RowTooLong as e:
            skipped.append(where(i))
            why = str(e)
            out.append(None)
            continue
        if ex.response_cut:
            cut.append(where(i))
        out.append(ex)
    if skipped:
        if len(skipped) == len(out):
            raise DataError(f"{ds.source}: no row fits ({skipped[0]}: {why})")
        log(f"skipped {len(skipped)} of {len(out)} rows that cannot fit ({', '.join(skipped[:3])}"
            f"{', ...' if len(skipped) > 3 else ''}): {why}")
    if cut:
        log(f"cut the response of {len(cut)} of {len(out)} rows to the bundle's max length {fmt.max_length}, "
            f"without eos ({', '.join(cut[:3])}{', ...' if len(cut) > 3 else ''})")
    return out, len(skipped), len(cut)


def encode_lm_dataset(ds, tokenizer_path, manifest: Manifest) -> EncodedData:
    """Causal-LM examples -> (ids, mask, labels) of shape (N, max_length); labels are the ids
    with IGNORE_INDEX on the prompt and the padding (the step graph shifts them). Rows that cannot
    fit are skipped (counted, with a warning); the cloud's TokenLoss uses the same encoding."""
    from device_runtime.text import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    rows, skipped, cut = encode_lm_rows(ds, tok, LMFormat.of(manifest))
    rows = [r for r in rows if r is not None]
    n, width = len(rows), manifest.max_length
    pad = int(manifest.extra.get("pad_id", 0))
    ids = np.full((n, width), pad, np.int64)
    mask = np.zeros((n, width), np.int64)
    labels = np.full((n, width), IGNORE_INDEX, np.int64)
    for i, ex in enumerate(rows):
        row = ex.ids
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, ex.start : len(row)] = row[ex.start:]
    return EncodedData(ids, mask, labels, skipped=skipped, cut=cut)


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
