"""SAE training throughput: the stagediff stage trainer (Lightning around a sae_lens
training SAE) next to sae_lens's own `SAETrainer`, on the same activations, architecture,
width and batch, in the same process; plus the bare sae_lens step (forward, backward,
Adam) as the floor both trainers sit on.

    python bench/sae_throughput.py                      # the default cache, CPU default size
    python bench/sae_throughput.py --synthetic --d-in 768 --d-sae 24576 --batch 4096

Prints the figures and the configuration, and writes them as JSON (--out).
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


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="data/activations/base-base", help="activation cache to train on")
    p.add_argument("--synthetic", action="store_true", help="use random activations instead of a cache")
    p.add_argument("--d-in", type=int, default=128, help="with --synthetic")
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--architecture", default="topk", choices=["standard", "topk", "batchtopk"])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/sae_throughput_cpu.json")
    return p.parse_args()


def sae_cfg(args):
    from stagediff.config import SAEConfig

    return SAEConfig(architecture=args.architecture, d_sae=args.d_sae, k=args.k, l1_coefficient=5.0,
                     l1_warm_up_steps=0, aux_loss_coefficient=1.0, decoder_init_norm=0.1, dead_feature_window=100)


def train_cfg(args):
    from stagediff.config import TrainConfig

    return TrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch, lr=1e-3, warmup_steps=5,
                       min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, val_every=10**9, val_batches=1)


def stagediff_trainer(cache, args) -> float:
    """Tokens/s of the stage trainer over the timed steps (Lightning fit, no MLflow)."""
    from lightning.pytorch.callbacks import Callback

    from stagediff.sae import ActivationDataModule, SAEModule, build_sae
    from stagediff.training import fit

    marks = {}

    class Clock(Callback):
        def on_train_batch_start(self, trainer, *a):
            if trainer.global_step == args.warmup:
                marks["start"] = time.perf_counter()

        def on_train_end(self, trainer, *a):
            marks["end"] = time.perf_counter()

    torch.manual_seed(0)
    module = SAEModule(build_sae(sae_cfg(args), cache.d_in), train_cfg(args), 100)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            fit(module, ActivationDataModule(cache, args.batch, 0), train_cfg(args), None, "bench", {},
                callbacks=(Clock(),))
        finally:
            os.chdir(cwd)
    return args.steps * args.batch / (marks["end"] - marks["start"])


def sae_lens_trainer(cache, args) -> float:
    """Tokens/s of sae_lens's SAETrainer fed the same batches."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from stagediff.sae import ShardBatches, build_sae

    marks, total = {}, args.warmup + args.steps

    def provider():
        for i, batch in enumerate(ShardBatches(cache, args.batch, 0, lambda: 0)):
            if i == args.warmup:
                marks["start"] = time.perf_counter()
            if i == total:
                marks["end"] = time.perf_counter()
            yield batch

    torch.manual_seed(0)
    sae = build_sae(sae_cfg(args), cache.d_in)
    cfg = SAETrainerConfig(total_training_samples=(total + 1) * args.batch, train_batch_size_samples=args.batch,
                           lr=1e-3, lr_end=1e-4, lr_warm_up_steps=5, lr_scheduler_name="cosineannealing", lr_decay_steps=total,
                           dead_feature_window=100, logger=LoggingConfig(log_to_wandb=False))
    SAETrainer(cfg, sae, provider()).fit()
    return args.steps * args.batch / (marks["end"] - marks["start"])


def bare_step(cache, args) -> float:
    """Tokens/s of the sae_lens loss + backward + Adam alone, on one resident batch."""
    from sae_lens.saes.sae import TrainStepInput

    from stagediff.sae import ShardBatches, build_sae

    torch.manual_seed(0)
    sae = build_sae(sae_cfg(args), cache.d_in)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = next(iter(ShardBatches(cache, args.batch, 0, lambda: 0)))
    coeff = {"l1": 5.0} if args.architecture == "standard" else {}
    dead = torch.zeros(args.d_sae, dtype=torch.bool)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            start = time.perf_counter()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coeff, dead_neuron_mask=dead,
                                                       n_training_steps=i, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return args.steps * args.batch / (time.perf_counter() - start)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from stagediff.activations import ActivationCache, write_tensor_cache

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            n = args.batch * 8
            write_tensor_cache(Path(tmp) / "c", torch.randn(n, args.d_in), torch.randn(args.batch, args.d_in),
                               shard_tokens=n // 2)
            cache = ActivationCache(Path(tmp) / "c")
        else:
            cache = ActivationCache(Path(args.cache).resolve())
        args.d_in = cache.d_in
        result = {
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "tokens_per_s": {
                "bare_sae_lens_step": bare_step(cache, args),
                "stagediff_trainer": stagediff_trainer(cache, args),
                "sae_lens_trainer": sae_lens_trainer(cache, args),
            },
        }
    tps = result["tokens_per_s"]
    result["stagediff_over_sae_lens"] = tps["stagediff_trainer"] / tps["sae_lens_trainer"]
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
