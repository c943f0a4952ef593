"""The diff stage's own pieces: the per-method feature table, the scores of a ranking with
its candidates, and the headline figures (all checked on hand-made cases)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from helpers import make_config
from stagediff.analysis.scoring import random_ap
from stagediff.stages.diff import _scores, headline, ranking_table


def test_ranking_table_ranks_the_ranked_and_leaves_the_rest_empty():
    table = ranking_table(5, {"alive": torch.tensor([True, True, False, True, True]),
                              "score": torch.tensor([0.1, 0.9, 0.0, 0.5, 0.2])},
                          torch.tensor([1, 3, 4, 0]), torch.tensor([False, True, False, False, True]))
    assert table["rank"].tolist()[:2] == [4, 1] and pd.isna(table["rank"][2])
    assert table["rank"].tolist()[3:] == [2, 3]
    assert table["selective"].tolist() == [False, True, False, False, True]
    assert list(table.columns) == ["feature", "alive", "score", "rank", "selective"]


def test_scores_of_a_chain_with_candidates():
    """Ranking 2, 0, 1, 3 of four alive features; truth {2, 3}; candidates {0, 2}."""
    d = make_config({"diff.ks": [1, 2], "diff.concentration_top": 2}).diff
    truth = torch.tensor([False, False, True, True])
    measured = type("M", (), {"stats": {"concentration": torch.tensor([0.2, 0.4, 0.6, 0.8])}})()
    other = torch.tensor([True, False, False, False])
    result = {"ranked": torch.tensor([2, 0, 1, 3]), "truth": truth, "alive": torch.ones(4, dtype=torch.bool),
              "truths": {"max_finals": truth, "F_via_D": other},
              "measured": measured, "candidates": torch.tensor([True, False, True, False]), "cut": (0.7, 0.7)}
    scores = _scores(d, result, truth, labelled=True)
    assert scores["true_ranks"] == [1, 4]
    assert scores["by_truth"]["max_finals"]["ap"] == scores["ap"]
    assert scores["by_truth"]["F_via_D"] == {"ap": 0.5, "random_ap": pytest.approx(random_ap(1, 4)), "n_selective": 1,
                                             "true_ranks": [2], "recall_at_1": 0.0, "recall_at_2": 1.0}
    assert scores["ap"] == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert scores["precision_at_1"] == 1.0 and scores["recall_at_2"] == 0.5
    assert scores["top_concentration"] == pytest.approx((0.6 + 0.2) / 2)
    assert scores["n_candidates"] == 2 and scores["candidate_precision"] == 0.5
    assert scores["random_ap"] == pytest.approx(random_ap(2, 4)) and scores["base_rate"] == 0.5


def test_headline_divides_by_the_exact_random_expectation():
    def block(ap, base_rate, n_sel=5, n_alive=512):
        return {"ap": ap, "base_rate": base_rate, "random_ap": random_ap(n_sel, n_alive), "n_selective": n_sel,
                "n_alive": n_alive, "n_candidates": 2, "candidate_precision": 1.0, "top_concentration": 0.3,
                "recall_at_20": 1.0, "precision_at_10": 0.4, "true_ranks": [1, 2, 3, 5, 20],
                "by_truth": {"max_finals": {"ap": ap, "random_ap": random_ap(n_sel, n_alive), "n_selective": n_sel},
                             "F_via_D": {"ap": ap / 2, "random_ap": random_ap(3, n_alive), "n_selective": 3}}}

    scores = {m: block(ap, 5 / 512) for m, ap in (("stagewise", 0.739), ("data_only", 0.12), ("control", 0.37),
                                                   ("crosscoder", 0.004), ("model_step_only", 0.4),
                                                   ("data_step_only", 0.78), ("stagewise_by_max", 0.68),
                                                   ("adl", 0.01), ("diff_sae", 0.03), ("diff_sae_by_frequency", 0.2))}
    out = headline(scores, "max_finals")
    assert out["adl_ap"] == 0.01 and out["diff_sae_ap"] == 0.03 and out["diff_sae_by_frequency_ap"] == 0.2
    assert out["adl_ap_truth_F_via_D"] == 0.005 and "diff_sae_ap_truth_F_via_D" not in out  # its own truths
    assert out["headline_truth"] == "max_finals" and out["stagewise_true_ranks"] == [1, 2, 3, 5, 20]
    assert out["stagewise_ap_truth_F_via_D"] == 0.739 / 2 and out["data_only_ap_truth_F_via_D"] == 0.06
    assert out["random_ap_truth_F_via_D"] == pytest.approx(random_ap(3, 512)) and out["n_selective_truth_F_via_D"] == 3
    assert out["random_ap"] == pytest.approx(0.0210, abs=1e-4)
    assert out["stagewise_ap_over_random"] == pytest.approx(0.739 / out["random_ap"])
    assert 34 < out["stagewise_ap_over_random"] < 36 and 75 < out["stagewise_ap_over_base_rate"] < 76
    assert out["stagewise_by_max_ap"] == 0.68 and out["stagewise_recall_at_20"] == 1.0
    assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())
