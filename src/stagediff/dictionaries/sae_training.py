"""Training a sae_lens SAE with Lightning.

- `ActivationDataModule` streams a cache's shards; the batch of step t is a fixed function
  of (seed, t), so a run resumed from a checkpoint sees the batches it would have seen.
- `SAEModule` is the LightningModule: the SAE's own `training_forward_pass` loss,
  dead-latent tracking (fed to the TopK auxiliary loss), sae_lens's coefficient warm-up,
  Adam with warm-up and decay, MLflow metrics.

SAEs train on activations multiplied by their cache's scaling factor (sqrt(d_in) / mean
norm), as SAELens does; `sae.save_sae` folds the factor into the saved inference weights.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput
from sae_lens.training.optim import CoefficientScheduler
from torch.utils.data import DataLoader, IterableDataset

from stagediff.compute import compile_sae, fail_if_not_finite, rank_share, uncompile_sae
from stagediff.dictionaries.cache import ActivationCache
from stagediff.errors import DataError
from stagediff.sections import TrainConfig
from stagediff.training import adamw_with_schedule

ADAM_BETAS = (0.9, 0.999)  # sae_lens's defaults


# --- data ------------------------------------------------------------------------------------

class ShardBatches(IterableDataset):
    """Normalised activation batches for steps start_step(), start_step()+1, ... forever.

    Each epoch visits the shards in a seeded order and each shard's rows in a seeded
    order; only one shard is in memory at a time, normalised once and held on `device`, so
    a step is one gather there (no per-row collation, no host-to-device copy). With
    several processes, rank r of w takes the r-th of w equal parts of every global batch."""

    def __init__(self, cache: ActivationCache, batch_size: int, seed: int, start_step: Callable[[], int],
                 device: torch.device | str = "cpu", rank: int = 0, world: int = 1):
        self.cache, self.batch_size, self.seed, self.start_step = cache, batch_size, seed, start_step
        self.device, self.rank, self.world = torch.device(device), rank, world
        self.batches_per_shard = [n // batch_size for n in cache.shard_sizes]
        self.per_epoch = sum(self.batches_per_shard)
        if self.per_epoch == 0:
            raise DataError(f"{cache.path}: no shard holds a full batch of {batch_size} activations "
                            f"(shards of {max(cache.shard_sizes)}); lower the batch size or cache more tokens")

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, shard, batch within shard) of a global step."""
        epoch, k = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.batches_per_shard), generator=torch.Generator().manual_seed(self.seed + epoch))
        for shard in order.tolist():
            if k < self.batches_per_shard[shard]:
                return epoch, shard, k
            k -= self.batches_per_shard[shard]
        raise AssertionError("unreachable")

    def __iter__(self):
        step = self.start_step()
        loaded, acts, rows = None, None, None
        scale = self.cache.scaling_factor
        while True:
            epoch, shard, k = self.locate(step)
            if loaded != (epoch, shard):
                acts = None  # free the previous shard before the next is read
                acts = self.cache.shard(shard)["acts"].to(self.device).float() * scale
                gen = torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + epoch * 10_007 + shard)
                rows = torch.randperm(len(acts), generator=gen).to(self.device)
                loaded = (epoch, shard)
            global_rows = rows[k * self.batch_size : (k + 1) * self.batch_size]
            yield acts[rank_share(global_rows, self.rank, self.world)]
            step += 1


class ActivationDataModule(L.LightningDataModule):
    """Training batches streamed from a cache's shards; validation on its held-out set."""

    def __init__(self, cache: ActivationCache, batch_size: int, seed: int):
        super().__init__()
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.val_acts = cache.eval_set()["acts"].float() * cache.scaling_factor

    def train_dataloader(self):
        trainer = self.trainer

        def start_step() -> int:
            return trainer.global_step if trainer is not None else 0

        where = {} if trainer is None else {"device": trainer.strategy.root_device, "rank": trainer.global_rank,
                                            "world": trainer.world_size}
        return DataLoader(ShardBatches(self.cache, self.batch_size, self.seed, start_step, **where), batch_size=None)

    def val_dataloader(self):
        return DataLoader(list(torch.split(self.val_acts, self.batch_size)), batch_size=None)


# --- training --------------------------------------------------------------------------------

class SAEModule(L.LightningModule):
    """Trains a sae_lens training SAE with its own loss."""

    def __init__(self, sae, train: TrainConfig, dead_feature_window: int, fine_tune: bool = False,
                 compile: bool = False):
        """`fine_tune`: the SAE continues a parent's training, so loss coefficients (L1)
        start at their final value instead of warming up from zero again. `compile`:
        torch.compile the encoder and decoder for the run (see `compute.compile_sae`)."""
        super().__init__()
        self.sae, self.train_cfg, self.dead_feature_window = sae, train, dead_feature_window
        self.compile = compile
        # An integer buffer: mixed precision may cast float buffers to bf16, where counting stalls at 256.
        self.register_buffer("steps_since_fired", torch.zeros(sae.cfg.d_sae, dtype=torch.long))
        self.coefficients = {}
        for name, coeff in sae.get_coefficients().items():
            if not isinstance(coeff, TrainCoefficientConfig):
                coeff = TrainCoefficientConfig(value=coeff, warm_up_steps=0)
            warm_up = 0 if fine_tune else coeff.warm_up_steps
            self.coefficients[name] = CoefficientScheduler(warm_up_steps=warm_up, final_value=coeff.value)

    def dead_mask(self) -> torch.Tensor:
        """Latents silent for more than the window (sae_lens's rule; drives the aux loss)."""
        return self.steps_since_fired > self.dead_feature_window

    def silent_mask(self) -> torch.Tensor:
        """Latents silent over the last window, or the whole run when it was shorter:
        the dead features to report at the end of a stage."""
        return self.steps_since_fired >= min(self.dead_feature_window, max(int(self.global_step), 1))

    def training_step(self, batch, batch_idx):
        out = self.sae.training_forward_pass(TrainStepInput(
            sae_in=batch, coefficients={n: s.value for n, s in self.coefficients.items()},
            dead_neuron_mask=self.dead_mask(), n_training_steps=self.global_step, is_logging_step=False))
        step = self.global_step + 1  # Lightning writes logs when this is a multiple of log_every_n_steps
        last = step == self.train_cfg.max_steps
        # Reading a value back from the device stalls a GPU, so the finite-loss check and the
        # logged values wait for the steps whose logs are written (step 0 is checked).
        written = step % self.trainer.log_every_n_steps == 0 or last
        if written or self.global_step == 0:
            fail_if_not_finite(out.loss, self.trainer, "SAE", "lower the learning rate or check the activations")
        with torch.no_grad():
            fired, l0 = firing(out.feature_acts)
            if self.trainer.world_size > 1:  # a latent fired if it fired on any rank's share
                counts = fired.to(torch.int32)
                torch.distributed.all_reduce(counts)  # no barrier: Lightning's reduce() would add one per step
                fired = counts > 0
            self.steps_since_fired.add_(1).mul_(~fired)  # reset where fired, without a device sync
            if written:
                details = {"train/loss": out.loss, **{f"train/{k}": v for k, v in out.losses.items()}}
                details.update({"train/explained_variance": explained_variance(batch, out.sae_out),
                                "train/l0": l0,
                                "train/dead_fraction": self.dead_mask().float().mean()})
                # (with several ranks: the mean over ranks, i.e. over the global batch)
                self.log_dict(details, prog_bar=True, sync_dist=self.trainer.world_size > 1)
                if last:
                    self.final_keys = list(details)
        return out.loss

    def on_fit_start(self):
        if self.compile:
            compile_sae(self.sae)

    def on_fit_end(self):
        uncompile_sae(self.sae)

    def on_train_end(self):
        # A run shorter than Lightning's logging interval would leave no curve at all.
        if self.logger is not None and getattr(self, "final_keys", None):
            logged = self.trainer.callback_metrics  # as logged: averaged over ranks under DDP
            self.logger.log_metrics({k: float(logged[k]) for k in self.final_keys}, step=self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        for scheduler in self.coefficients.values():
            scheduler.step()

    def validation_step(self, batch, batch_idx):
        recon = self.sae(batch)
        self.log_dict({"val/mse": (recon - batch).pow(2).sum(-1).mean(),
                       "val/explained_variance": explained_variance(batch, recon)})

    def configure_optimizers(self):
        return adamw_with_schedule(self.sae.parameters(), self.train_cfg, betas=ADAM_BETAS)

    def on_load_checkpoint(self, checkpoint):
        # The schedulers step once per completed step. (Their own state in a checkpoint would
        # lag by one: ModelCheckpoint saves before this module's on_train_batch_end runs.)
        for scheduler in self.coefficients.values():
            scheduler.load_state_dict({"current_step": checkpoint["global_step"]})


def firing(feature_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which latents fired in a batch, and the mean number per row (L0); dense or sparse
    (sae_lens's sparse TopK activations) alike."""
    if feature_acts.is_sparse:
        acts = feature_acts.coalesce()
        positive = acts.values() > 0
        fired = torch.zeros(acts.shape[-1], dtype=torch.bool, device=acts.device)
        fired[acts.indices()[-1][positive]] = True
        return fired, positive.sum() / acts.shape[0]
    active = feature_acts > 0
    return active.any(0), active.float().sum(-1).mean()


def explained_variance(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Fraction of variance explained: 1 - sum ||x - recon||^2 / sum ||x - mean(x)||^2."""
    residual = (x - recon).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return 1 - residual / total
