"""Training-step benchmark: ORT training, the portable step graph and PyTorch eager, same MiniLM-L6 + LoRA.

    python bench/train_step.py [--bundle runs/minilm] [--threads 1] [--rounds 20]

In one process, alternating step by step (so drift in machine load hits all alike): median
ms/step of ORT's training API on the bundle, of the portable step graph (plain onnxruntime API,
IOBinding) and of PyTorch eager with the same trainable
parameters, the same initial values, the same AdamW (betas, eps, no weight decay) and the same
batch (B=8, T=64 real BBC tokens). Then GFLOP/s achieved vs this machine's float32 GEMM rate at
the same thread count, and the peak RSS of a device-only training process (no torch imported)
vs a PyTorch training process, each measured in its own child process.

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


def forward_flops(cfg: dict, batch: int, seq: int, n_labels: int) -> float:
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tokens = batch * seq
    per_layer = 2 * tokens * (4 * h * h + 2 * h * i) + 4 * batch * seq * seq * h
    return layers * per_layer + 2 * batch * (h * h + h * n_labels)


def gemm_gflops(threads: int, n: int = 1024, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def ort_trainer(bundle, threads, backend="ort-training"):
    from device_runtime.trainer import TrainerConfig, make_trainer

    return make_trainer(bundle, TrainerConfig(threads=threads, learning_rate=1e-4), backend)


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


def child(kind: str, bundle_dir: Path, threads: int, steps: int) -> None:
    """Run `steps` training steps and report peak RSS; the ORT child never imports torch."""
    bundle, ids, mask, labels = real_batch(bundle_dir)
    if kind in ("ort", "portable"):
        tr = ort_trainer(bundle, threads, "ort-training" if kind == "ort" else "portable")
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


def vm_hwm_mb() -> float:
    """Peak RSS of this process image. Not getrusage's ru_maxrss: Linux carries that across
    fork+exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(kind: str, bundle_dir: Path, threads: int, steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--bundle", str(bundle_dir),
                          "--threads", str(threads), "--steps", str(steps)],
                         capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


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
    ap.add_argument("--bundle", type=Path, help="MiniLM bundle (default: export one to a temp folder)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10, help="steps per RSS child process")
    ap.add_argument("--child", choices=["ort", "portable", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.bundle, args.threads, args.steps)
        return

    import torch

    bundle_dir = ensure_bundle(args.bundle)
    bundle, ids, mask, labels = real_batch(bundle_dir)
    ort_tr = ort_trainer(bundle, args.threads)
    has_portable = "train_step" in bundle.manifest.files
    port_tr = ort_trainer(bundle, args.threads, "portable") if has_portable else None
    torch_step = torch_trainer(bundle, ort_tr.get_adapter(), args.threads)
    t_in = tuple(torch.from_numpy(x) for x in (ids, mask, labels))
    for _ in range(3):  # warm-up: ORT allocates its arena, torch its autograd buffers
        ort_tr.step(ids, mask, labels)
        if port_tr:
            port_tr.step(ids, mask, labels)
        torch_step(*t_in)
    ort_ms, port_ms, torch_ms = [], [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        ort_tr.step(ids, mask, labels)
        ort_ms.append(1000 * (time.perf_counter() - t))
        if port_tr:
            t = time.perf_counter()
            port_tr.step(ids, mask, labels)
            port_ms.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        torch_step(*t_in)
        torch_ms.append(1000 * (time.perf_counter() - t))
    from export.model_source import resolve_model

    model_cfg = json.loads((resolve_model(bundle.manifest.extra.get("model_spec", "minilm-l6")).path / "config.json").read_text())
    step_flops = 2 * forward_flops(model_cfg, BATCH, SEQ, len(bundle.manifest.labels))
    gemm = gemm_gflops(args.threads)
    ort_med, torch_med = statistics.median(ort_ms), statistics.median(torch_ms)
    rss_ort = peak_rss("ort", bundle_dir, args.threads, args.steps)
    rss_port = peak_rss("portable", bundle_dir, args.threads, args.steps) if port_tr else None
    rss_torch = peak_rss("torch", bundle_dir, args.threads, args.steps)
    port_med = statistics.median(port_ms) if port_ms else None
    result = {
        "batch": BATCH, "seq": SEQ, "threads": args.threads, "rounds": args.rounds,
        "ort_ms_per_step": ort_med, "torch_ms_per_step": torch_med, "time_ratio_ort_over_torch": ort_med / torch_med,
        "step_gflop": step_flops / 1e9,
        "ort_gflops": step_flops / ort_med / 1e6, "torch_gflops": step_flops / torch_med / 1e6,
        "gemm_peak_gflops": gemm,
        "ort_fraction_of_gemm_peak": step_flops / ort_med / 1e6 / gemm,
        "peak_rss_mb_device_ort": rss_ort, "peak_rss_mb_torch": rss_torch, "rss_ratio_ort_over_torch": rss_ort / rss_torch,
        "portable_ms_per_step": port_med,
        "time_ratio_portable_over_torch": port_med / torch_med if port_med else None,
        "portable_gflops": step_flops / port_med / 1e6 if port_med else None,
        "peak_rss_mb_device_portable": rss_port,
        "rss_ratio_portable_over_torch": rss_port / rss_torch if rss_port else None,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"MiniLM-L6 + LoRA r={bundle.manifest.adapter.rank}, B={BATCH} T={SEQ}, {args.threads} thread(s), "
          f"median of {args.rounds} alternating steps")
    print(f"  ORT training  {ort_med:8.1f} ms/step  {result['ort_gflops']:6.1f} GFLOP/s")
    if port_med:
        print(f"  portable      {port_med:8.1f} ms/step  {result['portable_gflops']:6.1f} GFLOP/s  (plain onnxruntime graph)")
    print(f"  torch eager   {torch_med:8.1f} ms/step  {result['torch_gflops']:6.1f} GFLOP/s")
    print(f"  time ratio ORT/torch = {result['time_ratio_ort_over_torch']:.2f}  (target <= 0.70)")
    if port_med:
        print(f"  time ratio portable/torch = {result['time_ratio_portable_over_torch']:.2f}  (target <= 0.70)")
    print(f"  step = {result['step_gflop']:.2f} GFLOP; float32 GEMM peak here = {gemm:.1f} GFLOP/s; "
          f"ORT reaches {100 * result['ort_fraction_of_gemm_peak']:.0f}% of it")
    print(f"  peak RSS: device (ORT, no torch) {rss_ort:.0f} MB vs torch {rss_torch:.0f} MB, "
          f"ratio {result['rss_ratio_ort_over_torch']:.2f}  (target <= 0.50)")
    if rss_port:
        print(f"  peak RSS: device (portable, no torch) {rss_port:.0f} MB, ratio {result['rss_ratio_portable_over_torch']:.2f}")


if __name__ == "__main__":
    main()
