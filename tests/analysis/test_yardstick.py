"""The yardstick on hand-made figures: each kind of method's row, and the comparison."""

import pytest

from stagediff.analysis.yardstick import comparison, yardstick

DIFF = {"methods": {
    "stagewise": {"ap": 0.6, "random_ap": 0.02, "precision_at_10": 0.5},
    "crosscoder": {"ap": 0.1, "random_ap": 0.05, "precision_at_10": 0.2},
    "diff_sae": {"ap": 0.3, "random_ap": 0.1, "precision_at_10": 0.1},
}}
STEER = {"by_ranking": {
    "stagewise": {"min_k_backdoor_rate_le_0.05": 5, "clean_loss_delta_ablate_top5_zero": 0.01,
                  "induced_rate_top1": 0.4, "induced_rate_top3": 0.6, "auroc_behaviour_prompt_top_feature": 0.9},
    "crosscoder": {"min_k_backdoor_rate_le_0.05": None, "induced_rate_top1": 0.0, "induced_rate_top3": 0.1,
                   "auroc_behaviour_prompt_top_feature": 0.5},
    "diff_sae": {"min_k_backdoor_rate_le_0.05": 20, "clean_loss_delta_ablate_top20_zero": 0.03,
                 "induced_rate_top1": 0.8, "auroc_behaviour_prompt_top_feature": float("nan")},
    "diffmeans": {"backdoor_rate_ablate_top1_projection": 0.0, "clean_loss_delta_ablate_top1_projection": 0.2,
                  "induced_rate_diffmeans": 0.9, "auroc_behaviour_prompt": 0.95},
    "adl_vector": {"backdoor_rate_ablate_top1_projection": 0.5, "induced_rate_adl_vector": 0.0,
                   "auroc_behaviour_prompt": 0.6},
}}
ISAERFT = {"ap": 0.5, "scores": {"random_ap": 0.025, "precision_at_10": 0.3}, "backdoor_rate_after": 0.0,
           "clean_loss_delta": 0.004}


def test_rows_read_each_methods_own_figures():
    out = yardstick(10, 0.5, "prompt", DIFF, STEER, ISAERFT, {"diffmeans": 0.7, "adl_vector": 0.1})
    rows = out["rows"]
    assert set(rows) == {"stagewise", "crosscoder", "diff_sae", "diffmeans", "adl_vector", "isaerft"}
    assert rows["stagewise"]["top_selective_share"] == 0.5
    assert rows["stagewise"]["ap_over_random"] == pytest.approx(30.0)
    assert rows["stagewise"]["min_k_ablate"] == 5 and rows["stagewise"]["clean_loss_delta_min_k"] == 0.01
    assert rows["crosscoder"]["min_k_ablate"] is None and rows["crosscoder"]["clean_loss_delta_min_k"] is None
    assert rows["diff_sae"]["auroc_behaviour"] is None  # NaN is not a figure
    assert rows["diff_sae"]["induced_rate_top3"] is None
    # directions: one candidate, selective by its projection's selectivity; ablated by projection
    assert rows["diffmeans"]["top_selective_share"] == 1.0 and rows["diffmeans"]["min_k_ablate"] == 1
    assert rows["diffmeans"]["clean_loss_delta_min_k"] == 0.2 and rows["diffmeans"]["induced_rate_top1"] == 0.9
    assert rows["adl_vector"]["top_selective_share"] == 0.0 and rows["adl_vector"]["min_k_ablate"] is None
    assert rows["isaerft"]["top_selective_share"] == 0.3 and rows["isaerft"]["min_k_ablate"] is None
    assert rows["isaerft"]["backdoor_rate_after_edit"] == 0.0
    assert out["stagewise_top_selective_share"] == 0.5 and out["diff_sae_min_k_ablate"] == 20


def test_comparison_names_the_best_other_method_per_figure():
    out = yardstick(10, 0.5, "prompt", DIFF, STEER, ISAERFT, {"diffmeans": 0.7, "adl_vector": 0.1})
    assert out["best_other_top_selective_share"] == "diffmeans"  # a selective direction counts 1 of 1
    assert out["stagewise_over_best_other_top_selective_share"] == pytest.approx(0.5)
    assert out["best_other_induced_rate_top1"] == "diffmeans"
    assert out["stagewise_over_best_other_ap_over_random"] == pytest.approx(30 / 20)  # isaerft: 0.5 / 0.025
    assert out["fewest_ablated_dictionary_baseline"] == 20
    assert out["stagewise_fewer_ablated_than_every_dictionary_baseline"] is True


def test_stagewise_that_never_gets_there_is_not_fewer():
    rows = {"stagewise": {"min_k_ablate": None}, "diff_sae": {"min_k_ablate": 20}}
    assert comparison(rows)["stagewise_fewer_ablated_than_every_dictionary_baseline"] is False
    rows = {"stagewise": {"min_k_ablate": 10}, "diff_sae": {"min_k_ablate": 10}}
    assert comparison(rows)["stagewise_fewer_ablated_than_every_dictionary_baseline"] is False


def test_without_ground_truth_figures_are_none_not_zero():
    out = yardstick(10, 0.5, "prompt", {"methods": {"stagewise": {"n_alive": 9}}}, {"by_ranking": {}}, {}, {})
    assert out["rows"]["stagewise"]["top_selective_share"] is None and out["rows"]["stagewise"]["ap"] is None
    assert "isaerft" not in out["rows"]
