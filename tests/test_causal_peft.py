"""PEFT interop for causal-LM bundles (issue 13): a trained adapter goes out as a PEFT folder that
`PeftModel.from_pretrained` loads onto the same base model with the same next-token logits, and a
PEFT folder (ours or one PEFT wrote itself) comes back in as a tomtit adapter. Tiny random Llama."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_tomtit
from test_causal_lm import causal_bundle, headline_data, tiny_llama  # noqa: F401 - fixtures, shared

PROMPTS = [[5, 17, 42, 99, 120, 7, 300, 64], [11, 12, 13, 250, 251, 3, 9, 4]]


@pytest.fixture(scope="module")
def trained_adapter(causal_bundle, headline_data, tmp_path_factory):  # noqa: F811
    p = tmp_path_factory.mktemp("causal-peft") / "trained.safetensors"
    r = run_tomtit(["train", "--bundle", str(causal_bundle), "--data", str(headline_data), "--steps", "12",
                    "--batch", "4", "--lr", "1e-2", "--save-adapter", str(p)], no_torch=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return p


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def _plain_base(tiny_llama):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), attn_implementation="eager",
                                                dtype=torch.float32).eval()


def _merged_logits(tiny_llama, adapter_tensors: dict, scale: float):  # noqa: F811
    """The reference, without PEFT: W += scale * B @ A written into a plain model's q/v weights
    (names parsed here from the adapter file), then its logits."""
    import torch

    model = _plain_base(tiny_llama)
    weights = dict(model.named_parameters())
    merged = 0
    with torch.no_grad():
        for name, a in adapter_tensors.items():
            if ".lora_A." not in name:
                continue
            b = adapter_tensors[name.replace(".lora_A.", ".lora_B.")]
            module = name.split("base_model.model.", 1)[1].split(".lora_A.")[0]
            weights[module + ".weight"] += torch.from_numpy(scale * (b @ a))
            merged += 1
        logits = model(input_ids=torch.tensor(PROMPTS)).logits.numpy()
    assert merged == 4  # 2 layers x (q_proj, v_proj)
    return logits


def _device_logits(bundle, adapter_buffer):
    """The device runtime's full-sequence logits (inference.onnx, no torch)."""
    import onnxruntime as ort

    from device_runtime.adapter import unflatten
    from tomtit.manifest import load_manifest

    m = load_manifest(bundle)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / "inference.onnx"), so, providers=["CPUExecutionProvider"])
    ids = np.array(PROMPTS, np.int64)
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                 **unflatten(adapter_buffer, m.trainable)})[0]


def test_causal_peft_export_loads_in_peft_with_equal_logits(causal_bundle, tiny_llama, trained_adapter,  # noqa: F811
                                                            tmp_path):
    import torch
    from peft import PeftModel

    from device_runtime.adapter import load_adapter
    from tomtit.manifest import load_manifest

    m = load_manifest(causal_bundle)
    trained = _tensors(trained_adapter)
    assert max(float(np.abs(v).max()) for k, v in trained.items() if ".lora_B." in k) > 1e-3  # lora_B moved off 0
    out = tmp_path / "peft"
    r = run_tomtit(["peft", "export", "--bundle", str(causal_bundle), "--adapter", str(trained_adapter),
                    "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 8
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and not cfg.get("modules_to_save")
    assert json.loads((out / "tomtit.json").read_text())["task"] == "causal-lm"

    model = PeftModel.from_pretrained(_plain_base(tiny_llama), str(out)).eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor(PROMPTS)).logits.numpy()
    want = _merged_logits(tiny_llama, trained, m.adapter.alpha / m.adapter.rank)
    base = _merged_logits(tiny_llama, {k: 0 * v for k, v in trained.items()}, 0.0)
    assert np.abs(want - base).max() > 1e-2  # the adapter changes the logits: the check has teeth
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    # and the device runtime computes the same next-token logits with the tomtit adapter file
    device = _device_logits(causal_bundle, load_adapter(trained_adapter, m))
    assert np.abs(device[:, -1] - got[:, -1]).max() < 1e-4


def test_causal_peft_round_trip_is_exact(causal_bundle, trained_adapter, tmp_path):  # noqa: F811
    from device_runtime.adapter import load_adapter
    from tomtit.manifest import load_manifest

    out = tmp_path / "peft"
    assert run_tomtit(["peft", "export", "--bundle", str(causal_bundle), "--adapter", str(trained_adapter),
                       "--out", str(out)]).returncode == 0
    back = tmp_path / "back.safetensors"
    r = run_tomtit(["peft", "import", "--bundle", str(causal_bundle), "--peft", str(out), "--out", str(back)])
    assert r.returncode == 0, r.stderr[-2000:]
    m = load_manifest(causal_bundle)
    np.testing.assert_array_equal(load_adapter(back, m), load_adapter(trained_adapter, m))
    r = run_tomtit(["peft", "import", "--bundle", str(causal_bundle), "--peft", str(out), "--out", str(back)])
    assert r.returncode == 2 and "exists" in r.stderr


def test_adapter_written_by_peft_imports_with_equal_logits(causal_bundle, tiny_llama, tmp_path):  # noqa: F811
    """A LoRA adapter made by PEFT alone (no tomtit sidecar) becomes a tomtit adapter: the device's
    logits with it equal PEFT's own, and `tomtit generate` takes it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from device_runtime.adapter import load_adapter
    from tomtit.manifest import load_manifest

    torch.manual_seed(7)
    model = get_peft_model(_plain_base(tiny_llama), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                               task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.eval()
    peft_dir = tmp_path / "peft-native"
    model.save_pretrained(str(peft_dir))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(PROMPTS)).logits.numpy()
    ours = tmp_path / "imported.safetensors"
    r = run_tomtit(["peft", "import", "--bundle", str(causal_bundle), "--peft", str(peft_dir), "--out", str(ours)])
    assert r.returncode == 0, r.stderr[-2000:]
    got = _device_logits(causal_bundle, load_adapter(ours, load_manifest(causal_bundle)))
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    r = run_tomtit(["generate", "--bundle", str(causal_bundle), "--adapter", str(ours), "--max-new-tokens", "3",
                    "--json", "Team wins"], no_torch=True)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("change, message", [
    ({"r": 4}, "rank 4 (the bundle's: 8)"),
    ({"lora_alpha": 32}, "lora_alpha 32 (the bundle's: 16)"),
    ({"target_modules": ["q_proj", "k_proj"]}, "target_modules ['k_proj', 'q_proj']"),
    ({"use_dora": True}, "use_dora"),
    ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern {q_proj: 32}"),
    ({"rank_pattern": {"model.layers.0.self_attn.v_proj": 4}}, "rank_pattern"),
    ({"lora_alpha": "sixteen"}, "lora_alpha is 'sixteen', not a number"),
])
def test_import_refuses_a_different_lora_configuration(causal_bundle, trained_adapter, tmp_path, change,  # noqa: F811
                                                       message):
    out = tmp_path / "peft"
    assert run_tomtit(["peft", "export", "--bundle", str(causal_bundle), "--adapter", str(trained_adapter),
                       "--out", str(out)]).returncode == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(change)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    r = run_tomtit(["peft", "import", "--bundle", str(causal_bundle), "--peft", str(out),
                    "--out", str(tmp_path / "a.safetensors")])
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "a.safetensors").exists()


def test_import_refuses_another_base_model(causal_bundle, trained_adapter, tmp_path):  # noqa: F811
    out = tmp_path / "peft"
    assert run_tomtit(["peft", "export", "--bundle", str(causal_bundle), "--adapter", str(trained_adapter),
                       "--out", str(out)]).returncode == 0
    side = json.loads((out / "tomtit.json").read_text())
    side["base_weights_sha256"] = "0" * 64
    (out / "tomtit.json").write_text(json.dumps(side))
    r = run_tomtit(["peft", "import", "--bundle", str(causal_bundle), "--peft", str(out),
                    "--out", str(tmp_path / "a.safetensors")])
    assert r.returncode == 2 and "was trained on base model" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("sidecar", ["[1, 2]", "{not json", "null"])
def test_import_refuses_a_malformed_sidecar_and_accepts_matching_patterns(causal_bundle, trained_adapter,  # noqa: F811
                                                                          tmp_path, sidecar):
    from device_runtime.adapter import load_adapter
    from tomtit.manifest import load_manifest

    out = tmp_path / "peft"
    assert run_tomtit(["peft", "export", "--bundle", str(causal_bundle), "--adapter", str(trained_adapter),
                       "--out", str(out)]).returncode == 0
    good = (out / "tomtit.json").read_text()
    (out / "tomtit.json").write_text(sidecar)
    r = run_tomtit(["peft", "import", "--bundle", str(causal_bundle), "--peft", str(out),
                    "--out", str(tmp_path / "a.safetensors")])
    assert r.returncode == 2 and "tomtit.json" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    # patterns that repeat the bundle's rank and alpha change nothing: accepted, same tensors
    (out / "tomtit.json").write_text(good)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(alpha_pattern={"q_proj": cfg["lora_alpha"]}, rank_pattern={"v_proj": cfg["r"]})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    r = run_tomtit(["peft", "import", "--bundle", str(causal_bundle), "--peft", str(out),
                    "--out", str(tmp_path / "a.safetensors")])
    assert r.returncode == 0, r.stderr[-2000:]
    m = load_manifest(causal_bundle)
    np.testing.assert_array_equal(load_adapter(tmp_path / "a.safetensors", m), load_adapter(trained_adapter, m))


def test_classifier_peft_import_round_trip(tiny_bundle, tiny_data, tmp_path):
    """The same import on a classifier bundle: LoRA and the head (PEFT modules_to_save)."""
    from device_runtime.adapter import load_adapter
    from tomtit.manifest import load_manifest

    trained = tmp_path / "t.safetensors"
    assert run_tomtit(["train", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--steps", "3",
                       "--save-adapter", str(trained)], no_torch=True).returncode == 0
    out = tmp_path / "peft"
    assert run_tomtit(["peft", "export", "--bundle", str(tiny_bundle), "--adapter", str(trained),
                       "--out", str(out)]).returncode == 0
    back = tmp_path / "back.safetensors"
    r = run_tomtit(["peft", "import", "--bundle", str(tiny_bundle), "--peft", str(out), "--out", str(back)])
    assert r.returncode == 0, r.stderr[-2000:]
    m = load_manifest(tiny_bundle)
    np.testing.assert_array_equal(load_adapter(back, m), load_adapter(trained, m))
