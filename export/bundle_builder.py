"""`tomtit export`: a pre-trained encoder becomes an on-device training bundle.

Pipeline (all offline, on a workstation):
  resolve model -> read labels from data -> BERT-family classifier + LoRA (PEFT) ->
  ONNX in training mode -> ORT training artifacts (only adapter + head trainable) ->
  ONNX in eval mode with the trainables as graph inputs (inference.onnx) ->
  tokenizer.json + manifest.json -> atomic rename into --out.

The bundle is written into a temporary sibling folder and renamed at the end, so a failed export
never leaves anything half-written in --out.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.model_source import BUILTIN_MODELS, ModelSource, ModelSourceError, resolve_model
from tomtit.data import load_dataset
from tomtit.errors import TomtitError
from tomtit.fsutil import publish_dir, sha256_file, staging_dir
from tomtit.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    AdapterConfig,
    Manifest,
    TensorSpec,
)

ORT_TRAINING_FILES = {
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
}
PORTABLE_FILES = {"train_step": "train_step.onnx"}
BUNDLE_FILES = {
    **ORT_TRAINING_FILES,
    **PORTABLE_FILES,
    "inference_model": "inference.onnx",
    "tokenizer": "tokenizer.json",
    "initial_adapter": "adapter_init.safetensors",  # version 0 of the adapter, readable without ORT training
}
INPUT_NAMES = ("input_ids", "attention_mask")
LABEL_INPUT = "labels"
LOGITS_OUTPUT = "logits"
HEAD_MODULES = ("classifier",)
# ORT's AdamW block as generate_artifacts builds it (onnxblock.optim.AdamW defaults). Recorded so
# other backends and readers of the manifest know the exact update rule.
ORT_ADAMW = {"betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0, "bias_correction": True,
             # AdamWOptimizer adam_mode=1: p -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps); p -= lr*wd*p
             "mode": "huggingface"}


class ExportError(TomtitError):
    """The export could not produce a valid bundle."""


@dataclass(frozen=True)
class ExportConfig:
    model: str  # "minilm-l6" or a local Hugging Face BERT-family folder
    data: str  # "bbc-news" or a .jsonl/.csv with text+label: only its label set is used here
    out: Path  # the bundle folder to create
    rank: int = 8  # LoRA rank r: 8 keeps the adapter ~0.3% of MiniLM's bytes
    alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # LoRA dropout; 0 keeps the exported graph free of an extra Dropout per target
    targets: tuple[str, ...] = ("query", "value")  # module names that get LoRA (attention projections)
    max_length: int = 64  # tokens per text on the device: bounds step time and memory on a board
    opset: int = 14  # 17-21 break ORT 1.19's gradient builder (LayerNorm/Dropout optional outputs)
    seed: int = 0  # LoRA A and head initialisation
    init_adapter: Path | None = None  # a PEFT LoRA folder to seed the adapter (and head) from
    force: bool = False  # replace an existing --out
    backend: str = "both"  # ort-training artifacts, the portable step graph (plain onnxruntime), or both
    task: str = "classify"  # or "causal-lm" (export/causal_lm.py: portable step only, token-level loss)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "peft", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} is not empty (pass --force to replace it)")
    if not out.parent.exists():
        raise ExportError(f"the parent folder of --out ({out.parent}) does not exist")


def _write_tokenizer(source: ModelSource, dest: Path) -> None:
    tok_file = source.path / "tokenizer.json"
    if tok_file.is_file():
        shutil.copyfile(tok_file, dest)
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source.path), use_fast=True)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{source.path} has no usable tokenizer: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ModelSourceError(f"{source.path}: only a slow tokenizer is available; need tokenizer.json")
    tok.backend_tokenizer.save(str(dest))


def _build_peft_model(cfg: ExportConfig, source: ModelSource, labels: tuple[str, ...]):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(cfg.seed)
    try:
        base = AutoModelForSequenceClassification.from_pretrained(
            str(source.path),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={y: i for i, y in enumerate(labels)},
            attn_implementation="eager",  # SDPA/flash kernels have no clean ONNX training export
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"cannot load {source.path} as a sequence classifier: {e}") from None
    linear_names = sorted(
        {name.rsplit(".", 1)[-1] for name, mod in base.named_modules() if isinstance(mod, torch.nn.Linear)}
    )
    if cfg.init_adapter is None:
        missing = [t for t in cfg.targets if t not in linear_names]
        if missing:
            raise ModelSourceError(
                f"target module(s) {', '.join(missing)} not found in {source.model_id}; "
                f"its linear layers are: {', '.join(linear_names)}"
            )
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.targets),
            modules_to_save=list(HEAD_MODULES),
            task_type="SEQ_CLS",
        )
        model = get_peft_model(base, lora)
    else:
        from export.peft_io import check_peft_adapter_dir

        check_peft_adapter_dir(cfg.init_adapter, source, labels=labels)
        model = PeftModel.from_pretrained(base, str(cfg.init_adapter), is_trainable=True)
    model.eval()
    return model


def _adapter_config_of(model) -> AdapterConfig:
    pcfg = model.peft_config["default"]
    targets = pcfg.target_modules
    targets = tuple(sorted(targets)) if not isinstance(targets, str) else (targets,)
    return AdapterConfig(
        kind="lora",
        rank=int(pcfg.r),
        alpha=float(pcfg.lora_alpha),
        dropout=float(pcfg.lora_dropout),
        target_modules=targets,
    )


def _logits_wrapper(peft_model):
    """(input_ids, attention_mask) -> logits, the exact signature of every exported graph."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    return LogitsOnly(peft_model)


def _export_onnx(model, path: Path, *, training: bool, opset: int) -> None:
    """TorchScript exporter: the one whose training-mode graphs ORT's gradient builder accepts."""
    import torch

    wrapper = _logits_wrapper(model)
    wrapper.train(training)
    trainables = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainables]
    if not training:
        # The eval-mode exporter merges initializers with equal values: every zero-initialised
        # lora_B would collapse into one. Their values do not matter in the eval graph (they
        # become inputs), so make them distinct for the export and restore them afterwards.
        with torch.no_grad():
            for p in trainables:
                p.copy_(torch.randn_like(p))
    try:
        _torch_onnx_export(wrapper, path, training=training, opset=opset)
    finally:
        with torch.no_grad():
            for p, v in zip(trainables, saved):
                p.copy_(v)


def _torch_onnx_export(wrapper, path: Path, *, training: bool, opset: int) -> None:
    import torch

    ids = torch.randint(1000, 2000, (2, 16), dtype=torch.long)
    mask = torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad() if not training else contextlib.nullcontext():
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[LOGITS_OUTPUT],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                LOGITS_OUTPUT: {0: "batch"},
            },
            opset_version=opset,
            training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False,
            export_params=True,
            dynamo=False,
        )


def _strip_prefix(name: str) -> str:
    return name[len("inner."):] if name.startswith("inner.") else name


def _rename_initializers(onnx_model) -> None:
    """Drop the wrapper's `inner.` prefix so ONNX names are exactly PEFT's parameter names."""
    rename = {i.name: _strip_prefix(i.name) for i in onnx_model.graph.initializer if i.name.startswith("inner.")}
    for init in onnx_model.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in onnx_model.graph.node:
        for k, n in enumerate(node.input):
            if n in rename:
                node.input[k] = rename[n]


def _make_training_artifacts(onnx_path: Path, trainable: list[str], out_dir: Path) -> None:
    import onnx
    from onnxruntime.training import artifacts

    model = onnx.load(str(onnx_path))
    _rename_initializers(model)
    names = {i.name for i in model.graph.initializer}
    missing = [n for n in trainable if n not in names]
    if missing:
        raise ExportError(f"exported graph lost trainable parameters: {missing[:3]}...")
    # Freeze only float initializers: int64 buffers (position ids...) are not parameters.
    frozen = [
        i.name for i in model.graph.initializer
        if i.name not in set(trainable) and i.data_type == onnx.TensorProto.FLOAT
    ]
    with _native_stderr_captured():
        artifacts.generate_artifacts(
            model,
            requires_grad=trainable,
            frozen_params=frozen,
            loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=str(out_dir),
        )


@contextlib.contextmanager
def _native_stderr_captured():
    """Keep native chatter off the user's terminal: ORT's gradient builder logs every graph pass
    at INFO from C++ (ignoring Python severity settings) and torch.onnx prints progress lines.
    Shown only if the step fails."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as sink:
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read()[-4000:].decode(errors="replace"))


def _make_inference_model(onnx_path: Path, trainable: list[TensorSpec], dest: Path) -> None:
    """Eval-mode graph whose adapter and head are graph inputs, not constants.

    Any adapter (the device's, the edge's aggregate, a PEFT import) is then just a feed: one
    InferenceSession serves them all, and the cloud evaluates each new global model without
    rebuilding a session.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    _rename_initializers(model)
    wanted = {t.name: t for t in trainable}
    keep = [i for i in model.graph.initializer if i.name not in wanted]
    found = {i.name for i in model.graph.initializer if i.name in wanted}
    if found != set(wanted):
        raise ExportError(f"inference graph lacks trainable tensors: {sorted(set(wanted) - found)[:3]}")
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for t in trainable:
        model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.shape)))
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))


def _buffer_order(bundle_dir: Path, torch_params: dict[str, np.ndarray]) -> list[str]:
    """Learn the order ORT lays trainables out in its contiguous buffer, by writing probes.

    The order is ORT's (graph input order), not PEFT's; the manifest records it so every tier
    maps the flat buffer to names the same way. Parameters are written only after the Module
    exists: writing to a fresh CheckpointState segfaults ORT 1.19.
    """
    from device_runtime.ort_api import load_training_api

    api, _ = load_training_api()
    CheckpointState, Module = api.CheckpointState, api.Module
    state = CheckpointState.load_checkpoint(str(bundle_dir / BUNDLE_FILES["checkpoint"]))
    module = Module(
        str(bundle_dir / BUNDLE_FILES["training_model"]), state,
        str(bundle_dir / BUNDLE_FILES["eval_model"]), device="cpu",
    )
    names = [n for n, p in state.parameters if p.requires_grad]
    if sorted(names) != sorted(torch_params):
        raise ExportError("ORT's trainable set differs from PEFT's")
    originals = {n: state.parameters[n].data.copy() for n in names}
    for k, n in enumerate(names):
        state.parameters[n].data = np.full(originals[n].shape, float(k + 1), np.float32)
    probe = module.get_contiguous_parameters(trainable_only=True).numpy()
    order: list[str] = []
    pos = 0
    while pos < probe.size:
        n = names[int(round(probe[pos])) - 1]
        order.append(n)
        pos += originals[n].size
    for n in names:  # restore, and check ORT's initial values are exactly PEFT's
        state.parameters[n].data = originals[n]
        if not np.array_equal(originals[n], torch_params[n]):
            raise ExportError(f"checkpoint value of {n} differs from the PyTorch model")
    return order


def bundle_identity(m: dict) -> str:
    """What makes two bundles interchangeable on the wire: same base, adapter layout and labels.

    Initial adapter values and file bytes are not part of it, so re-exporting the same
    configuration gives the same id.
    """
    ident = {
        "base_weights_sha256": m["base_weights_sha256"],
        "architecture": m["architecture"],
        "adapter": m["adapter"],
        "trainable": m["trainable"],
        "labels": m["labels"],
        "max_length": m["max_length"],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _verify_inference(bundle_dir: Path, model, trainable: list[TensorSpec], tokenizer_path: Path) -> float:
    """Export sanity check: ORT inference logits equal PyTorch's on a few texts."""
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_truncation(32)
    tok.enable_padding()
    enc = tok.encode_batch(["a short text", "another, somewhat longer piece of text to pad against"])
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    params = dict(model.named_parameters())
    feed = {"input_ids": ids, "attention_mask": mask}
    feed.update({t.name: params[t.name].detach().numpy() for t in trainable})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle_dir / BUNDLE_FILES["inference_model"]), so, providers=["CPUExecutionProvider"])
    got = sess.run([LOGITS_OUTPUT], feed)[0]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    return float(np.max(np.abs(got - want)))


def export_bundle(cfg: ExportConfig, log=print) -> Manifest:
    if cfg.task == "causal-lm":
        from export.causal_lm import export_causal_bundle

        return export_causal_bundle(cfg, log=log)
    if cfg.task != "classify":
        raise ExportError(f"--task {cfg.task!r}: choose classify or causal-lm")
    _quiet_libraries()
    out = Path(cfg.out).expanduser().resolve()
    _check_out(out, cfg.force)
    if cfg.rank < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1 or cfg.max_length < 2:
        raise ExportError("need --rank >= 1, --alpha > 0, 0 <= --dropout < 1, --max-len >= 2")
    if cfg.backend not in ("ort-training", "portable", "both"):
        raise ExportError(f"--backend {cfg.backend!r}: choose ort-training, portable or both")
    if not 9 <= cfg.opset <= 21:
        raise ExportError(f"--opset {cfg.opset} is outside what ORT 1.19 training accepts (9-21; 14 recommended)")
    source = resolve_model(cfg.model)
    dataset = load_dataset(cfg.data, min_classes=2)
    labels = dataset.label_names
    log(f"model {source.model_id} ({source.model_type}), {len(labels)} labels: {', '.join(labels)}")

    import torch

    tmp = staging_dir(out)
    try:
        model = _build_peft_model(cfg, source, labels)
        adapter_cfg = _adapter_config_of(model)
        params = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
        base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad)
        _write_tokenizer(source, tmp / BUNDLE_FILES["tokenizer"])
        with tempfile.TemporaryDirectory(prefix="tomtit-onnx-") as work:
            train_onnx = Path(work) / "train_mode.onnx"
            eval_onnx = Path(work) / "eval_mode.onnx"
            if cfg.backend in ("ort-training", "both"):
                _export_onnx(model, train_onnx, training=True, opset=cfg.opset)
                log("exported training-mode ONNX; generating ORT training artifacts")
                _make_training_artifacts(train_onnx, sorted(params), tmp)
                order = _buffer_order(tmp, params)
            else:
                order = sorted(params)
            trainable = [TensorSpec(n, tuple(params[n].shape), "float32") for n in order]
            portable = None
            if cfg.backend in ("portable", "both"):
                from export.portable_step import export_portable_step

                log("tracing the portable training step (forward + backward + AdamW as plain ONNX)")
                with _native_stderr_captured():
                    portable = export_portable_step(_logits_wrapper(model), order, ORT_ADAMW,
                                                    tmp / PORTABLE_FILES["train_step"], max_length=cfg.max_length)
            _export_onnx(model, eval_onnx, training=False, opset=cfg.opset)
            _make_inference_model(eval_onnx, trainable, tmp / BUNDLE_FILES["inference_model"])
        max_diff = _verify_inference(tmp, model, trainable, tmp / BUNDLE_FILES["tokenizer"])
        if max_diff > 1e-4:
            raise ExportError(f"inference.onnx disagrees with PyTorch by {max_diff:.2e} (> 1e-4)")
        adapter_bytes = sum(int(np.prod(t.shape)) * 4 for t in trainable)
        manifest = {
            "format_version": FORMAT_VERSION,
            "base_model": source.model_id,
            "base_weights_sha256": source.weights_sha256,
            "architecture": type(model.get_base_model()).__name__,
            "adapter": {
                "kind": adapter_cfg.kind, "rank": adapter_cfg.rank, "alpha": adapter_cfg.alpha,
                "dropout": adapter_cfg.dropout, "target_modules": list(adapter_cfg.target_modules),
            },
            "trainable": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in trainable],
            "head_modules": list(HEAD_MODULES),
            "labels": list(labels),
            "max_length": cfg.max_length,
            "inputs": list(INPUT_NAMES),
            "label_input": LABEL_INPUT,
            "logits_output": LOGITS_OUTPUT,
            "extra": {
                "model_spec": cfg.model if cfg.model in BUILTIN_MODELS else str(source.path.resolve()),
                "opset": cfg.opset,
                "seed": cfg.seed,
                "optimizer": {"kind": "adamw", **ORT_ADAMW},
                "loss": "cross_entropy",
                "base_param_bytes": int(base_bytes),
                "adapter_bytes": int(adapter_bytes),
                "adapter_fraction": adapter_bytes / base_bytes,
                "init_adapter": str(cfg.init_adapter) if cfg.init_adapter else None,
                "export_check_max_abs_logit_diff": max_diff,
                "torch": torch.__version__,
                "backends": [b for b in ("ort-training", "portable") if cfg.backend in (b, "both")],
                "portable": portable,
            },
        }
        manifest["bundle_id"] = bundle_identity(manifest)
        _write_initial_adapter(tmp / BUNDLE_FILES["initial_adapter"], params, trainable, manifest)
        manifest["files"] = {role: {"name": name, "sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for role, name in BUNDLE_FILES.items() if (tmp / name).is_file()}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        result = Manifest.from_dict(manifest)
        publish_dir(tmp, out)
        log(f"bundle {result.bundle_id} -> {out}: {len(trainable)} trainable tensors, "
            f"{adapter_bytes / 1024:.0f} KiB adapter = {100 * adapter_bytes / base_bytes:.2f}% of base weights")
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_initial_adapter(path: Path, params: dict[str, np.ndarray], trainable: list[TensorSpec],
                           manifest: dict) -> None:
    from safetensors.numpy import save_file

    save_file({t.name: np.ascontiguousarray(params[t.name]) for t in trainable}, str(path),
              metadata={"bundle_id": manifest["bundle_id"], "base_model": manifest["base_model"],
                        "format": "tomtit-adapter-1", "version": "0"})
