"""Text for causal language models: prompt/response pairs (loss on the response only) or plain
text (loss on every token), from JSONL files or the built-in `bbc-headlines` task.

Standard library and numpy only: a board reads its device file with this.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tomtit.data import MAX_TEXT_CHARS, DataError, _bbc_news_dir, iter_jsonl

BUILTIN_LM_DATASETS = ("bbc-headlines",)
# An article body is cut to this many characters for the prompt: the device truncates to the
# bundle's max length anyway, and a device file then stays small.
HEADLINE_PROMPT_CHARS = 600
HEADLINE_INSTRUCTION = "Write a headline for this news article.\n\n"


@dataclass(frozen=True)
class LMDataset:
    """Parallel tuples. prompt "" means a plain-text example: every token carries loss."""

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    groups: tuple[str, ...]  # what a non-IID split skews over (BBC category; "all" if none)
    source: str
    lines: tuple[int, ...] = ()  # each row's line in `source` (JSONL), for errors that name it; () if none

    def __len__(self) -> int:
        return len(self.responses)


def load_bbc_headlines() -> LMDataset:
    """BBC News articles: the first line of each file is its headline (the response), the body
    (cut to HEADLINE_PROMPT_CHARS) the prompt; the category folder is the group."""
    root = _bbc_news_dir()
    prompts, responses, groups = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if len(lines) < 2:
                continue
            headline = lines[0]
            body = _read_text_file_text(" ".join(lines[1:]))[:HEADLINE_PROMPT_CHARS]
            prompts.append(HEADLINE_INSTRUCTION + body)
            responses.append(headline)
            groups.append(class_dir.name)
    return _checked(LMDataset(tuple(prompts), tuple(responses), tuple(groups), "bbc-headlines"))


def _read_text_file_text(text: str) -> str:
    return " ".join(text.split())


def _row(row: object, where: str) -> tuple[str, str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'prompt'/'response' or 'text', got {type(row).__name__}")
    group = str(row.get("category", row.get("label", "all")) or "all")
    if "text" in row and ("prompt" in row or "response" in row):
        # which one was meant is a guess either way: the loss would silently go elsewhere
        raise DataError(f"{where}: a row is either 'prompt' + 'response' or 'text', not both")
    if "prompt" in row and "response" not in row:
        raise DataError(f"{where}: 'prompt' without 'response' (the loss is on the response; "
                        "use a 'text' row for plain text)")
    if "response" in row:
        prompt, response = row.get("prompt", ""), row["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings")
        if not response.strip():
            raise DataError(f"{where}: empty 'response' (the loss is on the response; it needs tokens)")
        if not prompt.strip():
            raise DataError(f"{where}: empty 'prompt' (use a 'text' row for plain text)")
    elif "text" in row:
        prompt, response = "", row["text"]
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
    else:
        raise DataError(f"{where}: a causal-LM example needs 'prompt' and 'response', or 'text'")
    if len(prompt) + len(response) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: example is longer than {MAX_TEXT_CHARS} characters")
    return prompt, response, group


def load_lm_jsonl(path: Path) -> LMDataset:
    prompts, responses, groups, lines = [], [], [], []
    try:
        for lineno, row in iter_jsonl(path):
            p, r, g = _row(row, f"{path}:{lineno}")
            prompts.append(p)
            responses.append(r)
            groups.append(g)
            lines.append(lineno)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason})") from None
    return LMDataset(tuple(prompts), tuple(responses), tuple(groups), str(path), tuple(lines))


def load_lm_dataset(spec: str | Path) -> LMDataset:
    """`bbc-headlines`, or a .jsonl file of {"prompt", "response"} or {"text"} rows (an optional
    "category" or "label" field is the group a split skews over)."""
    if str(spec) in BUILTIN_LM_DATASETS:
        return load_bbc_headlines()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"data {spec!r} is neither a file nor a built-in dataset ({', '.join(BUILTIN_LM_DATASETS)})")
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise DataError(f"{path}: causal-LM data must be JSONL (prompt/response or text rows)")
    return _checked(load_lm_jsonl(path))


def is_lm_data(spec: str | Path) -> bool:
    """True for `bbc-headlines` or a JSONL file whose first row has prompt/response or text but no label."""
    if str(spec) in BUILTIN_LM_DATASETS:
        return True
    path = Path(spec)
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        return False
    try:
        with path.open("r", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    return isinstance(row, dict) and ("response" in row or ("text" in row and "label" not in row))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def _checked(ds: LMDataset) -> LMDataset:
    if len(ds) == 0:
        raise DataError(f"{ds.source} holds no examples")
    return ds


def write_lm_jsonl(path: Path, ds: LMDataset, indices) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in indices:
            row = {"text": ds.responses[i]} if not ds.prompts[i] else {"prompt": ds.prompts[i], "response": ds.responses[i]}
            row["category"] = ds.groups[i]
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
