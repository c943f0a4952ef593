"""SAE training throughput: the stagediff stage trainer (Lightning around a sae_lens
training SAE) next to sae_lens's own `SAETrainer`, on the same activations, architecture,
width and batch, in the same process; plus the bare sae_lens step (forward, backward,
Adam) as the floor both trainers sit on, the device's measured dense matmul throughput,
and the achieved FLOP/s as a fraction of it.

    python bench/sae_throughput.py                      # the default cache, CPU default size
    python bench/sae_throughput.py --synthetic --d-in 768 --d-sae 24576 --batch 4096 \
        --device cuda --precision bf16-mixed --compile --out bench/results/sae_throughput_h100.json
    python bench/sae_throughput.py --synthetic --d-in 4096 --d-sae 262144 --batch 4096 \
        --device cuda --precision bf16-mixed --trainers stagediff   # the paper's dictionary size

Both trainers get batches already on the device and the same precision (sae_lens's
`autocast` flag for bf16-mixed). Prints the figures and the configuration, and writes them
as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import stagediff  # noqa: F401  (offline / no-telemetry environment)

TRAINERS = ("bare", "stagediff", "sae_lens")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="data/activations/base-base", help="activation cache to train on")
    p.add_argument("--synthetic", action="store_true", help="use random activations instead of a cache")
    p.add_argument("--d-in", type=int, default=128, help="with --synthetic")
    p.add_argument("--tokens", type=int, help="with --synthetic: activations in the cache (default 8 batches), "
                   "in shards of 4 batches; training memory should not grow with it")
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--architecture", default="topk", choices=["standard", "topk", "batchtopk"])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--compile", action="store_true", help="torch.compile the SAE (stagediff trainer and bare step)")
    p.add_argument("--sparse-decode", action="store_true", help="topk: sae_lens's sparse activations")
    p.add_argument("--deterministic", default=None, choices=["true", "false"],
                   help="stagediff trainer's deterministic=True (default: true on the CPU, false on a GPU)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated subset of {','.join(TRAINERS)}")
    p.add_argument("--out", default="bench/results/sae_throughput_cpu.json")
    return p.parse_args()


def compute_cfg(args):
    from stagediff.sections import ComputeConfig

    return ComputeConfig(accelerator=args.device, devices=1, strategy="auto", precision=args.precision,
                         compile=args.compile, matmul_precision="high", deterministic=deterministic(args))


def deterministic(args) -> bool:
    return args.device == "cpu" if args.deterministic is None else args.deterministic == "true"


def synchronize(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(args) -> float:
    """Dense matmul FLOP/s of the device at the training precision (bf16 for bf16-mixed)."""
    n = 8192 if args.device == "cuda" else 1024
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(args)
    reps = 50 if args.device == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(args)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def step_flops(args) -> int:
    """Dense-equivalent FLOPs of one SAE training step: encoder and decoder matmuls
    (2·B·d_in·d_sae each) forward, and twice that backward (sae_lens subtracts b_dec from
    the input, so the encoder's input gradient is computed too). Sparse decoding does less."""
    return 3 * 2 * (2 * args.batch * args.d_in * args.d_sae)


def sae_cfg(args):
    from stagediff.sections import SAEConfig

    return SAEConfig(architecture=args.architecture, d_sae=args.d_sae, k=args.k, l1_coefficient=5.0,
                     l1_warm_up_steps=0, aux_loss_coefficient=1.0, decoder_init_norm=0.1, dead_feature_window=100,
                     sparse_decode=args.sparse_decode)


def train_cfg(args):
    from stagediff.sections import TrainConfig

    return TrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch, lr=1e-3, warmup_steps=5,
                       min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, val_every=10**9, val_batches=1)


def stagediff_trainer(cache, args) -> float:
    """Tokens/s of the stage trainer over the timed steps (Lightning fit, no MLflow)."""
    from lightning.pytorch.callbacks import Callback

    from stagediff.dictionaries.sae import build_sae
    from stagediff.dictionaries.sae_training import ActivationDataModule, SAEModule
    from stagediff.training import fit

    marks = {}

    class Clock(Callback):
        def on_train_batch_start(self, trainer, *a):
            if trainer.global_step == args.warmup:
                synchronize(args)
                marks["start"] = time.perf_counter()

        def on_train_end(self, trainer, *a):
            synchronize(args)
            marks["end"] = time.perf_counter()

    torch.manual_seed(0)
    module = SAEModule(build_sae(sae_cfg(args), cache.d_in), train_cfg(args), 100, compile=args.compile)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            fit(module, ActivationDataModule(cache, args.batch, 0), train_cfg(args), compute_cfg(args), None, "bench",
                {}, callbacks=(Clock(),))
        finally:
            os.chdir(cwd)
            torch.use_deterministic_algorithms(False)  # Lightning sets it process-wide; the next runner starts clean
    return args.steps * args.batch / (marks["end"] - marks["start"])


def resident_batches(cache, args):
    """The stage trainer's batches, precomputed on the device (so neither trainer is timed
    reading shards)."""
    from stagediff.dictionaries.sae_training import ShardBatches

    batches = ShardBatches(cache, args.batch, 0, lambda: 0, device=args.device)
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) == min(args.warmup + args.steps + 1, 64):
            return out


def sae_lens_trainer(cache, args) -> float:
    """Tokens/s of sae_lens's SAETrainer fed the same batches, already on the device."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from stagediff.dictionaries.sae import build_sae

    marks, total = {}, args.warmup + args.steps
    resident = resident_batches(cache, args)

    def provider():
        i = 0
        while True:
            if i == args.warmup:
                synchronize(args)
                marks["start"] = time.perf_counter()
            if i == total:
                synchronize(args)
                marks["end"] = time.perf_counter()
            yield resident[i % len(resident)]
            i += 1

    torch.manual_seed(0)
    sae = build_sae(sae_cfg(args), cache.d_in)
    if args.compile:  # the same compiled encoder/decoder as the other runners
        from stagediff.compute import compile_sae

        compile_sae(sae)
    cfg = SAETrainerConfig(total_training_samples=(total + 1) * args.batch, train_batch_size_samples=args.batch,
                           lr=1e-3, lr_end=1e-4, lr_warm_up_steps=5, lr_scheduler_name="cosineannealing",
                           lr_decay_steps=total, dead_feature_window=100, device=args.device,
                           autocast=args.precision == "bf16-mixed", logger=LoggingConfig(log_to_wandb=False))
    SAETrainer(cfg, sae, provider()).fit()
    return args.steps * args.batch / (marks["end"] - marks["start"])


def bare_step(cache, args) -> float:
    """Tokens/s of the sae_lens loss + backward + Adam alone, on one resident batch."""
    from sae_lens.saes.sae import TrainStepInput

    from stagediff.compute import AUTOCAST_DTYPES, compile_sae
    from stagediff.dictionaries.sae import build_sae

    torch.manual_seed(0)
    sae = build_sae(sae_cfg(args), cache.d_in).to(args.device)
    if args.compile:
        compile_sae(sae)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = resident_batches(cache, args)[0]
    coeff = {"l1": 5.0} if args.architecture == "standard" else {}
    dead = torch.zeros(args.d_sae, dtype=torch.bool, device=args.device)
    dtype = AUTOCAST_DTYPES.get(args.precision)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            synchronize(args)
            start = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coeff, dead_neuron_mask=dead,
                                                           n_training_steps=i, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    synchronize(args)
    return args.steps * args.batch / (time.perf_counter() - start)


class RSSPeak:
    """Peak resident memory of this process while a block runs (sampled every 20 ms from
    /proc; ru_maxrss would carry the peak of earlier blocks)."""

    def __enter__(self):
        import threading

        self.peak, self.stop = rss_bytes(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name, fn, cache, args) -> dict:
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with RSSPeak() as rss:
        tokens_per_s = fn(cache, args)
    out = {"tokens_per_s": tokens_per_s, "host_peak_rss_gb": rss.peak / 1e9}
    if args.device == "cuda":
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(f"{name}: {tokens_per_s:,.0f} tokens/s", flush=True)
    return out


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    from stagediff.dictionaries.cache import ActivationCache, write_tensor_cache

    chosen = [t for t in args.trainers.split(",") if t]
    unknown = set(chosen) - set(TRAINERS)
    if unknown:
        raise SystemExit(f"--trainers: unknown {sorted(unknown)}; expected some of {', '.join(TRAINERS)}")
    runners = {"bare": bare_step, "stagediff": stagediff_trainer, "sae_lens": sae_lens_trainer}
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            n = args.tokens or args.batch * 8
            write_tensor_cache(Path(tmp) / "c", torch.randn(n, args.d_in, dtype=torch.float16),
                               torch.randn(args.batch, args.d_in), shard_tokens=args.batch * 4, dtype="float16")
            cache = ActivationCache(Path(tmp) / "c")
        else:
            cache = ActivationCache(Path(args.cache).resolve())
        args.d_in = cache.d_in
        peak = matmul_peak(args)
        results = {name: measure(name, runners[name], cache, args) for name in chosen}
    flops = step_flops(args) / args.batch
    for r in results.values():
        r["achieved_dense_equivalent_tflops"] = r["tokens_per_s"] * flops / 1e12
        r["fraction_of_matmul_peak"] = r["tokens_per_s"] * flops / peak
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"device": torch.cuda.get_device_name() if args.device == "cuda" else
                    (platform.processor() or platform.machine()),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "matmul_peak_tflops": peak / 1e12,
        "cache": {"tokens": sum(cache.shard_sizes), "shards": len(cache.shard_sizes)},
        "trainers": results,
    }
    if "stagediff" in results and "sae_lens" in results:
        result["stagediff_over_sae_lens"] = results["stagediff"]["tokens_per_s"] / results["sae_lens"]["tokens_per_s"]
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
