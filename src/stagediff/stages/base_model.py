"""Stage `base_model`: the organism's base language model.

Either a `HookedTransformer` trained from scratch on the base corpus with Lightning, or a
Hugging Face checkpoint (your base model, or the organism's pretrained base with
`model.source: hf_local`: `inputs.base_model`, imported), copied in as safetensors.
Either way its clean validation loss is measured on held-out data.
"""

from __future__ import annotations

import time

from stagediff.config import Config
from stagediff.data.tokens import load_tokenizer, load_tokens
from stagediff.io import atomic_dir
from stagediff.layout import MODEL_DIRS, input_path, tokens_file
from stagediff.models.evaluate import clean_loss
from stagediff.models.lm import build_model, copy_hf_checkpoint, load_model, save_model
from stagediff.models.lm_training import LMDataModule, LMModule
from stagediff.tracking import stage_run
from stagediff.training import data_fingerprint, finish_checkpoints, fit, setup_training


def run(cfg: Config) -> dict:
    setup_training(cfg)
    tokenizer = load_tokenizer()
    base_tokens = load_tokens("base")
    heldout = load_tokens("heldout")
    with stage_run(cfg, "base_model") as tracker:
        start = time.perf_counter()
        metrics: dict = {"source": "checkpoints" if cfg.from_checkpoints else cfg.model.source}
        if not cfg.base_checkpoint:
            model = build_model(cfg, tokenizer)
            data = LMDataModule(base_tokens, heldout, cfg.model.n_ctx, cfg.train_base.batch_size, cfg.seed,
                                names=(str(tokens_file("base")), str(tokens_file("heldout"))))
            fingerprint = {"model": cfg.model.model_dump(), "train": cfg.train_base.model_dump(),
                           "compute": cfg.compute.model_dump(),
                           "seed": cfg.seed, "data": data_fingerprint("base", "heldout")}
            fit(LMModule(model, cfg.train_base), data, cfg.train_base, cfg.compute, tracker, "base_model", fingerprint)
            trained_tokens = cfg.train_base.max_steps * cfg.train_base.batch_size * cfg.model.n_ctx
            metrics["train_tokens"] = trained_tokens
            # Timing goes to MLflow only: metrics/*.json must be identical for identical runs.
            tracker.log_metrics({"train_tokens_per_s": trained_tokens / (time.perf_counter() - start)})
        else:
            model = load_model(input_path("base_model"), tokenizer)
        metrics["clean_loss"] = clean_loss(model, cfg, heldout)
        metrics["n_params"] = sum(p.numel() for p in model.parameters())
        with atomic_dir(MODEL_DIRS["base"]) as tmp:
            if not cfg.base_checkpoint:
                save_model(model, tmp)
            else:
                copy_hf_checkpoint(input_path("base_model"), tmp)
        tracker.write_metrics(metrics)
        finish_checkpoints("base_model")
    return metrics
