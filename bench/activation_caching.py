"""Activation caching: peak host memory at two token counts (it must not grow with the
number of tokens: shards are streamed to disk) and throughput next to the model's bare
forward pass to the hook. Needs the default pipeline's base model and tokens (`dvc repro`).

    python bench/activation_caching.py [--tokens 100000 400000] [--params params.yaml]

The device and precision are the params' `compute` settings (the stage's own). Each
measurement runs in a fresh process (peak RSS is per process); on a GPU the peak GPU
memory is read too. Prints the figures, the memory growth between the smallest and largest
token count and caching's share of the bare forward throughput, and writes them as JSON
(--out).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import stagediff  # noqa: F401  (offline / no-telemetry environment)


def child(max_tokens: int, mode: str, params: str) -> dict:
    import torch

    from stagediff.compute import autocast, device, place, setup_process
    from stagediff.config import load_config
    from stagediff.data.tokens import load_tokenizer, load_tokens
    from stagediff.dictionaries.cache import build_cache, hook_activations, plan_windows
    from stagediff.layout import MODEL_DIRS
    from stagediff.models.lm import load_model

    cfg = load_config(params)
    cfg = cfg.model_copy(update={"activations": cfg.activations.model_copy(update={"max_tokens": max_tokens})})
    setup_process(cfg)
    tokenizer = load_tokenizer()
    stream = load_tokens("base")
    on = device(cfg.compute)
    model = place(load_model(MODEL_DIRS["base"], tokenizer), on)
    model.eval()
    if on.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    # Both modes count the same tokens: every window's own positions (caching then drops
    # special and outlier positions; `kept` says how many it wrote).
    plan = plan_windows(stream["sample_ids"], cfg.model.n_ctx, cfg.activations.eval_windows, max_tokens, cfg.seed,
                        "base")
    idx = torch.cat([plan["train"], plan["eval"]])
    tokens, kept = int(plan["own"][idx].sum()), None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "cache":
        with tempfile.TemporaryDirectory() as tmp:
            manifest = build_cache(model, tokenizer, stream, cfg, "base", "base", Path(tmp))
        kept = manifest["n_tokens"] + manifest["n_eval_tokens"]
    else:  # the bare forward pass over the same windows, results discarded
        with torch.no_grad(), autocast(cfg.compute, on):
            for b in range(0, len(idx), cfg.activations.batch_size):
                pos = plan["starts"][idx[b : b + cfg.activations.batch_size]].unsqueeze(1) + torch.arange(cfg.model.n_ctx)
                hook_activations(model, stream["tokens"][pos].long().to(on), cfg.activations.hook)
    if on.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"mode": mode, "max_tokens": max_tokens, "tokens": tokens, "tokens_cached": kept, "seconds": seconds,
           "device": str(on),
           "precision": cfg.compute.precision, "tokens_per_s": tokens / seconds,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss_before / 1024}
    if on.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[100_000, 400_000])
    p.add_argument("--out", default="bench/results/activation_caching_cpu.json")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--child", nargs=2, metavar=("MAX_TOKENS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.params)))
        return
    rows = []
    for n in args.tokens:
        for mode in ("cache", "forward"):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), mode, "--params", args.params],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{mode:8s} {r['tokens']:>9,d} tokens  {r['tokens_per_s']:>9,.0f} tok/s  "
                  f"peak RSS {r['peak_rss_mb']:,.0f} MB (after loading {r['rss_before_mb']:,.0f} MB)")
    cache = sorted((r for r in rows if r["mode"] == "cache"), key=lambda r: r["tokens"])
    forward = {r["max_tokens"]: r for r in rows if r["mode"] == "forward"}
    summary = {"tokens_growth": cache[-1]["tokens"] / cache[0]["tokens"],
               "peak_rss_growth": cache[-1]["peak_rss_mb"] / cache[0]["peak_rss_mb"],
               "cache_over_forward": {str(r["max_tokens"]): r["tokens_per_s"] / forward[r["max_tokens"]]["tokens_per_s"]
                                      for r in cache}}
    if "gpu_peak_mb" in cache[0]:
        summary["gpu_peak_growth"] = cache[-1]["gpu_peak_mb"] / cache[0]["gpu_peak_mb"]
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
