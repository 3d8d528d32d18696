"""`tomtit generate`: greedy text generation on the device with a causal-LM bundle (no torch);
uses the bundle's KV-cache graph when it has one."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--adapter", type=Path, help="adapter safetensors (default: the bundle's initial adapter)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-kv-cache", action="store_true",
                   help="re-run the whole sequence for every token even if the bundle has a KV-cache graph")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.add_argument("prompt", nargs="+", metavar="PROMPT", help="the prompt (words are joined with spaces)")


def run(args: argparse.Namespace) -> int:
    from device_runtime.adapter import load_adapter
    from device_runtime.bundle import open_bundle
    from device_runtime.generation import GenerationStats, Generator, generation_roles
    from tomtit.cli import CliError

    if args.max_new_tokens < 1 or args.threads < 1:
        raise CliError("--max-new-tokens and --threads must be >= 1")
    bundle = open_bundle(args.bundle, roles=())
    kv = False if args.no_kv_cache else None  # None: the cache when the bundle has it
    bundle = open_bundle(args.bundle, roles=generation_roles(bundle.manifest, kv))
    adapter = load_adapter(args.adapter or bundle.path("initial_adapter"), bundle.manifest)
    gen = Generator(bundle, threads=args.threads, kv_cache=kv)
    prompt = " ".join(args.prompt)
    stats = GenerationStats()
    pieces = []
    for piece in gen.stream(prompt, adapter, max_new_tokens=args.max_new_tokens, stats=stats):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"prompt": prompt, "text": "".join(pieces), "prompt_tokens": stats.prompt_tokens,
                          "new_tokens": stats.new_tokens, "ms_per_token": stats.ms_per_token,
                          "kv_cache": stats.kv_cache, "prefill_ms": stats.prefill_ms,
                          "decode_ms_per_token": stats.decode_ms_per_token, "prompt_cut_tokens": stats.prompt_cut,
                          "hit_max_length": stats.hit_max_length}))
    else:
        print()
    note = stats.truncation_note(bundle.manifest.max_length)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if not args.json:
        how = ("KV cache" if stats.kv_cache else
               "no KV cache: every token re-runs the whole sequence; re-export the bundle for one")
        print(f"[{stats.new_tokens} tokens, prompt {stats.prompt_tokens} tokens: prefill {stats.prefill_ms:.1f} ms, "
              f"decode {stats.decode_ms_per_token:.1f} ms/token ({len(stats.decode_ms)} steps); {how}]", file=sys.stderr)
    return 0
