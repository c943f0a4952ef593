"""What every Lightning training stage shares: the LR schedule, the Trainer, resumable
checkpoints and determinism. One place, so the model and SAE stages behave alike."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from tqdm import tqdm

from stagediff.compute import setup_process, trainer_kwargs
from stagediff.config import Config
from stagediff.io import file_digest
from stagediff.layout import CHECKPOINT_ROOT, tokens_file
from stagediff.sections import ComputeConfig, TrainConfig

# Lightning's console chatter (accelerator summary, cloud-service tips, "fit stopped") and a
# deprecation warning torch raises inside Lightning's own code: the stage shows one progress
# bar per training run instead (StepProgress); warnings and errors still print.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")


class StepProgress(Callback):
    """One progress bar per training run, in optimiser steps (Lightning's own bar counts
    epochs of a stream that has none), with the last logged training loss."""

    def __init__(self, desc: str, total: int):
        self.desc, self.total, self.bar = desc, total, None

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            if trainer.world_size > 1:
                backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
                print(f"{self.desc}: {trainer.world_size} processes ({trainer.strategy.__class__.__name__}, "
                      f"{backend})", file=sys.stderr, flush=True)
            self.bar = tqdm(total=self.total, initial=trainer.global_step, desc=self.desc, unit="step",
                            mininterval=1.0, dynamic_ncols=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.bar is not None:
            self.bar.update(trainer.global_step - self.bar.n)
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None and trainer.global_step % trainer.log_every_n_steps == 0:
                self.bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer, pl_module, exception):
        self.on_train_end(trainer, pl_module)  # the error message starts on a line of its own


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


def setup_training(cfg: Config) -> None:
    """Threads, precision and seeds of a training stage (Lightning's own seeding too)."""
    setup_process(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)


def data_fingerprint(*splits: str) -> dict:
    """Content hashes of the token files a training run reads (for safe resumes)."""
    return {s: file_digest(tokens_file(s)) for s in splits}


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
    ckpt_dir = checkpoint_dir(ckpt_name, fingerprint)
    last = ckpt_dir / "last.ckpt"
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="latest", every_n_train_steps=train.val_every,
                                 save_top_k=1, save_last=True, enable_version_counter=False),
                 StepProgress(f"{ckpt_name}: training", train.max_steps), *callbacks]
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
        enable_progress_bar=False,
        log_every_n_steps=10,
        default_root_dir=str(ckpt_dir),
    )
    if last.is_file():
        print(f"{ckpt_name}: resuming from {last} (a run with these settings was interrupted)", file=sys.stderr,
              flush=True)
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
