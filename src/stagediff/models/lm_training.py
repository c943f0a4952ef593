"""Training a language model with Lightning: its data module (seeded batches, split
across ranks) and its LightningModule (next-token loss)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from stagediff.compute import fail_if_not_finite, rank_share
from stagediff.errors import DataError
from stagediff.models.windows import TokenWindows
from stagediff.sections import TrainConfig
from stagediff.training import adamw_with_schedule


class RankShare:
    """A batch sampler's batches cut to one rank's equal share (the global batch is the
    same for any number of processes)."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for rows in self.batches:
            yield rank_share(rows, self.rank, self.world)


class LMDataModule(L.LightningDataModule):
    """Train and validation windows from two token streams (no per-row collation)."""

    def __init__(self, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], n_ctx: int,
                 batch_size: int, seed: int, names=("train", "val")):
        super().__init__()
        self.train_set = TokenWindows(train["tokens"], n_ctx, names[0], train.get("sample_ids"))
        self.val_set = TokenWindows(val["tokens"], n_ctx, names[1], val.get("sample_ids"))
        if len(self.train_set) < batch_size:
            raise DataError(f"{names[0]}: {len(self.train_set)} windows of {n_ctx} tokens is fewer than "
                            f"one batch ({batch_size}); lower batch_size or add data")
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(self.seed)
        sampler = BatchSampler(RandomSampler(self.train_set, generator=gen), self.batch_size, drop_last=True)
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = RankShare(sampler, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(self.train_set, batch_size=None, sampler=sampler)

    def val_dataloader(self):
        sampler = BatchSampler(SequentialSampler(self.val_set), self.batch_size, drop_last=False)
        return DataLoader(self.val_set, batch_size=None, sampler=sampler)


class LMModule(L.LightningModule):
    """Next-token training of a TransformerLens model (HookedTransformer or bridge)."""

    def __init__(self, model, train: TrainConfig):
        super().__init__()
        self.model = model
        self.train_cfg = train

    def on_train_start(self):
        self.model.train()  # a model that was evaluated before training comes in eval mode

    def _apply(self, fn, *args, **kwargs):
        # Lightning moves the module with .to(); a HookedTransformer moves its inputs to
        # cfg.device, which nn.Module.to leaves as it was.
        out = super()._apply(fn, *args, **kwargs)
        param = next(self.model.parameters(), None)
        if param is not None and hasattr(self.model.cfg, "device"):
            self.model.cfg.device = str(param.device)
        return out

    def training_step(self, batch, batch_idx):
        loss = self.model(batch, return_type="loss")
        fail_if_not_finite(loss, self.trainer, "language-model", "lower the learning rate or check the data")
        self.log("train/loss", loss, prog_bar=True, sync_dist=self.trainer.world_size > 1)  # global-batch mean
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model(batch, return_type="loss"), prog_bar=True)

    def configure_optimizers(self):
        return adamw_with_schedule(self.model.parameters(), self.train_cfg)
