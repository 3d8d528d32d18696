"""Device side: training, inference, adapter files, integrity checks — and no torch anywhere."""
import ast
import json
import shutil

import numpy as np
import pytest

from conftest import ROOT, run_tomtit
from device_runtime.adapter import AdapterError, flatten, load_adapter, save_adapter, unflatten
from device_runtime.bundle import open_bundle
from tomtit.manifest import BundleError, load_manifest

FORBIDDEN = {"torch", "transformers", "peft", "export", "onnx"}


def test_device_runtime_source_never_imports_torch_or_export():
    offenders = []
    for path in (ROOT / "device_runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_train_and_infer_run_with_torch_absent(tiny_bundle, tiny_data, tmp_path):
    adapter = tmp_path / "a.safetensors"
    r = run_tomtit(["train", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--steps", "80",
                    "--batch", "8", "--lr", "1e-2", "--json", "--save-adapter", str(adapter)], no_torch=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["steps"] == 80 and out["ms_per_step"] > 0 and out["samples_per_s"] > 0
    assert out["loss_last_mean"] < out["loss_first_mean"] - 0.2, out  # the synthetic classes are learnable
    r = run_tomtit(["infer", "--bundle", str(tiny_bundle), "--adapter", str(adapter), "--json",
                    "football goal team today", "shares market bank profit"], no_torch=True)
    assert r.returncode == 0, r.stderr[-3000:]
    preds = json.loads(r.stdout)
    assert [p["label"] for p in preds] == ["alpha", "beta"]
    for p in preds:
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5


def test_infer_without_adapter_uses_the_bundles_initial_one(tiny_bundle):
    r = run_tomtit(["infer", "--bundle", str(tiny_bundle), "--json", "hello"], no_torch=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)[0]["label"] in ("alpha", "beta", "gamma")


def test_trainer_buffer_roundtrip_and_inference_consistency(tiny_bundle, tiny_data):
    from device_runtime.inference import Classifier
    from device_runtime.local_data import BatchStream, encode_dataset
    from device_runtime.trainer import make_trainer
    from tomtit.data import load_dataset

    bundle = open_bundle(tiny_bundle)
    m = bundle.manifest
    trainer = make_trainer(bundle)
    clf = Classifier(bundle)
    data = encode_dataset(load_dataset(tiny_data), clf.encoder, m)
    stream = BatchStream(data, 8, seed=0)
    for _ in range(3):
        trainer.step(*stream.next())
    buf = trainer.get_adapter()
    assert buf.shape == (m.buffer_size,) and buf.dtype == np.float32
    # Setting a buffer and reading it back is exact, and the eval graph sees what training sees.
    rng = np.random.default_rng(0)
    new = (buf + rng.normal(0, 0.01, buf.shape)).astype(np.float32)
    trainer.set_adapter(new)
    assert np.array_equal(trainer.get_adapter(), new)
    # The adapter changes predictions through the inference graph's inputs.
    ids, mask = clf.encoder.encode(["football goal", "film music"])
    assert not np.allclose(clf.logits(ids, mask, buf), clf.logits(ids, mask, new))
    with pytest.raises(ValueError):
        trainer.set_adapter(buf[:-1])


def test_adapter_file_roundtrip_and_rejections(tiny_bundle, tmp_path):
    from safetensors.numpy import save

    m = load_manifest(tiny_bundle)
    buf = np.arange(m.buffer_size, dtype=np.float32) / m.buffer_size
    p = tmp_path / "a.safetensors"
    save_adapter(p, buf, m, note="x")
    assert np.array_equal(load_adapter(p, m), buf)
    named = unflatten(buf, m.trainable)
    assert list(named) == [t.name for t in m.trainable]
    assert np.array_equal(flatten(named, m.trainable), buf)

    other = tmp_path / "other.safetensors"
    other.write_bytes(save({k: v.copy() for k, v in named.items()}, metadata={"bundle_id": "feedfeedfeedfeed"}))
    with pytest.raises(AdapterError, match="trained for bundle feedfeedfeedfeed"):
        load_adapter(other, m)
    first = m.trainable[0]
    wrong = dict(named)
    wrong[first.name] = np.zeros((1,) + first.shape, np.float32)
    (tmp_path / "w.safetensors").write_bytes(save(wrong))
    with pytest.raises(AdapterError, match="has shape"):
        load_adapter(tmp_path / "w.safetensors", m)
    missing = dict(named)
    missing.pop(first.name)
    (tmp_path / "m.safetensors").write_bytes(save(missing))
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(tmp_path / "m.safetensors", m)
    nan = {k: v.copy() for k, v in named.items()}
    nan[first.name][0, 0] = np.nan
    (tmp_path / "n.safetensors").write_bytes(save(nan))
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter(tmp_path / "n.safetensors", m)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3 + b"not a tensor file")
    with pytest.raises(AdapterError, match="not a safetensors"):
        load_adapter(tmp_path / "junk.safetensors", m)


def test_corrupt_or_incomplete_bundle_is_refused(tiny_bundle, tiny_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    ck = broken / "checkpoint"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ck.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checkpoint is corrupt"):
        open_bundle(broken)
    r = run_tomtit(["train", "--bundle", str(broken), "--data", str(tiny_data), "--steps", "1"], no_torch=True)
    assert r.returncode == 2 and "corrupt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    ck.write_bytes(bytes(data[:100]))
    with pytest.raises(BundleError, match="corrupt"):
        open_bundle(broken)
    (broken / "inference.onnx").unlink()
    with pytest.raises(BundleError, match="inference.onnx is missing"):
        open_bundle(broken, roles=("inference_model",))
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        open_bundle(broken)
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(tmp_path)


def test_data_with_labels_the_bundle_does_not_know(tiny_bundle, tmp_path):
    d = tmp_path / "d.jsonl"
    d.write_text('{"text": "x", "label": "delta"}\n')
    r = run_tomtit(["train", "--bundle", str(tiny_bundle), "--data", str(d), "--steps", "1"], no_torch=True)
    assert r.returncode == 2 and "labels the bundle does not know: ['delta']" in r.stderr


def test_adapter_from_another_bundle_is_refused_by_train(tiny_bundle, tiny_data, tmp_path):
    from safetensors.numpy import save

    m = load_manifest(tiny_bundle)
    named = {t.name: np.zeros(t.shape, np.float32) for t in m.trainable}
    p = tmp_path / "foreign.safetensors"
    p.write_bytes(save(named, metadata={"bundle_id": "0123456789abcdef", "base_model": "other-bert"}))
    r = run_tomtit(["train", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--steps", "1",
                    "--adapter", str(p)], no_torch=True)
    assert r.returncode == 2 and "other-bert" in r.stderr


@pytest.mark.slow
def test_minilm_training_loss_falls_on_a_bbc_device_split(minilm_bundle, tmp_path):
    split = tmp_path / "split"
    r = run_tomtit(["data", "split", "--data", "bbc-news", "--devices", "4", "--alpha", "0.5", "--seed", "0",
                    "--test-fraction", "0.2", "--out", str(split)])
    assert r.returncode == 0, r.stderr
    r = run_tomtit(["train", "--bundle", str(minilm_bundle), "--data", str(split / "device-00.jsonl"),
                    "--steps", "60", "--json"], no_torch=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["loss_last_mean"] < out["loss_first_mean"] - 0.3, out
