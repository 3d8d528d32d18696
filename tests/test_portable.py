"""The portable training step (one plain ONNX graph) against PyTorch and against ORT training.

Comparing the optimizer state, not just the loss, is what catches the two silent export bugs:
a fake total_weight in the loss (gradients x batch size: Adam's m is off by that factor while the
loss still falls) and an optimizer pass that deletes Adam's eps (lora_A's first gradient is
exactly zero, so 0/(sqrt(0)+eps) turns into 0/0 = NaN without it).
"""
import json

import numpy as np
import onnx
import pytest

from conftest import run_tomtit
from device_runtime.adapter import load_adapter, unflatten
from device_runtime.bundle import open_bundle
from device_runtime.local_data import BatchStream, encode_dataset
from device_runtime.text import TextEncoder
from device_runtime.trainer import OrtTrainingBackend, PortableBackend, TrainerConfig
from tomtit.data import load_dataset

LR = 1e-2


@pytest.fixture(scope="module")
def batches(tiny_bundle, tiny_data):
    b = open_bundle(tiny_bundle)
    data = encode_dataset(load_dataset(tiny_data), TextEncoder(b.path("tokenizer"), b.manifest.max_length), b.manifest)
    stream = BatchStream(data, 8, seed=3)
    return [stream.next() for _ in range(50)]


def torch_reference(bundle, tiny_model):
    import torch

    from export.model_source import resolve_model
    from export.peft_io import build_peft_model, load_buffer_into

    m = bundle.manifest
    model = build_peft_model(m, resolve_model(str(tiny_model)))
    load_buffer_into(model, m, load_adapter(bundle.path("initial_adapter"), m))
    named = dict(model.named_parameters())
    params = [named[t.name] for t in m.trainable]
    opt_cfg = m.extra["optimizer"]
    assert opt_cfg["mode"] == "huggingface"
    b1, b2 = opt_cfg["betas"]
    eps, wd = opt_cfg["eps"], opt_cfg["weight_decay"]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    t = [0]

    def step(ids, mask, labels):
        # PyTorch autograd + Hugging Face's AdamW (what ORT's AdamWOptimizer adam_mode=1 computes),
        # written out here independently of the exported graph.
        for p in params:
            p.grad = None
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
        loss.backward()
        t[0] += 1
        step_size = LR * (1 - b2 ** t[0]) ** 0.5 / (1 - b1 ** t[0])
        with torch.no_grad():
            for p, m1, m2 in zip(params, exp_avg, exp_avg_sq):
                m1.mul_(b1).add_(p.grad, alpha=1 - b1)
                m2.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m1, m2.sqrt().add(eps), value=-step_size)
                p.mul_(1 - LR * wd)
        return float(loss.detach())

    def state():
        flat = lambda xs: np.concatenate([x.detach().numpy().reshape(-1) for x in xs])  # noqa: E731
        return flat(params), flat(exp_avg), flat(exp_avg_sq)

    return step, state


def test_step_graph_is_plain_onnx(tiny_bundle):
    b = open_bundle(tiny_bundle)
    model = onnx.load(str(b.path("train_step")))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert any(o.domain in ("", "ai.onnx") and o.version == 20 for o in model.opset_import)
    onnx.checker.check_model(model, full_check=True)
    entry = b.manifest.extra["portable"]
    assert entry["optimizer"]["eps"] == b.manifest.extra["optimizer"]["eps"]


def test_one_step_equals_torch_reference_in_loss_params_and_optimizer_state(tiny_bundle, tiny_model, batches):
    b = open_bundle(tiny_bundle)
    portable = PortableBackend(b, TrainerConfig(learning_rate=LR))
    ref_step, ref_state = torch_reference(b, tiny_model)
    ids, mask, y = batches[0]
    loss = portable.step(ids, mask, y)
    ref_loss = ref_step(ids, mask, y)
    assert abs(loss - ref_loss) < 1e-5
    p, m, v = ref_state()
    pm, pv, step = portable.optimizer_state()
    assert step == 1.0
    assert np.all(np.isfinite(portable.get_adapter()))
    np.testing.assert_allclose(portable.get_adapter(), p, atol=1e-5)
    np.testing.assert_allclose(pm, m, atol=1e-7, rtol=1e-4)  # x batch size if total_weight were faked
    np.testing.assert_allclose(pv, v, atol=1e-10, rtol=1e-3)


def test_fifty_steps_track_torch(tiny_bundle, tiny_model, batches):
    b = open_bundle(tiny_bundle)
    portable = PortableBackend(b, TrainerConfig(learning_rate=LR))
    ref_step, ref_state = torch_reference(b, tiny_model)
    ours, theirs = [], []
    for ids, mask, y in batches:
        ours.append(portable.step(ids, mask, y))
        theirs.append(ref_step(ids, mask, y))
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    assert np.mean(ours[-10:]) < np.mean(ours[:10]) - 0.2
    np.testing.assert_allclose(portable.get_adapter(), ref_state()[0], atol=2e-3)


def test_dynamic_batch_and_sequence_shapes(tiny_bundle):
    b = open_bundle(tiny_bundle)
    portable = PortableBackend(b)
    rng = np.random.default_rng(0)
    for batch, seq in ((2, 3), (8, 16), (5, 9)):
        ids = rng.integers(1000, 5000, (batch, seq)).astype(np.int64)
        loss = portable.step(ids, np.ones_like(ids), rng.integers(0, 3, batch).astype(np.int64))
        assert np.isfinite(loss)


def test_both_backends_train_the_same_adapter(tiny_bundle, batches):
    b = open_bundle(tiny_bundle)
    ort = OrtTrainingBackend(b, TrainerConfig(learning_rate=LR))
    portable = PortableBackend(b, TrainerConfig(learning_rate=LR))
    np.testing.assert_array_equal(ort.get_adapter(), portable.get_adapter())
    for ids, mask, y in batches[:10]:
        lo, lp = ort.step(ids, mask, y), portable.step(ids, mask, y)
        assert abs(lo - lp) < 1e-4
    np.testing.assert_allclose(ort.get_adapter(), portable.get_adapter(), atol=1e-4)
    # set_adapter works the same way in both
    new = unflatten(np.full(b.manifest.buffer_size, 0.01, np.float32), b.manifest.trainable)
    flat = np.concatenate([x.reshape(-1) for x in new.values()])
    portable.set_adapter(flat)
    np.testing.assert_array_equal(portable.get_adapter(), flat)


def test_train_cli_portable_backend_without_torch(tiny_bundle, tiny_data):
    r = run_tomtit(["train", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--steps", "150",
                    "--lr", "1e-2", "--backend", "portable", "--json"], no_torch=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["backend"] == "portable" and out["loss_last_mean"] < out["loss_first_mean"] - 0.2


def test_lean_and_fast_session_profiles_train_identically(tiny_bundle, batches):
    """`--memory lean` only changes how ORT holds memory, never the arithmetic's result."""
    b = open_bundle(tiny_bundle)
    lean = PortableBackend(b, TrainerConfig(learning_rate=LR, memory="lean"))
    fast = PortableBackend(b, TrainerConfig(learning_rate=LR, memory="fast"))
    for ids, mask, y in batches[:5]:
        assert abs(lean.step(ids, mask, y) - fast.step(ids, mask, y)) < 1e-5
    np.testing.assert_allclose(lean.get_adapter(), fast.get_adapter(), atol=1e-5)
    with pytest.raises(ValueError, match="memory profile"):
        PortableBackend(b, TrainerConfig(memory="tiny"))
