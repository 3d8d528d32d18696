"""PEFT interop: our adapter loads in Hugging Face PEFT with equal logits, and seeds a bundle back."""
import json

import numpy as np
import pytest

from conftest import run_tomtit
from tomtit.manifest import load_manifest

TEXTS = ["football goal team today", "market shares profit", "film award music", "a new report says"]


@pytest.fixture(scope="module")
def trained_adapter(tiny_bundle, tiny_data, tmp_path_factory):
    p = tmp_path_factory.mktemp("peft") / "trained.safetensors"
    r = run_tomtit(["train", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--steps", "10",
                    "--lr", "1e-2", "--save-adapter", str(p)], no_torch=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return p


def _ort_logits(bundle_dir, adapter_buffer):
    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier

    clf = Classifier(open_bundle(bundle_dir, roles=("inference_model", "tokenizer")))
    ids, mask = clf.encoder.encode(TEXTS)
    return clf.logits(ids, mask, adapter_buffer), ids, mask


def test_peft_export_loads_in_peft_with_equal_logits(tiny_bundle, tiny_model, trained_adapter, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from device_runtime.adapter import load_adapter

    out = tmp_path / "peft"
    r = run_tomtit(["peft", "export", "--bundle", str(tiny_bundle), "--adapter", str(trained_adapter),
                    "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and "classifier" in cfg["modules_to_save"]

    m = load_manifest(tiny_bundle)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=len(m.labels))
    model = PeftModel.from_pretrained(base, str(out)).eval()
    want, ids, mask = _ort_logits(tiny_bundle, load_adapter(trained_adapter, m))
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want).max() > 1e-2  # a trained head, not all-zero logits


def test_peft_adapter_seeds_a_bundle(tiny_bundle, tiny_model, tiny_data, trained_adapter, tmp_path):
    from device_runtime.adapter import load_adapter
    from device_runtime.bundle import open_bundle
    from device_runtime.trainer import make_trainer

    peft_dir = tmp_path / "peft"
    assert run_tomtit(["peft", "export", "--bundle", str(tiny_bundle), "--adapter", str(trained_adapter),
                       "--out", str(peft_dir)]).returncode == 0
    seeded = tmp_path / "seeded"
    r = run_tomtit(["export", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(seeded),
                    "--max-len", "16", "--init-adapter", str(peft_dir)])
    assert r.returncode == 0, r.stderr[-2000:]
    m = load_manifest(seeded)
    assert m.bundle_id == load_manifest(tiny_bundle).bundle_id  # same layout: they federate together
    initial = make_trainer(open_bundle(seeded)).get_adapter()
    np.testing.assert_allclose(initial, load_adapter(trained_adapter, m), rtol=0, atol=0)


def test_peft_adapter_for_other_labels_is_refused(tiny_bundle, tiny_model, trained_adapter, tmp_path):
    peft_dir = tmp_path / "peft"
    assert run_tomtit(["peft", "export", "--bundle", str(tiny_bundle), "--out", str(peft_dir)]).returncode == 0
    data = tmp_path / "two.jsonl"
    data.write_text('{"text": "x", "label": "yes"}\n{"text": "y", "label": "no"}\n')
    r = run_tomtit(["export", "--model", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "o"),
                    "--init-adapter", str(peft_dir)])
    assert r.returncode == 2 and "classifies ['alpha', 'beta', 'gamma']" in r.stderr
    assert not (tmp_path / "o").exists()
