"""Rotations, candidates and how a ranking of features is scored against ground truth
(docs/method.md, docs/metrics.md). Pure tensor functions: the `diff` stage and the tests use them.

- `rotations`: x_i = cos(W_dec[D][i], W_dec[F_via_D][i]), y_i = cos(W_dec[M][i], W_dec[F_via_M][i]).
- `candidates`: the bottom-left corner (both below a threshold, or below a percentile of
  the alive features on each axis).
- `rotation_score`: depth in the bottom-left corner, 1 - max(x, y) (ranks as the candidate
  threshold does) or 2 - x - y (total rotation of both second steps).
- `average_precision`, `recall_at_k`, `precision_at_k`: a ranking against a ground-truth
  set. A random ranking's expected precision@k is the set's share (the base rate); its
  expected AP is larger (`random_ap`: about twice the base rate for a small set).
"""

from __future__ import annotations

import torch

from stagediff.errors import DataError


def row_cosines(w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of one decoder [d_sae, d_in] with row i of the other."""
    if w_a.shape != w_b.shape:
        raise DataError(f"decoders of different shapes {tuple(w_a.shape)} and {tuple(w_b.shape)} cannot be aligned")
    return torch.nn.functional.cosine_similarity(w_a.double(), w_b.double(), dim=1).float()


def rotations(w_d: torch.Tensor, w_f_via_d: torch.Tensor, w_m: torch.Tensor, w_f_via_m: torch.Tensor):
    """(x, y): how far each decoder row turns in the second step of each path."""
    return row_cosines(w_d, w_f_via_d), row_cosines(w_m, w_f_via_m)


def rotation_score(x: torch.Tensor, y: torch.Tensor, rule: str = "max") -> torch.Tensor:
    """Higher = deeper in the bottom-left corner (rotated in both paths).

    'max': 1 - max(x, y), the corner's L-infinity depth: ranks exactly as the candidate
    threshold does (bottom-left at t <=> max(x, y) < t). 'sum': 2 - x - y, the total
    rotation over both second steps (L1 depth): a feature that turned far in one path and
    somewhat in the other outranks one that turned a little in both."""
    if rule == "max":
        return 1 - torch.maximum(x, y)
    if rule == "sum":
        return 2 - x - y
    raise DataError(f"rotation ranking {rule!r}: expected 'max' or 'sum'")


def candidates(x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor, rule: str, threshold: float,
               percentile: float) -> tuple[torch.Tensor, float, float]:
    """Bottom-left features among the alive ones, and the (x, y) cut used.

    rule 'threshold': x < threshold and y < threshold (the paper's 0.7);
    rule 'percentile': each axis below its `percentile`-th percentile over alive features."""
    if rule == "threshold":
        cut_x = cut_y = threshold
    elif rule == "percentile":
        if not alive.any():
            return torch.zeros_like(alive), float("nan"), float("nan")
        cut_x = float(torch.quantile(x[alive].double(), percentile / 100))
        cut_y = float(torch.quantile(y[alive].double(), percentile / 100))
    else:
        raise DataError(f"candidate rule {rule!r}: expected 'threshold' or 'percentile'")
    return alive & (x < cut_x) & (y < cut_y), cut_x, cut_y


def ranking(score: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Indices of the alive features, highest score first (ties by index: deterministic)."""
    idx = alive.nonzero().squeeze(1)
    order = torch.sort(score[idx].double(), descending=True, stable=True).indices
    return idx[order]


def _hits(ranked: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return truth[ranked].double()


def average_precision(ranked: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean of precision@rank over the ranks of the true features (NaN when none are true)."""
    hits = _hits(ranked, truth)
    if hits.sum() == 0:
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / hits.sum())


def random_ap(n_true: int, n: int) -> float:
    """The exact expected average precision of a uniformly random ranking of `n` items of
    which `n_true` are true: (n_true - 1) / (n - 1) + (n - n_true) / (n (n - 1)) * H_n,
    H_n the n-th harmonic number (docs/metrics.md derives it); 1 when n = 1, NaN with no
    true item."""
    if n_true <= 0 or n <= 0:
        return float("nan")
    if n == 1:
        return 1.0
    harmonic = sum(1.0 / i for i in range(1, n + 1))
    return (n_true - 1) / (n - 1) + (n - n_true) / (n * (n - 1)) * harmonic


def recall_at_k(ranked: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    total = _hits(ranked, truth).sum()
    return float(_hits(ranked[:k], truth).sum() / total) if total > 0 else float("nan")


def precision_at_k(ranked: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Share of the top k that is true (k counts ranks; a ranking shorter than k counts as k)."""
    return float(_hits(ranked[:k], truth).sum() / k)


def true_ranks(ranked: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """The rank (1 = top) of every true feature in the ranking, best first: how far each
    one sits from a cut such as k = 20."""
    return (truth[ranked].nonzero().squeeze(1) + 1).tolist()


def score_ranking(ranked: torch.Tensor, truth: torch.Tensor, alive: torch.Tensor, ks: list[int]) -> dict:
    """AP, recall@k, precision@k of a ranking of alive features, with the base rate, set
    size, the exact random expectation of AP and the rank of every true feature."""
    truth = truth & alive
    n_alive = int(alive.sum())
    out = {"ap": average_precision(ranked, truth), "n_selective": int(truth.sum()), "n_alive": n_alive,
           "base_rate": float(truth.sum() / n_alive) if n_alive else float("nan"),
           "random_ap": random_ap(int(truth.sum()), n_alive), "true_ranks": true_ranks(ranked, truth)}
    for k in ks:
        out[f"recall_at_{k}"] = recall_at_k(ranked, truth, k)
        out[f"precision_at_{k}"] = precision_at_k(ranked, truth, k)
    return out


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` separating labels 1 from 0: the probability that
    a random positive scores above a random negative, ties counting one half
    (Mann-Whitney U over mid-ranks). NaN unless both classes are present."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    if len(scores) != len(labels):
        raise ValueError(f"auroc: {len(scores)} scores for {len(labels)} labels")
    if scores.isnan().any():
        raise ValueError("auroc: NaN scores cannot be ranked")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.sort(scores, stable=True).indices
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)  # mid-ranks: tied scores share the mean of their ranks
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid = ends - (counts.double() - 1) / 2
    ranks[order] = mid[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def top_overlap(ranked_a: torch.Tensor, ranked_b: torch.Tensor, k: int) -> int:
    """How many features the top k of two rankings share."""
    return len(set(ranked_a[:k].tolist()) & set(ranked_b[:k].tolist()))
