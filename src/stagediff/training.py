"""What every Lightning training stage shares: the LR schedule, the Trainer, resumable
checkpoints and determinism. One place, so the model and SAE stages behave alike."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from stagediff.config import ComputeConfig, Config, TrainConfig

CHECKPOINT_ROOT = Path("checkpoints")


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def adamw_with_schedule(params, train: TrainConfig, betas=(0.9, 0.95)):
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(train.warmup_steps, train.max_steps, train.min_lr_ratio)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def setup_determinism(cfg: Config) -> None:
    import lightning as L

    from stagediff.compute import apply_matmul_precision

    torch.set_num_threads(cfg.threads)
    os.environ["OMP_NUM_THREADS"] = str(cfg.threads)  # so Lightning's DDP launcher keeps it for every rank
    apply_matmul_precision(cfg.compute)
    L.seed_everything(cfg.seed, workers=True, verbose=False)


def checkpoint_dir(name: str, fingerprint: dict) -> Path:
    """A resumable checkpoint folder for one training run of one configuration:
    `checkpoints/<name>/<hash of settings and inputs>`. Folders left by runs with other
    settings are discarded, so a resume never mixes configurations."""
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = CHECKPOINT_ROOT / name
    if root.exists():
        for other in root.iterdir():
            if other.name != key:
                shutil.rmtree(other) if other.is_dir() else other.unlink()
    path = root / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def fit(module, datamodule, train: TrainConfig, compute: ComputeConfig, run, ckpt_name: str, fingerprint: dict,
        prefix: str = "", callbacks: tuple = ()):
    """Train with Lightning on the `compute` settings; resume from
    `checkpoints/<ckpt_name>/last.ckpt` if a killed run left one.

    With several processes (DDP), Lightning relaunches the stage's command for every
    other rank; those processes end here after training, so only rank 0 evaluates and
    writes the stage's outputs. The trained module is back on the CPU when this returns."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from stagediff.compute import trainer_kwargs

    ckpt_dir = checkpoint_dir(ckpt_name, fingerprint)
    last = ckpt_dir / "last.ckpt"
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="latest", every_n_train_steps=train.val_every,
                                 save_top_k=1, save_last=True, enable_version_counter=False), *callbacks]
    if run is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = L.Trainer(
        **trainer_kwargs(compute),
        max_steps=train.max_steps,
        val_check_interval=train.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=train.val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=train.grad_clip,
        logger=run.lightning_logger(prefix=prefix) if run is not None else False,
        callbacks=callbacks,
        enable_model_summary=False,
        log_every_n_steps=10,
        default_root_dir=str(ckpt_dir),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # every rank leaves cleanly before rank 0 evaluates
    if trainer.global_rank != 0:
        raise SystemExit(0)
    module.cpu()  # Lightning's teardown does this for one device; evaluation code expects it
    return trainer


def finish_checkpoints(ckpt_name: str) -> None:
    """Drop a finished run's checkpoints (the stage output is the result)."""
    shutil.rmtree(CHECKPOINT_ROOT / ckpt_name, ignore_errors=True)
