"""Export: bundle contents, manifest truthfulness, and one-line errors that leave nothing behind."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_tomtit
from tomtit.manifest import load_manifest


def test_bundle_files_and_manifest(tiny_bundle):
    m = load_manifest(tiny_bundle)
    for role, entry in m.files.items():
        data = (tiny_bundle / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], role
    assert m.labels == ("alpha", "beta", "gamma")
    assert m.adapter.kind == "lora" and m.adapter.rank == 8 and m.adapter.target_modules == ("query", "value")
    names = [t.name for t in m.trainable]
    assert len(names) == len(set(names))
    # 2 layers x (query, value) x (A, B) + classifier weight and bias
    assert sum("lora_A" in n for n in names) == 4 and sum("lora_B" in n for n in names) == 4
    assert sum("classifier" in n for n in names) == 2
    shapes = {t.name: t.shape for t in m.trainable}
    a = next(n for n in names if "layer.0.attention.self.query.lora_A" in n)
    b = next(n for n in names if "layer.0.attention.self.query.lora_B" in n)
    assert shapes[a] == (8, 64) and shapes[b] == (64, 8)
    assert m.buffer_size == sum(int(np.prod(t.shape)) for t in m.trainable)
    assert m.extra["export_check_max_abs_logit_diff"] < 1e-4


def test_bundle_id_is_stable_across_reexport(tiny_model, tiny_data, tiny_bundle, tmp_path):
    from export.bundle_builder import ExportConfig, export_bundle

    again = export_bundle(ExportConfig(model=str(tiny_model), data=str(tiny_data), out=tmp_path / "b2",
                                       max_length=16, seed=5), log=lambda *_: None)
    assert again.bundle_id == load_manifest(tiny_bundle).bundle_id
    other = export_bundle(ExportConfig(model=str(tiny_model), data=str(tiny_data), out=tmp_path / "b3",
                                       max_length=16, rank=4), log=lambda *_: None)
    assert other.bundle_id != again.bundle_id


@pytest.mark.slow
def test_minilm_adapter_is_under_one_percent(minilm_bundle):
    m = load_manifest(minilm_bundle)
    assert m.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert m.labels == ("business", "entertainment", "politics", "sports", "tech")
    adapter_bytes = 4 * m.buffer_size
    base_bytes = m.extra["base_param_bytes"]
    assert base_bytes > 80e6  # 22.7M float32 parameters
    assert adapter_bytes / base_bytes < 0.01
    assert m.files["checkpoint"]["bytes"] > base_bytes  # the checkpoint carries the frozen base too


def _not_bert(tmp_path: Path) -> Path:
    d = tmp_path / "gpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return d


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing_model", "does not exist"),
        ("not_hf", "no config.json"),
        ("not_bert", "'gpt2' model"),
        ("bad_target", "target module(s) nosuch not found"),
        ("no_labels", "no 'label' field"),
        ("one_class", "1 class(es)"),
        ("empty_data", "holds no examples"),
        ("bad_opset", "--opset 30"),
    ],
)
def test_bad_export_input_one_line_error_nothing_left(tmp_path, tiny_model, tiny_data, case, needle):
    out = tmp_path / "out"
    model, data, extra = str(tiny_model), str(tiny_data), []
    if case == "missing_model":
        model = str(tmp_path / "nope")
    elif case == "not_hf":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "not_bert":
        model = str(_not_bert(tmp_path))
    elif case == "bad_target":
        extra = ["--targets", "query,nosuch"]
    elif case == "no_labels":
        data = str(tmp_path / "d.jsonl")
        Path(data).write_text('{"text": "x"}\n')
    elif case == "one_class":
        data = str(tmp_path / "d.jsonl")
        Path(data).write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": "a"}\n')
    elif case == "empty_data":
        data = str(tmp_path / "d.jsonl")
        Path(data).write_text("")
    elif case == "bad_opset":
        extra = ["--opset", "30"]
    r = run_tomtit(["export", "--model", model, "--data", data, "--out", str(out), *extra])
    assert r.returncode == 2, r.stderr[-2000:]
    err_lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("tomtit export: error:"), r.stderr[-2000:]
    assert needle in err_lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folders left


def test_export_refuses_non_empty_out(tmp_path, tiny_model, tiny_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_tomtit(["export", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out)])
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
