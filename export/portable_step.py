"""The whole training step as ONE plain ONNX graph: forward, backward and AdamW of the adapter.

Why: onnxruntime-training (ORT's on-device training build) has no aarch64 wheel and is no longer
released, so a Raspberry Pi or Jetson cannot `pip install` it. The stock `onnxruntime` package
can: it runs any graph of standard `ai.onnx` ops. So we export the step itself as such a graph:

    (adapter params, Adam m, v, step, lr, input_ids, attention_mask, labels)
        -> (loss, new params, new m, new v, new step)

with the frozen base weights as initializers. Route (measured; others fail): write the step as a
pure function with `torch.func.functional_call` + `torch.autograd.grad` + AdamW written out, trace
it with `make_fx` (symbolic shapes, core-ATen decompositions), wrap the traced graph in a module
whose buffers are the frozen tensors, `torch.export.export(strict=False)`, then
`torch.onnx.export(exported_program, optimize=False)`.

Two silent bugs are avoided on purpose (tests catch both):
- the loss is written out (log_softmax + gather + mean): onnxscript's `nll_loss_forward` fakes
  total_weight = 1, making gradients batch-size times too large — which Adam hides in the loss
  curve, so a falling loss proves nothing;
- `optimize=False`: the onnxscript optimizer folds `x + 1e-6` and `x * 0.999...` to identity, so
  Adam's eps and weight decay would vanish. ORT's own graph optimisation at load time is safe.

The AdamW here is exactly ORT's training block (onnxblock AdamW = AdamWOptimizer, adam_mode=1,
i.e. Hugging Face's AdamW with bias correction), so both backends move an adapter the same way. Base-model
dropout is off in this graph (eval-mode modules): a pure step function cannot carry an RNG state
across steps portably, and dropout is not what LoRA fine-tuning of a frozen base relies on.
"""
from __future__ import annotations

from pathlib import Path

STEP_FILE = "train_step.onnx"
OPSET = 20


def io_names(n_trainable: int) -> tuple[list[str], list[str]]:
    ins = ([f"param_{i}" for i in range(n_trainable)] + [f"adam_m_{i}" for i in range(n_trainable)]
           + [f"adam_v_{i}" for i in range(n_trainable)] + ["step", "lr", "input_ids", "attention_mask", "labels"])
    outs = (["loss"] + [f"new_param_{i}" for i in range(n_trainable)] + [f"new_adam_m_{i}" for i in range(n_trainable)]
            + [f"new_adam_v_{i}" for i in range(n_trainable)] + ["new_step"])
    return ins, outs


TASKS = ("classify", "causal-lm")
IGNORE_INDEX = -100  # causal-lm labels: positions that carry no loss (padding, the prompt)


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX.

    labels are (B, S) aligned with input_ids (Hugging Face's convention): the shift happens here,
    so logits[:, t] is scored against labels[:, t + 1]. Written out (log_softmax + gather + masked
    mean) for the same reason as the classifier's loss; a batch with no scored token gives 0.
    """
    import torch

    logits = logits[:, :-1, :]
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    safe = torch.where(keep, target, torch.zeros_like(target))
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(2, safe.unsqueeze(2)).squeeze(2)
    weight = keep.to(nll.dtype)
    return (nll * weight).sum() / torch.clamp(weight.sum(), min=1.0)


def make_step_fn(model, trainable: list[str], frozen: list[str], opt: dict, task: str = "classify"):
    """The pure training step over flat argument lists (what make_fx traces)."""
    import torch
    from torch.func import functional_call

    b1, b2 = (float(b) for b in opt["betas"])
    eps, wd = float(opt["eps"]), float(opt["weight_decay"])
    n = len(trainable)

    def step_fn(*args):
        params, m, v = args[:n], args[n:2 * n], args[2 * n:3 * n]
        step, lr, input_ids, attention_mask, labels = args[3 * n:3 * n + 5]
        frozen_values = args[3 * n + 5:]
        state = dict(zip(trainable, params))
        state.update(zip(frozen, frozen_values))
        logits = functional_call(model, state, (input_ids, attention_mask))
        if task == "causal-lm":
            loss = causal_lm_loss(logits, labels)
        else:
            logp = torch.log_softmax(logits, dim=-1)
            loss = -logp.gather(1, labels.unsqueeze(1)).mean()  # written out: see the module docstring
        grads = torch.autograd.grad(loss, params)
        t = step + 1.0
        bc1 = 1.0 - torch.pow(torch.tensor(b1), t)
        bc2 = 1.0 - torch.pow(torch.tensor(b2), t)
        step_size = lr * torch.sqrt(bc2) / bc1
        new_p, new_m, new_v = [], [], []
        for p, g, mi, vi in zip(params, grads, m, v):
            # ORT's AdamWOptimizer with adam_mode=1 (Hugging Face AdamW), which is what
            # generate_artifacts builds: eps is added to sqrt(v) *before* bias correction, and
            # decoupled weight decay applies to the updated weight. (torch.optim.AdamW adds eps
            # after; the two differ only where |g| is near eps.)
            mi = b1 * mi + (1.0 - b1) * g
            vi = b2 * vi + (1.0 - b2) * g * g
            p = p - step_size * mi / (torch.sqrt(vi) + eps)
            p = p - lr * wd * p
            new_p.append(p)
            new_m.append(mi)
            new_v.append(vi)
        return (loss, *new_p, *new_m, *new_v, t)

    return step_fn


def _split_names(logits_module, trainable: list[str]):
    """(module's names of the trainables, frozen names, {name: tensor}); frozen in module order,
    which is also the order of the `frozen_{i}` initializers of every graph exported here."""
    named = dict(logits_module.named_parameters())
    named.update(dict(logits_module.named_buffers()))
    # Manifest names are PEFT's; the wrapper module may add its own prefix (e.g. "inner.").
    prefix = next((k[: len(k) - len(trainable[0])] for k in named if k.endswith(trainable[0])), "")
    trainable = [prefix + t for t in trainable]
    missing = [t for t in trainable if t not in named]
    if missing:
        raise ValueError(f"the module has no parameter(s) {missing[:3]}")
    frozen = [k for k in named if k not in set(trainable)]
    return trainable, frozen, named


def export_portable_step(logits_module, trainable: list[str], opt: dict, dest: Path, *, max_length: int,
                         task: str = "classify", vocab_low: int = 1000, vocab_high: int = 2000) -> dict:
    """Trace and export the step of `logits_module` ((input_ids, attention_mask) -> logits).

    task "classify": labels (B,) class indices, logits (B, C). task "causal-lm": labels (B, S)
    token ids with IGNORE_INDEX where no loss is wanted, logits (B, S, V).
    Returns the manifest entry: file, input/output names, hyper-parameters, shape ranges.
    """
    import torch
    from torch._decomp import core_aten_decompositions
    from torch.export import Dim
    from torch.fx.experimental.proxy_tensor import make_fx

    if task not in TASKS:
        raise ValueError(f"task {task!r}: choose {' or '.join(TASKS)}")
    logits_module = logits_module.eval()  # no dropout: see the module docstring
    trainable, frozen, named = _split_names(logits_module, trainable)
    step_fn = make_step_fn(logits_module, trainable, frozen, opt, task)
    batch, seq = 4, min(16, max_length)
    params = [named[k].detach().clone().requires_grad_(True) for k in trainable]
    zeros = [torch.zeros_like(p).detach() for p in params]
    ids = torch.randint(vocab_low, vocab_high, (batch, seq))
    if task == "causal-lm":
        labels = ids.clone()
        labels[:, : seq // 3] = IGNORE_INDEX
    else:
        labels = torch.randint(0, 2, (batch,))
    example = (*params, *zeros, *[z.clone() for z in zeros], torch.tensor(0.0), torch.tensor(1e-3),
               ids, torch.ones(batch, seq, dtype=torch.long), labels)
    frozen_values = [named[k].detach() for k in frozen]
    with torch.enable_grad():
        traced = make_fx(step_fn, tracing_mode="symbolic", decomposition_table=core_aten_decompositions())(
            *example, *frozen_values)

    module = _with_frozen_buffers(traced, frozen_values)
    n = len(trainable)
    b = Dim("batch", min=2, max=64)
    # A causal LM's sequence dimension needs min=3, or torch.export fails with a guard violation.
    s = Dim("seq", min=3 if task == "causal-lm" else 2, max=max(3, max_length))
    dynamic = [None] * (3 * n + 2) + [{0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s} if task == "causal-lm" else {0: b}]
    example_plain = tuple(x.detach() for x in example)
    # forward(*args): dynamic_shapes mirrors the inputs as one tuple (the varargs)
    ep = torch.export.export(module, example_plain, dynamic_shapes=(tuple(dynamic),), strict=False)
    ins, outs = io_names(n)
    torch.onnx.export(ep, (), str(dest), input_names=ins, output_names=outs, opset_version=OPSET,
                      optimize=False, external_data=False)
    loss = ("token_cross_entropy (labels shifted in the graph; log_softmax + gather + mean over labels != -100)"
            if task == "causal-lm" else "cross_entropy (log_softmax + gather + mean)")
    return {"file": dest.name, "inputs": ins, "outputs": outs, "opset": OPSET, "optimizer": dict(opt),
            "loss": loss, "dropout": "off", "task": task,
            "batch_range": [2, 64], "seq_range": [3 if task == "causal-lm" else 2, max(3, max_length)]}


def export_logits_graph(logits_module, trainable: list[str], dest: Path, *, max_length: int,
                        input_names: tuple[str, str] = ("input_ids", "attention_mask"),
                        output_name: str = "logits", vocab_low: int = 1000, vocab_high: int = 2000) -> None:
    """The eval-mode forward, (input_ids, attention_mask, *adapter) -> logits, by the same route as
    the step: the adapter tensors are graph inputs named as in the manifest, and the frozen
    weights are initializers `frozen_{i}` numbered exactly as in the step graph, so both graphs can
    point at one external weights file."""
    import torch
    from torch.export import Dim

    batch, seq = 2, min(16, max_length)
    example = (torch.randint(vocab_low, vocab_high, (batch, seq)), torch.ones(batch, seq, dtype=torch.long))
    b = Dim("batch", min=1, max=64)
    s = Dim("seq", min=1, max=max(3, max_length))
    export_forward_graph(logits_module, trainable, dest, example=example, dynamic=[{0: b, 1: s}, {0: b, 1: s}],
                         input_names=list(input_names), output_names=[output_name])


def kv_io_names(layers: int) -> tuple[list[str], list[str], list[str]]:
    """(data inputs, past inputs, outputs) of the KV-cache graph, in graph order; the adapter
    tensors follow the data and past inputs, named as in the manifest."""
    past = [f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids"], past, ["logits", *present]


def export_kv_graph(kv_module, trainable: list[str], dest: Path, *, max_length: int, layers: int, kv_heads: int,
                    head_dim: int, vocab_low: int = 1000, vocab_high: int = 2000) -> dict:
    """The generation graph with a KV cache, by the same route as the other graphs:

        (input_ids (B,S), attention_mask (B,P+S), position_ids (B,S), past_key_i / past_value_i
         (B,kv_heads,P,head_dim) for every layer, *adapter)
            -> (logits of the last position (B,V), present_key_i / present_value_i (B,kv_heads,P+S,head_dim))

    `kv_module` takes (input_ids, attention_mask, position_ids, *past) and returns (logits, *present).
    ONE graph serves prefill (P = 0: the prompt) and decode (S = 1: the last token, P = tokens so
    far) because the past length is a dynamic dimension that may be 0, which ORT runs as an empty
    tensor (the export-time check in export.causal_lm runs both against PyTorch). Why one graph
    and not a prefill graph plus a decode graph: one ORT session on the board instead of two, each
    of which would hold its own graph and its own view of every layer's initializers, and nothing
    to gain in speed, since decode is the same computation with S = 1.
    Traced with P = 5 and S = 4 so neither dimension is specialised to 0 or 1.
    Returns the manifest entry that tells the device how to call it."""
    import torch
    from torch.export import Dim

    data, past, outputs = kv_io_names(layers)
    batch, p, s = 2, 5, 4
    example = (torch.randint(vocab_low, vocab_high, (batch, s)), torch.ones(batch, p + s, dtype=torch.long),
               torch.arange(p, p + s).repeat(batch, 1),
               *[torch.randn(batch, kv_heads, p, head_dim) for _ in past])
    hi = max(3, max_length)
    b = Dim("batch", min=1, max=64)
    seq = Dim("seq", min=1, max=hi)
    past_len = Dim("past", min=0, max=hi)
    # The mask spans past + new tokens; torch.export cannot name that sum of two Dims, so it gets
    # its own (the graph only ever sees consistent shapes from the device).
    total = Dim("total", min=1, max=2 * hi)
    dynamic = [{0: b, 1: seq}, {0: b, 1: total}, {0: b, 1: seq}] + [{0: b, 2: past_len}] * len(past)
    export_forward_graph(kv_module, trainable, dest, example=example, dynamic=dynamic,
                         input_names=data + past, output_names=outputs)
    return {"file": dest.name, "inputs": data, "past_inputs": past, "outputs": outputs,
            "present_outputs": outputs[1:], "adapter_inputs": "the manifest's trainable names, after the past inputs",
            "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "float32",
            "kv_layout": ["batch", "kv_heads", "seq", "head_dim"],
            "logits": "(batch, vocab): the last position only",
            "attention_mask": "(batch, past + seq): 1 for every token so far; 0 marks left padding of a batch",
            "position_ids": "(batch, seq): past + 0 .. past + seq - 1 (a left-padded row counts real tokens only)",
            "prefill": "past tensors of length 0; decode: one token and the previous present tensors",
            "seq_range": [1, hi], "past_range": [0, hi], "opset": OPSET}


def export_forward_graph(module, trainable: list[str], dest: Path, *, example: tuple, dynamic: list,
                         input_names: list[str], output_names: list[str]) -> None:
    """Export `module(*example)` (eval mode, no gradients) with the adapter tensors as extra graph
    inputs named as in the manifest and the frozen weights as initializers `frozen_{i}`, numbered
    exactly as in the step graph, so every graph of a bundle can point at one external weights file.
    `dynamic` gives each example input's dynamic dimensions (torch.export Dims)."""
    import torch
    from torch._decomp import core_aten_decompositions
    from torch.export import export
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    manifest_names = list(trainable)
    module = module.eval()
    trainable, frozen, named = _split_names(module, trainable)
    n, k = len(trainable), len(example)

    def forward_fn(*args):
        state = dict(zip(trainable, args[k:k + n]))
        state.update(zip(frozen, args[k + n:]))
        return functional_call(module, state, tuple(args[:k]))

    example = (*example, *[named[t].detach().clone() for t in trainable])
    frozen_values = [named[f].detach() for f in frozen]
    with torch.no_grad():
        traced = make_fx(forward_fn, tracing_mode="symbolic", decomposition_table=core_aten_decompositions())(
            *example, *frozen_values)

    ep = export(_with_frozen_buffers(traced, frozen_values), example, dynamic_shapes=(tuple(dynamic) + (None,) * n,), strict=False)
    torch.onnx.export(ep, (), str(dest), input_names=[*input_names, *manifest_names], output_names=output_names,
                      opset_version=OPSET, optimize=False, external_data=False)


def _with_frozen_buffers(traced, frozen_values):
    """A module around a make_fx-traced function whose last inputs are the frozen base weights:
    they ride along as buffers `frozen_{i}`, which torch.export turns into ONNX initializers (and
    the causal export then moves into the shared weights file by that name)."""
    import torch

    class WithFrozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.traced = traced
            for i, value in enumerate(frozen_values):
                self.register_buffer(f"frozen_{i}", value.clone(), persistent=True)
            self._n_frozen = len(frozen_values)

        def forward(self, *args):
            return self.traced(*args, *[getattr(self, f"frozen_{i}") for i in range(self._n_frozen)])

    return WithFrozen()
