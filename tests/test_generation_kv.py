"""Generation with a KV cache (issue 13): the bundle's generation graph (prefill + decode steps)
against the full-sequence graph and an independent PyTorch greedy loop, bundles without the
cache, and the device side without torch. Uses the tiny random Llama bundle of test_causal_lm."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_tomtit
from test_causal_lm import _session, causal_bundle, headline_data, tiny_llama  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def adapter(causal_bundle):  # noqa: F811
    """A non-zero adapter (lora_B is zero at init), large enough to move the greedy tokens."""
    from device_runtime.adapter import load_adapter
    from tomtit.manifest import load_manifest

    m = load_manifest(causal_bundle)
    rng = np.random.default_rng(7)
    return (load_adapter(causal_bundle / "adapter_init.safetensors", m)
            + 0.5 * rng.standard_normal(m.buffer_size)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_lm(tiny_llama, causal_bundle, adapter):  # noqa: F811
    """The tiny Llama + LoRA in PyTorch with the test adapter: the independent reference."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from device_runtime.adapter import unflatten
    from tomtit.manifest import load_manifest

    m = load_manifest(causal_bundle)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), attn_implementation="eager", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=m.adapter.rank, lora_alpha=m.adapter.alpha,
                                            target_modules=list(m.adapter.target_modules), task_type="CAUSAL_LM"))
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in unflatten(adapter, m.trainable).items():
            named[k].copy_(torch.from_numpy(v))
    return model.eval()


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by full re-runs without a cache (no eos stop)."""
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([out]), use_cache=False).logits
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids):]


def _generator(bundle_dir: Path, kv_cache=None):
    from device_runtime.bundle import open_bundle
    from device_runtime.generation import Generator

    return Generator(open_bundle(bundle_dir), kv_cache=kv_cache)


def _prompt_ids(bundle_dir: Path, text: str, reserve: int = 0) -> list[int]:
    from device_runtime.local_data import encode_lm_example
    from device_runtime.text import load_tokenizer
    from tomtit.manifest import load_manifest

    m = load_manifest(bundle_dir)
    return encode_lm_example(load_tokenizer(bundle_dir / "tokenizer.json"), m, text, None, reserve=reserve)[0]


@pytest.fixture
def old_bundle(causal_bundle, tmp_path):  # noqa: F811
    """The bundle as exported before the KV cache: no generation graph, kv_cache false."""
    old = tmp_path / "old"
    shutil.copytree(causal_bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    (old / m["files"].pop("generation_model")["name"]).unlink()
    m["extra"]["kv_cache"] = False
    del m["extra"]["kv_graph"]
    (old / "manifest.json").write_text(json.dumps(m))
    return old


def test_manifest_describes_the_kv_graph(causal_bundle):  # noqa: F811
    import onnx

    m = json.loads((causal_bundle / "manifest.json").read_text())
    kv = m["extra"]["kv_graph"]
    assert m["extra"]["kv_cache"] is True and m["files"]["generation_model"]["name"] == kv["file"]
    assert (kv["layers"], kv["kv_heads"], kv["head_dim"]) == (2, 2, 16)  # make_tiny_llama: 2 layers, 64/4, GQA 4:2
    assert kv["kv_layout"] == ["batch", "kv_heads", "seq", "head_dim"] and kv["past_range"][0] == 0
    assert m["extra"]["export_check_kv_max_abs_logit_diff"] < 1e-4
    g = onnx.load(str(causal_bundle / kv["file"]), load_external_data=False)
    names = [i.name for i in g.graph.input]
    adapter = [t["name"] for t in m["trainable"]]
    assert names == kv["inputs"] + kv["past_inputs"] + adapter
    assert [o.name for o in g.graph.output] == kv["outputs"] == ["logits"] + kv["present_outputs"]
    assert kv["past_inputs"] == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    # every frozen weight lives in the one shared file: 3 graphs, 1 weights.bin, no other data files
    ext = {e.value for i in g.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL
           for e in i.external_data if e.key == "location"}
    assert ext == {"weights.bin"}
    listed = {f["name"] for f in m["files"].values()} | {"manifest.json"}
    assert {p.name for p in causal_bundle.iterdir()} == listed
    # no weight is transposed and then expanded (a batched matmul that copies the output head on
    # every call: 2/3 of a SmolLM2 decode step before the head was applied to a 2-D hidden state)
    frozen = {i.name for i in g.graph.initializer}
    transposed = {n.output[0] for n in g.graph.node if n.op_type == "Transpose" and n.input[0] in frozen}
    assert not [n for n in g.graph.node if n.op_type == "Expand" and n.input[0] in transposed]


def test_kv_greedy_equals_no_cache_and_torch(causal_bundle, adapter, torch_lm):  # noqa: F811
    from device_runtime.generation import GenerationStats

    ids = _prompt_ids(causal_bundle, "Striker scores twice in derby", reserve=12)
    kv, full = _generator(causal_bundle), _generator(causal_bundle, kv_cache=False)
    assert kv.kv_cache and not full.kv_cache
    s_kv, s_full = GenerationStats(), GenerationStats()
    got_kv = list(kv.token_ids(ids, adapter, max_new_tokens=12, stats=s_kv, stop_at_eos=False))
    got_full = list(full.token_ids(ids, adapter, max_new_tokens=12, stats=s_full, stop_at_eos=False))
    want = torch_greedy(torch_lm, ids, 12)
    assert got_kv == got_full == want
    assert len(set(want)) > 1  # the adapter makes the greedy path non-trivial
    assert s_kv.kv_cache and not s_full.kv_cache
    for s in (s_kv, s_full):
        assert s.prompt_tokens == len(ids) and s.new_tokens == 12
        assert s.prefill_ms > 0 and len(s.decode_ms) == 11 and len(s.token_ms) == 12
    # the text API, with eos honoured, agrees too
    assert kv.generate("Team wins", adapter, max_new_tokens=8) == full.generate("Team wins", adapter, max_new_tokens=8)


def test_decode_logits_match_full_sequence(causal_bundle, adapter):  # noqa: F811
    """Prefill + one-token decode steps give, at every position, the full-sequence graph's logits;
    a left-padded batch of two prompts gives each prompt's own last logits."""
    from device_runtime.adapter import unflatten
    from tomtit.manifest import load_manifest

    m = load_manifest(causal_bundle)
    kv = m.extra["kv_graph"]
    feed = unflatten(adapter, m.trainable)
    gen, full = _session(causal_bundle, kv["file"]), _session(causal_bundle, "inference.onnx")
    rng = np.random.default_rng(11)
    ids = rng.integers(3, 300, (1, 20)).astype(np.int64)
    want = full.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **feed})[0][0]
    past = [np.zeros((1, kv["kv_heads"], 0, kv["head_dim"]), np.float32)] * len(kv["past_inputs"])
    done = 0
    for stop in [7] + list(range(8, 21)):  # a 7-token prefill, then 13 decode steps
        out = gen.run(kv["outputs"], {"input_ids": ids[:, done:stop], "attention_mask": np.ones((1, stop), np.int64),
                                      "position_ids": np.arange(done, stop)[None], **dict(zip(kv["past_inputs"], past)),
                                      **feed})
        np.testing.assert_allclose(out[0][0], want[stop - 1], atol=1e-4)
        past, done = out[1:], stop
        assert past[0].shape == (1, kv["kv_heads"], stop, kv["head_dim"])
    a, b = ids[0, :9], ids[0, 11:16]
    batch = np.zeros((2, 9), np.int64)
    batch[0], batch[1, 4:] = a, b
    mask = np.ones_like(batch)
    mask[1, :4] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    empty = np.zeros((2, kv["kv_heads"], 0, kv["head_dim"]), np.float32)
    out = gen.run(["logits"], {"input_ids": batch, "attention_mask": mask, "position_ids": pos,
                               **{n: empty for n in kv["past_inputs"]}, **feed})[0]
    for row, seq in enumerate((a, b)):
        one = full.run(["logits"], {"input_ids": seq[None], "attention_mask": np.ones((1, len(seq)), np.int64),
                                    **feed})[0][0, -1]
        np.testing.assert_allclose(out[row], one, atol=1e-4)


def test_prompt_near_max_length(causal_bundle, adapter, torch_lm):  # noqa: F811
    from device_runtime.generation import GenerationStats

    limit = json.loads((causal_bundle / "manifest.json").read_text())["max_length"]
    gen = _generator(causal_bundle)
    ids = list(np.random.default_rng(3).integers(3, 300, limit - 2))
    stats = GenerationStats()
    got = list(gen.token_ids(ids, adapter, max_new_tokens=10, stats=stats, stop_at_eos=False))
    assert got == torch_greedy(torch_lm, [int(i) for i in ids], 2)  # positions up to max_length - 1
    assert stats.new_tokens == 2 and len(stats.decode_ms) == 1
    assert list(gen.token_ids(ids + [5, 6], adapter, max_new_tokens=10)) == []
    # a prompt longer than the bundle allows is cut to leave room for the answer
    stats = GenerationStats()
    gen.generate("Reporters said today that " * 40, adapter, max_new_tokens=30, stats=stats)
    assert 0 < stats.prompt_tokens and stats.prompt_tokens + stats.new_tokens <= limit


def test_old_bundle_generates_and_device_needs_no_torch(causal_bundle, old_bundle, adapter, tmp_path):  # noqa: F811
    from device_runtime.bundle import open_bundle
    from device_runtime.generation import Generator
    from tomtit.manifest import BundleError

    old = _generator(old_bundle)
    assert not old.kv_cache
    text = "Write a headline. Bank raises interest rates"
    assert old.generate(text, adapter, max_new_tokens=6) == _generator(causal_bundle).generate(
        text, adapter, max_new_tokens=6)
    with pytest.raises(BundleError, match="no KV-cache generation graph"):
        Generator(open_bundle(old_bundle), kv_cache=True)
    from safetensors.numpy import save_file

    from device_runtime.adapter import unflatten
    from tomtit.manifest import load_manifest

    path = tmp_path / "a.safetensors"
    save_file(unflatten(adapter, load_manifest(causal_bundle).trainable), str(path))
    outs = {}
    for name, b in (("kv", causal_bundle), ("old", old_bundle)):
        r = run_tomtit(["generate", "--bundle", str(b), "--adapter", str(path), "--max-new-tokens", "6", "--json",
                        text], no_torch=True)
        assert r.returncode == 0, r.stderr
        outs[name] = json.loads(r.stdout)
    assert outs["kv"]["kv_cache"] is True and outs["old"]["kv_cache"] is False
    assert outs["kv"]["text"] == outs["old"]["text"] == old.generate(text, adapter, max_new_tokens=6)
    assert outs["kv"]["prefill_ms"] > 0
    r = run_tomtit(["generate", "--bundle", str(old_bundle), "--max-new-tokens", "3", "hello"], no_torch=True)
    assert r.returncode == 0 and "no KV cache" in r.stderr and "prefill" in r.stderr, r.stderr


def test_generation_keeps_the_prompt_training_keeps(causal_bundle, adapter):  # noqa: F811
    """The prompt is not cut to make room for every requested token: a long prompt keeps at least
    the body training keeps, a short one is whole, and generation stops at the max length."""
    from tokenizers import Tokenizer

    from device_runtime.generation import GenerationStats
    from device_runtime.local_data import encode_lm_example
    from tomtit.manifest import load_manifest

    m = load_manifest(causal_bundle)
    tok = Tokenizer.from_file(str(causal_bundle / "tokenizer.json"))
    enc = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    pre, post = enc(m.extra["prompt_template"]["prefix"]), enc(m.extra["prompt_template"]["suffix"])
    limit = m.max_length
    body = "Write a headline.\n\n" + "Reporters said today that the bank raises interest rates in the city. " * 4
    assert len(pre) + len(enc(body)) + len(post) > limit  # it must be cut somewhere
    train_ids, start = encode_lm_example(tok, m, body, "Bank raises interest rates")
    kept_by_training = start - len(pre) - len(post)
    gen = _generator(causal_bundle)
    stats = GenerationStats()
    gen.generate(body, adapter, max_new_tokens=24, stats=stats)
    kept = stats.prompt_tokens - len(pre) - len(post)
    room = limit - len(pre) - len(post)
    # cut to leave the 24 asked-for positions, never below training's floor (half the room)
    assert kept == min(len(enc(body)), max(room - 24, room // 2)) and kept >= min(kept_by_training, room // 2)
    assert stats.prompt_cut == len(enc(body)) - kept
    assert stats.prompt_tokens + stats.new_tokens <= limit
    assert stats.hit_max_length == (stats.prompt_tokens + stats.new_tokens == limit and stats.new_tokens < 24)
    # a short prompt is never cut, however many tokens are asked for
    q = "Who won?"
    assert len(enc(q)) <= room // 2  # short for this bundle: at most training's floor
    stats = GenerationStats()
    gen.generate(q, adapter, max_new_tokens=32, stats=stats)
    assert stats.prompt_tokens == len(pre) + len(enc(q)) + len(post) and stats.prompt_cut == 0


def test_generate_reports_truncation(causal_bundle):  # noqa: F811
    body = "Reporters said today that the bank raises interest rates in the city. " * 5
    r = run_tomtit(["generate", "--bundle", str(causal_bundle), "--max-new-tokens", "30", "--json", body],
                   no_torch=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_cut_tokens"] > 0 and "the prompt was cut by" in r.stderr
    assert out["hit_max_length"] == ("generation stopped after" in r.stderr)
    r = run_tomtit(["generate", "--bundle", str(causal_bundle), "--max-new-tokens", "3", "--json", "Team wins"],
                   no_torch=True)
    assert r.returncode == 0 and json.loads(r.stdout)["prompt_cut_tokens"] == 0 and "warning" not in r.stderr
