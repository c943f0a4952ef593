"""The base_model stage: trains from scratch, saves safetensors, and its metrics are the
saved model's (recomputed here from what it wrote)."""

from __future__ import annotations

import json

from helpers import tiny_organism
from stagediff.data.tokens import load_tokenizer, load_tokens
from stagediff.models.evaluate import clean_loss
from stagediff.models.lm import load_model
from stagediff.stages import base_model


def test_base_model_stage_trains_saves_and_measures(in_tmp):
    cfg = tiny_organism(in_tmp)
    metrics = base_model.run(cfg)
    assert (in_tmp / "models/base/model.safetensors").is_file() and (in_tmp / "models/base/model.json").is_file()
    assert json.loads((in_tmp / "metrics/base_model.json").read_text()) == metrics
    model = load_model(in_tmp / "models/base", load_tokenizer())
    assert metrics["n_params"] == sum(p.numel() for p in model.parameters())
    assert metrics["clean_loss"] == clean_loss(model, cfg, load_tokens("heldout"))
    assert metrics["train_tokens"] == cfg.train_base.max_steps * cfg.train_base.batch_size * cfg.model.n_ctx
    assert not (in_tmp / "checkpoints/base_model").exists()  # a finished run drops its checkpoints
