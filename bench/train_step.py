"""Training-step benchmark: ORT training, the portable step graph and PyTorch eager, same MiniLM-L6 + LoRA.

    python bench/train_step.py [--bundle runs/minilm] [--threads 1] [--rounds 20]
    python bench/train_step.py --model smollm2-135m --bundle SMOL_BUNDLE [--rounds 8]

`--model smollm2-135m` (issue 13): the causal LM SmolLM2-135M-Instruct + LoRA r=8 on q_proj,v_proj,
B=4 x T=64 real tokens (bbc-headlines: an article as the prompt in the chat template, its
headline as the response, the loss on the response only), one thread: the portable step in both
session profiles against a PyTorch training step of the same PEFT model (the base as
export/causal_lm.load_causal_lm builds it: the GGUF dequantised to float32), the same initial
adapter, the same loss (cross-entropy of the shifted logits, -100 ignored) and the same AdamW.
There is no ORT-training contender: causal bundles have only the portable step. Peak RSS is
given twice per contender: of the whole child process (loading included: torch rebuilds the
model from the GGUF, ORT memory-maps the bundle's weights file) and of its training steps alone
(the kernel's high-water mark reset through /proc/self/clear_refs after loading).

In one process, alternating step by step (so drift in machine load hits all alike): median
ms/step of ORT's training API on the bundle, of the portable step graph (plain onnxruntime API,
IOBinding) and of PyTorch eager with the same trainable
parameters, the same initial values, the same AdamW (betas, eps, no weight decay) and the same
batch (B=8, T=64 real BBC tokens). Then GFLOP/s achieved vs this machine's float32 GEMM rate at
the same thread count, and the peak RSS of a device-only training process (no torch imported)
vs a PyTorch training process, each measured in its own child process, for both ORT session
profiles (`--memory lean`, the board default, and `fast`, ORT's defaults).

The GEMM peak is this machine's true float32 rate: measured in a child process with
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from its environment (this machine sets
OPENBLAS_CORETYPE=Haswell, which holds numpy's OpenBLAS to its AVX2 kernel at about half the
AVX-512 rate), naming the kernel OpenBLAS picked (threadpoolctl), and also as ORT's own MatMul on
2048 x 2048 matrices. Nothing else in the suite changes those variables.

FLOPs are counted analytically (matmuls only): forward 2·(4H² + 2HI)·BT per layer plus attention
4·T²·H·B per layer plus the head; the backward of a frozen base still propagates activation
gradients through every layer above the lowest adapter (layer 0 here), ≈ 1× the forward matmuls,
and LoRA weight gradients are negligible. So one step ≈ 2× forward FLOPs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, SEQ = 8, 64
LM_BATCH = 4  # --model smollm2-135m: B4 x T64, the figure
MODELS = ("minilm-l6", "smollm2-135m")


def real_batch(bundle_dir: Path):
    import numpy as np

    from device_runtime.bundle import open_bundle
    from device_runtime.text import TextEncoder
    from tomtit.data import load_dataset

    b = open_bundle(bundle_dir, verify=False)
    ds = load_dataset("bbc-news")
    enc = TextEncoder(b.path("tokenizer"), SEQ)
    picks = list(range(0, len(ds), len(ds) // BATCH))[:BATCH]  # long articles: all truncate to 64
    ids, mask = enc.encode([ds.texts[i] for i in picks])
    labels = np.array([b.manifest.labels.index(ds.labels[i]) for i in picks], np.int64)
    assert ids.shape == (BATCH, SEQ), ids.shape
    return b, ids, mask, labels


def real_lm_batch(bundle_dir: Path):
    """B=4 bbc-headlines examples that fill all 64 tokens (long articles: the prompt body is cut
    to fit), labels -100 on the prompt, as the device encodes them."""
    import numpy as np

    from device_runtime.bundle import open_bundle
    from device_runtime.local_data import IGNORE_INDEX, encode_lm_example
    from device_runtime.text import load_tokenizer
    from tomtit.lm_data import load_lm_dataset

    b = open_bundle(bundle_dir, verify=False)
    m = b.manifest
    if m.task != "causal-lm" or m.max_length < SEQ:
        raise SystemExit(f"{bundle_dir}: need a causal-LM bundle with max length >= {SEQ} "
                         f"(tomtit export --model smollm2-135m --task causal-lm --data bbc-headlines --max-len {SEQ})")
    tok = load_tokenizer(b.path("tokenizer"))
    ds = load_lm_dataset("bbc-headlines")
    rows = []
    for i in range(0, len(ds), len(ds) // (4 * LM_BATCH)):  # spread over the categories
        ids, start = encode_lm_example(tok, m, ds.prompts[i], ds.responses[i])
        if len(ids) >= SEQ:
            rows.append((ids[:SEQ], start))
        if len(rows) == LM_BATCH:
            break
    ids = np.array([r for r, _ in rows], np.int64)
    labels = ids.copy()
    for k, (_, start) in enumerate(rows):
        labels[k, :start] = IGNORE_INDEX
    assert ids.shape == (LM_BATCH, SEQ), ids.shape
    return b, ids, np.ones_like(ids), labels


def forward_flops(cfg: dict, batch: int, seq: int, n_labels: int) -> float:
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tokens = batch * seq
    per_layer = 2 * tokens * (4 * h * h + 2 * h * i) + 4 * batch * seq * seq * h
    return layers * per_layer + 2 * batch * (h * h + h * n_labels)


def llama_forward_flops(cfg: dict, batch: int, seq: int) -> float:
    """Matmul FLOPs of a Llama forward: q/o (H x H), k/v (H x kv_heads*head_dim, GQA), the gated
    MLP (three H x I), attention scores and mix (4 T^2 H), and the LM head over the vocabulary
    at every position (the loss needs all of them: 2 H V per token, a fifth of SmolLM2's step)."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    tokens = batch * seq
    per_layer = 2 * tokens * (2 * h * h + 2 * h * kv * head_dim + 3 * h * i) + 4 * batch * seq * seq * h
    return layers * per_layer + 2 * tokens * h * cfg["vocab_size"]


def _best_rate(fn, n: int, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9  # best of reps: a peak, not a typical rate under load


def gemm_peak_child(threads: int, n: int = 2048, reps: int = 7) -> dict:
    """Run in a child whose environment lacks the OPENBLAS_* overrides: numpy's and ORT's GEMM."""
    import numpy as np
    import threadpoolctl

    from device_runtime.ort_api import load_onnxruntime

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    with threadpoolctl.threadpool_limits(threads):
        blas = [(i["internal_api"], i.get("architecture")) for i in threadpoolctl.threadpool_info()
                if i.get("user_api") == "blas"]
        numpy_rate = _best_rate(lambda: a @ b, n, reps)
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
                               helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ort = load_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ort_rate = _best_rate(lambda: sess.run(None, {"A": a, "B": b}), n, reps)
    assert "torch" not in sys.modules
    return {"numpy_gflops": numpy_rate, "blas": blas, "ort_matmul_gflops": ort_rate,
            "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}


def gemm_peak(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, __file__, "--child", "gemm-peak", "--threads", str(threads)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ort_trainer(bundle, threads, backend="ort-training", memory="lean"):
    from device_runtime.trainer import TrainerConfig, make_trainer

    return make_trainer(bundle, TrainerConfig(threads=threads, learning_rate=1e-4, memory=memory), backend)


def torch_trainer(bundle, adapter, threads):
    import torch

    from export.model_source import resolve_model
    from export.peft_io import build_peft_model, load_buffer_into

    torch.set_num_threads(threads)
    m = bundle.manifest
    model = build_peft_model(m, resolve_model(m.extra.get("model_spec", "minilm-l6")))
    load_buffer_into(model, m, adapter)
    model.train()
    opt_cfg = m.extra["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=tuple(opt_cfg["betas"]), eps=opt_cfg["eps"],
                            weight_decay=opt_cfg["weight_decay"])

    def step(ids, mask, labels):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def causal_torch_trainer(bundle, adapter, threads):
    """A PyTorch training step of the bundle's causal PEFT model: base as the export loads it,
    LoRA values from `adapter`, token-level cross-entropy on the shifted logits, AdamW."""
    import torch
    import torch.nn.functional as F

    from export.peft_io import causal_source_for, build_causal_peft_model, load_buffer_into

    torch.set_num_threads(threads)
    m = bundle.manifest
    model = build_causal_peft_model(m, causal_source_for(m, None))
    load_buffer_into(model, m, adapter)
    model.train()
    opt_cfg = m.extra["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=tuple(opt_cfg["betas"]), eps=opt_cfg["eps"],
                            weight_decay=opt_cfg["weight_decay"])

    def step(ids, mask, labels):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so a later reading is the
    peak of what ran since; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(kind: str, bundle_dir: Path, threads: int, steps: int, model: str = "minilm-l6") -> None:
    """Run `steps` training steps and report peak RSS; the ORT child never imports torch."""
    if kind == "gemm-peak":
        print(json.dumps(gemm_peak_child(threads)))
        return
    if model == "smollm2-135m":
        causal_child(kind, bundle_dir, threads, steps)
        return
    bundle, ids, mask, labels = real_batch(bundle_dir)
    if kind != "torch":
        backend, memory = kind.split("-")
        tr = ort_trainer(bundle, threads, "ort-training" if backend == "ort" else "portable", memory)
        for _ in range(steps):
            tr.step(ids, mask, labels)
        assert "torch" not in sys.modules
    else:
        import torch

        adapter = ort_trainer(bundle, threads).get_adapter()
        step = torch_trainer(bundle, adapter, threads)
        t_ids, t_mask, t_y = (torch.from_numpy(x) for x in (ids, mask, labels))
        for _ in range(steps):
            step(t_ids, t_mask, t_y)
    print(json.dumps({"kind": kind, "peak_rss_mb": vm_hwm_mb()}))


def causal_child(kind: str, bundle_dir: Path, threads: int, steps: int) -> None:
    bundle, ids, mask, labels = real_lm_batch(bundle_dir)
    if kind == "torch":
        import torch

        from device_runtime.adapter import load_adapter

        step = causal_torch_trainer(bundle, load_adapter(bundle.path("initial_adapter"), bundle.manifest), threads)
        ids, mask, labels = (torch.from_numpy(x) for x in (ids, mask, labels))
    else:
        tr = ort_trainer(bundle, threads, "portable", kind.split("-")[1])
        step = tr.step
    load_peak = vm_hwm_mb()
    reset = reset_peak_rss()
    for _ in range(steps):
        step(ids, mask, labels)
    if kind != "torch":
        assert "torch" not in sys.modules
    train_peak = vm_hwm_mb() if reset else None
    print(json.dumps({"kind": kind, "peak_rss_mb": max(load_peak, vm_hwm_mb()), "train_peak_rss_mb": train_peak}))


def vm_hwm_mb() -> float:
    """Peak RSS of this process image. Not getrusage's ru_maxrss: Linux carries that across
    fork+exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(kind: str, bundle_dir: Path, threads: int, steps: int, model: str = "minilm-l6", full: bool = False):
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--bundle", str(bundle_dir),
                          "--threads", str(threads), "--steps", str(steps), "--model", model],
                         capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res if full else res["peak_rss_mb"]


def ensure_bundle(path: Path | None) -> Path:
    if path is not None:
        return path
    out = Path(tempfile.gettempdir()) / "tomtit-bench-minilm"
    if not (out / "manifest.json").is_file():
        from export.bundle_builder import ExportConfig, export_bundle

        export_bundle(ExportConfig(model="minilm-l6", data="bbc-news", out=out, force=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="minilm-l6",
                    help="smollm2-135m: the causal LM (needs --bundle of a causal export, or exports one, ~5 min)")
    ap.add_argument("--bundle", type=Path, help="bundle of --model (default: export one to a temp folder)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, help="alternating timed rounds (default 20; 8 for smollm2-135m)")
    ap.add_argument("--steps", type=int, help="steps per RSS child process (default 10; 4 for smollm2-135m)")
    ap.add_argument("--child", choices=["ort-lean", "ort-fast", "portable-lean", "portable-fast", "torch", "gemm-peak"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    causal = args.model == "smollm2-135m"
    args.rounds = args.rounds or (8 if causal else 20)
    args.steps = args.steps or (4 if causal else 10)
    if args.child:
        child(args.child, args.bundle, args.threads, args.steps, args.model)
        return
    if causal:
        causal_main(args)
        return

    import torch

    bundle_dir = ensure_bundle(args.bundle)
    bundle, ids, mask, labels = real_batch(bundle_dir)
    trainers = {"ort-lean": ort_trainer(bundle, args.threads, "ort-training", "lean"),
                "ort-fast": ort_trainer(bundle, args.threads, "ort-training", "fast")}
    if "train_step" in bundle.manifest.files:
        trainers["portable-lean"] = ort_trainer(bundle, args.threads, "portable", "lean")
        trainers["portable-fast"] = ort_trainer(bundle, args.threads, "portable", "fast")
    torch_step = torch_trainer(bundle, trainers["ort-lean"].get_adapter(), args.threads)
    t_in = tuple(torch.from_numpy(x) for x in (ids, mask, labels))
    runs = {**{k: (lambda tr=tr: tr.step(ids, mask, labels)) for k, tr in trainers.items()},
            "torch": lambda: torch_step(*t_in)}
    for _ in range(3):  # warm-up: ORT allocates its arena, torch its autograd buffers
        for run in runs.values():
            run()
    ms = {k: [] for k in runs}
    for _ in range(args.rounds):  # alternating, so load drift hits every contender alike
        for k, run in runs.items():
            t = time.perf_counter()
            run()
            ms[k].append(1000 * (time.perf_counter() - t))
    from export.model_source import resolve_model

    model_cfg = json.loads((resolve_model(bundle.manifest.extra.get("model_spec", "minilm-l6")).path / "config.json").read_text())
    step_flops = 2 * forward_flops(model_cfg, BATCH, SEQ, len(bundle.manifest.labels))
    del trainers, torch_step  # the RSS children below run one at a time; free this process's share first
    peak = gemm_peak(args.threads)
    true_peak = max(peak["numpy_gflops"], peak["ort_matmul_gflops"])
    rss = {k: peak_rss(k, bundle_dir, args.threads, args.steps) for k in runs}
    med = {k: statistics.median(v) for k, v in ms.items()}
    result = {"batch": BATCH, "seq": SEQ, "threads": args.threads, "rounds": args.rounds,
              "step_gflop": step_flops / 1e9, "gemm_peak": peak, "true_peak_gflops": true_peak, "contenders": {}}
    for k in runs:
        gflops = step_flops / med[k] / 1e6
        result["contenders"][k] = {"ms_per_step": med[k], "gflops": gflops, "fraction_of_true_peak": gflops / true_peak,
                                   "time_over_torch": med[k] / med["torch"], "peak_rss_mb": rss[k],
                                   "rss_over_torch": rss[k] / rss["torch"]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"MiniLM-L6 + LoRA r={bundle.manifest.adapter.rank}, B={BATCH} T={SEQ}, {args.threads} thread(s), "
          f"median of {args.rounds} alternating steps; one step = {result['step_gflop']:.2f} GFLOP")
    print(f"  true float32 GEMM peak: numpy {peak['numpy_gflops']:.0f} GFLOP/s (OpenBLAS kernel "
          f"{', '.join(str(b[1]) for b in peak['blas']) or '?'}, OPENBLAS_* unset), ORT MatMul "
          f"{peak['ort_matmul_gflops']:.0f} GFLOP/s")
    print(f"  {'':16} {'ms/step':>8} {'GFLOP/s':>8} {'% peak':>7} {'x torch':>8} {'peak RSS':>9} {'x torch':>8}")
    for k, c in result["contenders"].items():
        print(f"  {k:16} {c['ms_per_step']:8.1f} {c['gflops']:8.1f} {100 * c['fraction_of_true_peak']:6.0f}% "
              f"{c['time_over_torch']:8.2f} {c['peak_rss_mb']:7.0f} MB {c['rss_over_torch']:8.2f}")

def ensure_causal_bundle(path: Path | None) -> Path:
    if path is not None:
        return path
    out = Path(tempfile.gettempdir()) / "tomtit-bench-smollm2"
    if not (out / "manifest.json").is_file():
        from export.bundle_builder import ExportConfig, export_bundle

        export_bundle(ExportConfig(model="smollm2-135m", data="bbc-headlines", out=out, max_length=SEQ,
                                   task="causal-lm", backend="portable", force=True))
    return out


def causal_main(args: argparse.Namespace) -> None:
    """SmolLM2-135M + LoRA: portable (lean, fast) vs PyTorch eager, alternating step by step."""
    import torch

    bundle_dir = ensure_causal_bundle(args.bundle)
    bundle, ids, mask, labels = real_lm_batch(bundle_dir)
    trainers = {k: ort_trainer(bundle, args.threads, "portable", k.split("-")[1])
                for k in ("portable-lean", "portable-fast")}
    torch_step = causal_torch_trainer(bundle, trainers["portable-lean"].get_adapter(), args.threads)
    t_in = tuple(torch.from_numpy(x) for x in (ids, mask, labels))
    runs = {**{k: (lambda tr=tr: tr.step(ids, mask, labels)) for k, tr in trainers.items()},
            "torch": lambda: torch_step(*t_in)}
    losses = {k: [] for k in runs}
    for _ in range(2):  # warm-up
        for k, run in runs.items():
            losses[k].append(run())
    ms = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, run in runs.items():
            t = time.perf_counter()
            losses[k].append(run())
            ms[k].append(1000 * (time.perf_counter() - t))
    model_cfg = bundle_config(bundle)
    step_flops = 2 * llama_forward_flops(model_cfg, LM_BATCH, SEQ)
    del trainers, torch_step, runs
    import gc

    gc.collect()
    peak = gemm_peak(args.threads)
    true_peak = max(peak["numpy_gflops"], peak["ort_matmul_gflops"])
    rss = {k: peak_rss(k, bundle_dir, args.threads, args.steps, args.model, full=True) for k in ms}
    med = {k: statistics.median(v) for k, v in ms.items()}
    result = {"model": args.model, "batch": LM_BATCH, "seq": SEQ, "threads": args.threads, "rounds": args.rounds,
              "rss_steps": args.steps, "step_gflop": step_flops / 1e9, "gemm_peak": peak,
              "true_peak_gflops": true_peak, "contenders": {}}
    for k in ms:
        gflops = step_flops / med[k] / 1e6
        result["contenders"][k] = {
            "ms_per_step": med[k], "ms_min": min(ms[k]), "ms_max": max(ms[k]), "gflops": gflops,
            "fraction_of_true_peak": gflops / true_peak, "time_over_torch": med[k] / med["torch"],
            "peak_rss_mb": rss[k]["peak_rss_mb"], "rss_over_torch": rss[k]["peak_rss_mb"] / rss["torch"]["peak_rss_mb"],
            "train_peak_rss_mb": rss[k]["train_peak_rss_mb"],
            "train_rss_over_torch": (rss[k]["train_peak_rss_mb"] / rss["torch"]["train_peak_rss_mb"]
                                     if rss[k]["train_peak_rss_mb"] and rss["torch"]["train_peak_rss_mb"] else None),
            "losses": losses[k]}
    if args.json:
        print(json.dumps(result))
        return
    a = bundle.manifest.adapter
    print(f"{bundle.manifest.base_model} + LoRA r={a.rank} on {','.join(a.target_modules)}, "
          f"B={LM_BATCH} T={SEQ} (bbc-headlines, loss on the headline), {args.threads} thread(s), median of "
          f"{args.rounds} alternating steps; one step = {result['step_gflop']:.1f} GFLOP")
    print(f"  true float32 GEMM peak: numpy {peak['numpy_gflops']:.0f} GFLOP/s, ORT MatMul "
          f"{peak['ort_matmul_gflops']:.0f} GFLOP/s")
    print(f"  first losses: " + ", ".join(f"{k} {v[0]:.4f}" for k, v in losses.items()))
    print(f"  {'':16} {'ms/step':>8} {'GFLOP/s':>8} {'% peak':>7} {'x torch':>8} {'peak RSS':>9} {'x torch':>8} "
          f"{'steps RSS':>10} {'x torch':>8}")
    for k, c in result["contenders"].items():
        tr, tx = c["train_peak_rss_mb"], c["train_rss_over_torch"]
        steps_rss = f"{tr:7.0f} MB" if tr else "?"
        steps_x = f"{tx:.2f}" if tx else "?"
        print(f"  {k:16} {c['ms_per_step']:8.0f} {c['gflops']:8.1f} {100 * c['fraction_of_true_peak']:6.0f}% "
              f"{c['time_over_torch']:8.2f} {c['peak_rss_mb']:7.0f} MB {c['rss_over_torch']:8.2f} "
              f"{steps_rss:>10} {steps_x:>8}")


def bundle_config(bundle) -> dict:
    """The causal model's config, as transformers sees it (a GGUF's is inside the .gguf)."""
    from export.peft_io import causal_source_for
    from transformers import AutoConfig

    source = causal_source_for(bundle.manifest, None)
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    cfg = AutoConfig.from_pretrained(str(source.folder), **kw).to_dict()
    return cfg


if __name__ == "__main__":
    main()
