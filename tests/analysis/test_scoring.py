"""Rotations, candidates and ranking scores on synthetic dictionaries with known answers."""

import math

import pytest
import torch

from stagediff.analysis.scoring import (
    average_precision,
    candidates,
    precision_at_k,
    random_ap,
    ranking,
    recall_at_k,
    rotation_score,
    rotations,
    row_cosines,
    score_ranking,
    true_ranks,
)
from stagediff.errors import DataError


def _rotate(w: torch.Tensor, rows: list[int], angle_deg: float) -> torch.Tensor:
    """Turn the given rows by `angle_deg` within the plane of dims 0 and 1 (rows are unit e0)."""
    out = w.clone()
    a = math.radians(angle_deg)
    for r in rows:
        out[r] = torch.zeros_like(w[r])
        out[r, 0], out[r, 1] = math.cos(a), math.sin(a)
    return out


def test_rotations_recover_known_angles():
    d_sae, d_in = 6, 4
    base = torch.zeros(d_sae, d_in)
    base[:, 0] = 1.0
    # feature 0 turns 80 deg in both second steps, feature 1 only when the model changes
    # (F via D), feature 2 only when the data changes (F via M), the rest stay.
    w_d, w_m = base, base
    w_f_via_d = _rotate(base, [0, 1], 80)
    w_f_via_m = _rotate(base, [0, 2], 80)
    x, y = rotations(w_d, w_f_via_d, w_m, w_f_via_m)
    c80 = math.cos(math.radians(80))
    assert x.tolist() == pytest.approx([c80, c80, 1, 1, 1, 1], abs=1e-6)
    assert y.tolist() == pytest.approx([c80, 1, c80, 1, 1, 1], abs=1e-6)
    alive = torch.ones(d_sae, dtype=torch.bool)
    cand, cut_x, cut_y = candidates(x, y, alive, "threshold", 0.7, 5.0)
    assert cand.tolist() == [True, False, False, False, False, False]
    assert (cut_x, cut_y) == (0.7, 0.7)
    # the bottom-left feature ranks first; one-path rotations next (ties by index); the rest after
    assert ranking(rotation_score(x, y), alive).tolist()[:3] == [0, 1, 2]


def test_row_cosines_is_scale_free_and_checks_shapes():
    w = torch.randn(5, 3)
    assert row_cosines(w, 3 * w).tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    assert row_cosines(w, -w).tolist() == pytest.approx([-1.0] * 5, abs=1e-6)
    with pytest.raises(DataError, match=r"different shapes \(5, 3\) and \(4, 3\)"):
        row_cosines(w, w[:4])


def test_percentile_candidates_use_alive_features_only():
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, -1.0])
    y = torch.tensor([0.1, 0.9, 0.3, 0.4, 0.5, -1.0])
    alive = torch.tensor([True, True, True, True, True, False])
    cand, cut_x, cut_y = candidates(x, y, alive, "percentile", 0.0, 50.0)
    assert cut_x == pytest.approx(0.3) and cut_y == pytest.approx(0.4)
    assert cand.tolist() == [True, False, False, False, False, False]  # dead feature 5 never a candidate
    with pytest.raises(DataError, match="'corner'"):
        candidates(x, y, alive, "corner", 0.7, 5.0)


def test_average_precision_hand_computed():
    truth = torch.tensor([True, False, True, False, False])
    # ranking hits at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert average_precision(torch.tensor([0, 1, 2, 3, 4]), truth) == pytest.approx((1 + 2 / 3) / 2)
    # perfect and worst rankings
    assert average_precision(torch.tensor([2, 0, 1, 3, 4]), truth) == pytest.approx(1.0)
    assert average_precision(torch.tensor([1, 3, 4, 0, 2]), truth) == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert math.isnan(average_precision(torch.tensor([0, 1]), torch.zeros(5, dtype=torch.bool)))


def test_recall_and_precision_at_k():
    truth = torch.tensor([True, False, True, False, True, False])
    ranked = torch.tensor([0, 1, 3, 2, 5, 4])
    assert recall_at_k(ranked, truth, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, truth, 4) == pytest.approx(2 / 3)
    assert precision_at_k(ranked, truth, 4) == pytest.approx(2 / 4)
    # a ranking shorter than k still divides by k
    assert precision_at_k(ranked[:2], truth, 10) == pytest.approx(1 / 10)


def test_random_ap_is_the_exact_expectation_over_every_ranking():
    """random_ap(n_true, n) equals the mean AP over all n! rankings (small cases, exactly)."""
    import itertools

    for n, n_true in [(1, 1), (4, 1), (5, 2), (6, 3), (7, 7)]:
        truth = torch.zeros(n, dtype=torch.bool)
        truth[:n_true] = True
        aps = [average_precision(torch.tensor(p), truth) for p in itertools.permutations(range(n))]
        assert random_ap(n_true, n) == pytest.approx(sum(aps) / len(aps), abs=1e-12), (n, n_true)
    assert math.isnan(random_ap(0, 10))


def test_random_ranking_scores_random_ap_not_the_base_rate():
    """20 true of 400: a random ranking's mean AP is 0.0633 (the exact expectation), well
    above the base rate 0.05 that precision@k of a random ranking has."""
    gen = torch.Generator().manual_seed(0)
    n = 400
    truth = torch.zeros(n, dtype=torch.bool)
    truth[:20] = True
    alive = torch.ones(n, dtype=torch.bool)
    runs = [score_ranking(torch.randperm(n, generator=gen), truth, alive, [20]) for _ in range(2000)]
    mean_ap = sum(r["ap"] for r in runs) / len(runs)
    assert runs[0]["random_ap"] == pytest.approx(0.0633, abs=5e-4)
    assert mean_ap == pytest.approx(runs[0]["random_ap"], abs=0.002)
    assert abs(mean_ap - runs[0]["base_rate"]) > 0.01
    mean_p20 = sum(r["precision_at_20"] for r in runs) / len(runs)
    assert mean_p20 == pytest.approx(runs[0]["base_rate"], abs=0.003)


def test_score_ranking_counts_only_alive_features():
    truth = torch.tensor([True, True, False, False])
    alive = torch.tensor([True, False, True, True])
    ranked = ranking(torch.tensor([0.9, 0.8, 0.1, 0.2]), alive)
    assert ranked.tolist() == [0, 3, 2]
    scores = score_ranking(ranked, truth, alive, [1, 2])
    assert scores["n_selective"] == 1 and scores["n_alive"] == 3
    assert scores["base_rate"] == pytest.approx(1 / 3)
    assert scores["ap"] == pytest.approx(1.0)
    assert scores["recall_at_1"] == 1.0 and scores["precision_at_2"] == 0.5
    assert scores["true_ranks"] == [1]


def test_true_ranks_list_every_true_feature_best_first():
    ranked = torch.tensor([4, 2, 0, 3, 1])
    truth = torch.tensor([True, True, False, False, False])
    assert true_ranks(ranked, truth) == [3, 5]
    assert true_ranks(ranked, torch.zeros(5, dtype=torch.bool)) == []


def test_corner_depth_rules():
    x = torch.tensor([0.5, 0.9, 0.2])
    y = torch.tensor([0.5, 0.2, 0.95])
    assert rotation_score(x, y, "max").tolist() == pytest.approx([0.5, 0.1, 0.05])
    assert rotation_score(x, y, "sum").tolist() == pytest.approx([1.0, 0.9, 0.85])
    # one far rotation plus a moderate one outranks two moderate ones under "sum" only
    x2, y2 = torch.tensor([0.6, 0.1]), torch.tensor([0.6, 0.8])
    alive = torch.ones(2, dtype=torch.bool)
    assert ranking(rotation_score(x2, y2, "max"), alive).tolist() == [0, 1]
    assert ranking(rotation_score(x2, y2, "sum"), alive).tolist() == [1, 0]
    with pytest.raises(DataError, match="'l2'"):
        rotation_score(x, y, "l2")


def test_auroc_hand_cases():
    from stagediff.analysis.scoring import auroc

    # 3 of the 4 positive/negative pairs are ordered correctly
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    # ties count one half: pairs (1>0), (1=1), (2>0), (2>1) -> 3.5 / 4
    assert auroc(torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([0, 1, 0, 1])) == 0.875
    assert auroc(torch.tensor([5.0, 5.0, 5.0]), torch.tensor([1, 0, 0])) == 0.5
    assert auroc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1, 1])) == 0.0
    assert math.isnan(auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([1.0, float("nan")]), torch.tensor([1, 0]))


def test_top_overlap():
    from stagediff.analysis.scoring import top_overlap

    assert top_overlap(torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 9, 1]), 2) == 0
    assert top_overlap(torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 9, 1]), 4) == 3
