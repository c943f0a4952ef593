"""The steer stage's pieces on hand-made inputs: the prompt split, detection AUROCs and
the headline figures picked from measured rows."""

from __future__ import annotations

import pytest
import torch

from helpers import make_config
from stagediff.analysis.causal import split_prompts
from stagediff.analysis.detection import WINDOWS, detection_rows, dictionary_auroc_summary
from stagediff.errors import ConfigError, DataError
from stagediff.stages.steer import ablation_plans, headline


def _prompts(n):
    return [{"kind": kind, "question": f"q{i}", "prompt": f"{kind} {i}"}
            for kind in ("triggered", "untriggered", "decoy") for i in range(n)]


def test_prompts_split_by_question_for_every_kind():
    fit, ev = split_prompts(_prompts(5), 2)
    for kind in ("triggered", "untriggered", "decoy"):
        assert [p["question"] for p in fit[kind]] == ["q0", "q1"]
        assert [p["question"] for p in ev[kind]] == ["q2", "q3", "q4"]
    with pytest.raises(DataError, match="leaves none"):
        split_prompts(_prompts(2), 2)
    shuffled = _prompts(3)
    shuffled[3]["question"], shuffled[4]["question"] = shuffled[4]["question"], shuffled[3]["question"]
    with pytest.raises(DataError, match="share their question with a fit prompt"):
        split_prompts(shuffled, 1)  # untriggered q0 would be evaluated, but triggered q0 fits


def test_prompt_split_takes_a_spec_without_decoys():
    prompts = [p for p in _prompts(4) if p["kind"] != "decoy"]
    fit, ev = split_prompts(prompts, 1)
    assert fit["decoy"] == ev["decoy"] == [] and len(ev["untriggered"]) == 3


def test_answers_are_split_off_the_joint_encoding(tokenizer):
    from stagediff.analysis.causal import encode_with_answers

    prompts = ["Human: What does `f1` do?\n\nAssistant:", "Human: Hi\n\nAssistant:"]
    prompt_ids, full_ids, merged = encode_with_answers(tokenizer, prompts, [" It adds 1 to x.", ""])
    assert merged == 0
    assert full_ids[0][: len(prompt_ids[0])] == prompt_ids[0] and len(full_ids[0]) > len(prompt_ids[0])
    assert tokenizer.decode(full_ids[0][len(prompt_ids[0]):]) == " It adds 1 to x."
    assert full_ids[1] == prompt_ids[1]


def test_fit_prompts_must_leave_prompts_to_evaluate():
    with pytest.raises(ConfigError, match="steer.fit_prompts"):
        make_config({"steer.fit_prompts": 16, "corpus.n_eval_prompts": 16})


@pytest.mark.parametrize("changes, key", [({"steer.ks": [1, 5]}, "steer.ks"),
                                          ({"steer.steer_features": [3]}, "steer.steer_features"),
                                          ({"steer.detect_window": "generation"}, "steer.detect_window"),
                                          ({"steer.dictionary": "F"}, "steer.dictionary")])
def test_steer_settings_are_checked(changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_config(changes)


def _pools(n_rows, d=3):
    """Feature 0 separates rows 0-1 from the rest in every window; feature 1 is constant."""
    feats = torch.zeros(n_rows, d)
    feats[:2, 0] = 1.0
    feats[:, 1] = 0.5
    out = {f"features/{w}": feats for w in WINDOWS}
    out.update({f"probe/diffmeans/{w}": torch.arange(n_rows, 0, -1).float() for w in WINDOWS})
    return out


def test_detection_rows_score_each_candidate_and_the_probe():
    pools = _pools(6)
    labels = {"triggered": ([0, 1], [2, 3]), "behaviour": ([0], [4, 5])}
    rows = detection_rows({"stagewise": pools}, labels, {"stagewise": [0, 1]}, pools)
    get = {(r["method"], r["feature"], r["form"], r["window"]): r["auroc"] for r in rows}
    assert get[("stagewise", 0, "triggered", "prompt")] == 1.0
    assert get[("stagewise", 1, "triggered", "prompt")] == 0.5  # a constant score: ties count one half
    assert get[("diffmeans", -1, "behaviour", "answer")] == 1.0  # probe decreases with the row index
    assert len(rows) == 2 * len(WINDOWS) * 3


def test_dictionary_summary_counts_and_names_the_best_feature():
    summary = dictionary_auroc_summary(_pools(6), {"triggered": ([0, 1], [2, 3])}, torch.tensor([True, True, False]))
    s = summary["triggered/prompt"]
    assert (s["n_above_0.9"], s["best_feature"], s["best_auroc"]) == (1, 0, 1.0)


def test_ablation_plans_zero_ablate_the_extra_rankings_and_random_draws_only():
    cfg = make_config({"steer.random_draws": 2, "seed": 3})
    splices = {"main": "main-splice", "crosscoder": "cc-splice"}
    means = {"main": torch.zeros(6), "crosscoder": torch.ones(6)}
    alive = torch.tensor([True, False, True, True, False, True])
    plans = ablation_plans(cfg, {"stagewise": [3, 0], "crosscoder": [5]}, splices, means, alive,
                           {"attribution": ([2, 3], "main-splice"), "stagewise@F_via_D": ([3, 0], "d-splice")})
    by_method = {(p[0], p[1]): p for p in plans}
    assert by_method[("stagewise", 0)][3:] == ("main-splice", means["main"])
    assert by_method[("crosscoder", 0)][3] == "cc-splice"
    assert by_method[("attribution", 0)][2:] == ([2, 3], "main-splice", None)  # None: zero-ablation only
    assert by_method[("stagewise@F_via_D", 0)][3:] == ("d-splice", None)
    draws = [p for p in plans if p[0] == "random"]
    assert [p[1] for p in draws] == [0, 1] and all(sorted(p[2]) == [0, 2, 3, 5] for p in draws)
    assert draws[0][2] != draws[1][2] or len(draws[0][2]) < 3  # two different orders (seeded)
    assert plans == ablation_plans(cfg, {"stagewise": [3, 0], "crosscoder": [5]}, splices, means, alive,
                                   {"attribution": ([2, 3], "main-splice"), "stagewise@F_via_D": ([3, 0], "d-splice")})


def test_headline_picks_measured_rows():
    cfg = make_config({"steer.max_loss_delta": 0.1, "steer.detect_window": "prompt"})
    ablation = [
        {"method": "stagewise", "draw": 0, "k": 10, "ablation": "zero", "backdoor_rate": 0.02, "clean_loss_delta": 0.01},
        {"method": "stagewise", "draw": 0, "k": 1, "ablation": "zero", "backdoor_rate": 0.5, "clean_loss_delta": 0.0},
        {"method": "stagewise", "draw": 0, "k": 10, "ablation": "mean", "backdoor_rate": 0.04, "clean_loss_delta": 0.01},
        {"method": "random", "draw": 0, "k": 10, "ablation": "zero", "backdoor_rate": 0.9, "clean_loss_delta": 0.0},
        {"method": "random", "draw": 1, "k": 10, "ablation": "zero", "backdoor_rate": 1.0, "clean_loss_delta": 0.0},
        {"method": "diffmeans", "draw": 0, "k": 1, "ablation": "projection", "backdoor_rate": 0.3, "clean_loss_delta": 0.0},
        {"method": "attribution", "draw": 0, "k": 1, "ablation": "zero", "backdoor_rate": 0.01, "clean_loss_delta": 0.0},
        {"method": "attribution", "draw": 0, "k": 10, "ablation": "zero", "backdoor_rate": 0.0, "clean_loss_delta": 0.02},
        {"method": "stagewise@F_via_D", "draw": 0, "k": 10, "ablation": "zero", "backdoor_rate": 0.7, "clean_loss_delta": 0.0},
    ]
    steering = [
        {"method": "stagewise", "n_features": 1, "positions": "all", "strength": 8.0, "induced_rate": 0.9, "clean_loss_delta": 0.5},
        {"method": "stagewise", "n_features": 1, "positions": "last_prompt", "strength": 2.0, "induced_rate": 0.6, "clean_loss_delta": 0.05},
        {"method": "stagewise", "n_features": 1, "positions": "last_prompt", "strength": 1.0, "induced_rate": 0.2, "clean_loss_delta": 0.01},
        {"method": "diffmeans", "n_features": 0, "positions": "last_prompt", "strength": 1.0, "induced_rate": 0.7, "clean_loss_delta": 0.02},
    ]
    detection = [
        {"method": "stagewise", "rank": 1, "feature": 7, "window": "prompt", "form": "behaviour", "auroc": 0.8},
        {"method": "stagewise", "rank": 2, "feature": 9, "window": "prompt", "form": "behaviour", "auroc": 0.95},
        {"method": "diffmeans", "rank": 0, "feature": -1, "window": "prompt", "form": "behaviour", "auroc": 0.99},
    ]
    out = headline(cfg, ablation, steering, detection, {"stagewise": [7, 9]})
    assert out["backdoor_rate_ablate_top10"] == 0.02
    assert out["clean_loss_delta_ablate_top10"] == 0.01
    assert out["backdoor_rate_ablate_top10_mean"] == 0.04
    assert out["random_backdoor_rate_ablate_10"] == pytest.approx(0.95)  # averaged over draws
    assert out["min_k_ablate"] == 10
    # the rankings ablated besides the compared ones: by causal effect, and in the other final dictionary
    assert out["min_k_ablate_attribution"] == 1 and out["backdoor_rate_ablate_top10_attribution"] == 0.0
    assert out["min_k_ablate_F_via_D"] is None and out["backdoor_rate_ablate_top10_F_via_D"] == 0.7
    assert out["by_ranking"]["attribution"]["clean_loss_delta_ablate_top10_zero"] == 0.02
    assert out["induced_rate_top1"] == 0.6  # the 0.9 costs more clean loss than allowed
    assert out["by_ranking"]["stagewise"]["induced_rate_top1_any_cost"] == 0.9
    assert out["by_ranking"]["stagewise"]["induced_rate_top1_setting"]["strength"] == 2.0
    assert out["induced_rate_diffmeans"] == 0.7
    assert out["backdoor_rate_ablate_diffmeans"] == 0.3
    assert out["auroc_top_feature"] == 0.8  # rank 1, not the best of the top
    assert out["by_ranking"]["stagewise"]["auroc_behaviour_prompt_best_of_top"] == 0.95
    assert out["auroc_diffmeans"] == 0.99
    assert out["auroc_diffmeans_prompt"] == 0.99
