"""Training a language model with Lightning."""


import pytest
import torch

from helpers import TEXTS, make_config
from stagediff.errors import DataError
from stagediff.models.evaluate import mean_loss
from stagediff.models.lm import build_model
from stagediff.models.lm_training import LMDataModule, LMModule


def test_training_lowers_loss(tokenizer):
    import lightning as L

    cfg = make_config({"train_base.max_steps": 25, "train_base.val_every": 25})
    model = build_model(cfg, tokenizer)
    stream = {"tokens": torch.tensor(sum((tokenizer(t)["input_ids"] for t in TEXTS), []), dtype=torch.int32)}
    before = mean_loss(model, stream, 64, 8)
    data = LMDataModule(stream, stream, 64, 8, seed=0)
    trainer = L.Trainer(max_steps=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(LMModule(model, cfg.train_base), datamodule=data)
    assert mean_loss(model, stream, 64, 8) < before - 1.0


def test_too_little_data_for_a_batch():
    with pytest.raises(DataError, match="fewer than one batch"):
        LMDataModule({"tokens": torch.zeros(64 * 3, dtype=torch.int32)},
                        {"tokens": torch.zeros(64, dtype=torch.int32)}, 64, 8, 0)
