"""How good a trained dictionary is, measured on held-out activations of its own (model,
data): reconstruction (MSE, explained variance, L0, firing), CE-loss recovered with the
reconstruction spliced into the model, and how far its features turned from S."""

from __future__ import annotations

import pandas as pd
import torch

ALIGNED_COS = 0.9  # an alive feature counts as aligned with S above this cosine


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

        def splice(act, hook, mask=mask):  # noqa: ARG001 (called within this iteration)
            act = act.clone()
            act[mask] = sae(act[mask].float()).to(act.dtype)
            return act

        def zero(act, hook, mask=mask):  # noqa: ARG001
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
    table = pd.DataFrame({"feature": range(len(fires)), "alive": alive.numpy(),
                          "eval_frequency": (fires.double() / n_tokens).numpy()})
    if cos_s is not None:
        table["cos_S"] = cos_s.numpy()
    if cos_parent is not None:
        table["cos_parent"] = cos_parent.numpy()
    return table
