"""One yardstick for every method (docs/metrics.md, "Yardstick"): the same five figures per
method, from what `diff`, `steer`, `isaerft` and the direction statistics measured, so that
methods over different dictionaries, and directions, sit in one table.

- `top_selective_share`: the share of its top k candidates that are backdoor-selective in
  its own dictionary (a direction counts as one candidate, selective by the selectivity of
  its positive projection over the same tokens);
- `min_k_ablate`: the fewest of its top features (k from `steer.ks`) whose zero-ablation
  takes the backdoor rate to <= 0.05, and that ablation's clean-loss cost (a direction: 1
  when projecting it out does it; an edit such as ISaeRFT: not a ranking, not ablated);
- `induced_rate_top1`, `induced_rate_top3`: the best rate induced on untriggered prompts
  by steering with its top 1 / top 3 at a clean-loss cost <= `steer.max_loss_delta`
  (a direction: steering with it, as its top 1);
- `auroc_behaviour`: detection of behaviour vs decoy prompts by its top candidate.

Missing figures are None (the method does not have them), never a stand-in number.
"""

from __future__ import annotations

import math

# method -> kind: a ranking of dictionary features (diff, steer), a direction (steer), an edit (isaerft)
METHODS = {
    "stagewise": "ranking", "data_only": "ranking", "control": "ranking", "adl": "ranking",
    "crosscoder": "ranking", "diff_sae": "ranking", "adl_vector": "direction", "diffmeans": "direction",
    "isaerft": "edit",
}
DIRECTIONS = tuple(m for m, kind in METHODS.items() if kind == "direction")  # one vector each, not features
FIGURES = ("top_selective_share", "ap", "ap_over_random", "min_k_ablate", "clean_loss_delta_min_k",
           "induced_rate_top1", "induced_rate_top3", "auroc_behaviour")


def _num(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def ranking_row(method: str, k: int, diff: dict, steer: dict, window: str) -> dict:
    scores = diff.get("methods", {}).get(method, {})
    by = steer.get("by_ranking", {}).get(method, {})
    min_k = by.get("min_k_backdoor_rate_le_0.05")
    ap, rnd = _num(scores.get("ap")), _num(scores.get("random_ap"))
    return {"top_selective_share": _num(scores.get(f"precision_at_{k}")), "ap": ap,
            "ap_over_random": ap / rnd if ap is not None and rnd else None,
            "min_k_ablate": min_k, "clean_loss_delta_min_k": _num(by.get(f"clean_loss_delta_ablate_top{min_k}_zero"))
            if min_k is not None else None,
            "induced_rate_top1": _num(by.get("induced_rate_top1")), "induced_rate_top3": _num(by.get("induced_rate_top3")),
            "auroc_behaviour": _num(by.get(f"auroc_behaviour_{window}_top_feature"))}


def direction_row(method: str, selectivity: float | None, threshold: float, steer: dict, window: str) -> dict:
    by = steer.get("by_ranking", {}).get(method, {})
    rate = _num(by.get("backdoor_rate_ablate_top1_projection"))
    return {"top_selective_share": None if selectivity is None else float(selectivity > threshold),
            "direction_selectivity": selectivity, "ap": None, "ap_over_random": None,
            "min_k_ablate": (1 if rate <= 0.05 else None) if rate is not None else None,
            "clean_loss_delta_min_k": _num(by.get("clean_loss_delta_ablate_top1_projection"))
            if rate is not None and rate <= 0.05 else None,
            "induced_rate_top1": _num(by.get(f"induced_rate_{method}")), "induced_rate_top3": None,
            "auroc_behaviour": _num(by.get(f"auroc_behaviour_{window}"))}


def edit_row(isaerft: dict, k: int) -> dict:
    scores = isaerft.get("scores", {})
    ap, rnd = _num(isaerft.get("ap")), _num(scores.get("random_ap"))
    return {"top_selective_share": _num(scores.get(f"precision_at_{k}")), "ap": ap,
            "ap_over_random": ap / rnd if ap is not None and rnd else None, "min_k_ablate": None,
            "clean_loss_delta_min_k": None, "induced_rate_top1": None, "induced_rate_top3": None,
            "auroc_behaviour": None, "backdoor_rate_after_edit": _num(isaerft.get("backdoor_rate_after")),
            "clean_loss_delta_edit": _num(isaerft.get("clean_loss_delta"))}


def yardstick(k: int, threshold: float, window: str, diff: dict, steer: dict, isaerft: dict | None,
              direction_selectivity: dict[str, float]) -> dict:
    """{"rows": {method: figures}, "k": k, flat "<method>_<figure>" keys (for the gate and
    `dvc metrics diff`), and how stage-wise compares with the best other method per figure}."""
    rows = {}
    for method, kind in METHODS.items():
        if kind == "ranking" and method in diff.get("methods", {}):
            rows[method] = ranking_row(method, k, diff, steer, window)
        elif kind == "direction" and method in steer.get("by_ranking", {}):
            rows[method] = direction_row(method, direction_selectivity.get(method), threshold, steer, window)
        elif kind == "edit" and isaerft and "backdoor_rate_after" in isaerft:
            rows[method] = edit_row(isaerft, k)
    out: dict = {"k": k, "detect_window": window, "rows": rows}
    for method, figures in rows.items():
        for name, value in figures.items():
            out[f"{method}_{name}"] = value
    out.update(comparison(rows))
    return out


def comparison(rows: dict) -> dict:
    """Per figure: stage-wise's value over the best other method's (higher is better except
    min_k_ablate, where stage-wise's k is compared as best-other / stage-wise; a method
    that never gets there counts as worse than any k), and which method that is."""
    out = {}
    main = rows.get("stagewise")
    if main is None:
        return out
    for figure in ("top_selective_share", "ap_over_random", "induced_rate_top1", "auroc_behaviour"):
        others = {m: r.get(figure) for m, r in rows.items() if m != "stagewise" and r.get(figure) is not None}
        if not others or main.get(figure) is None:
            continue
        best = max(others, key=lambda m: others[m])
        out[f"best_other_{figure}"] = best
        out[f"stagewise_over_best_other_{figure}"] = (main[figure] / others[best]) if others[best] > 0 else None
    others = {m: r["min_k_ablate"] for m, r in rows.items() if m != "stagewise" and "min_k_ablate" in r
              and METHODS[m] == "ranking"}
    reached = {m: k for m, k in others.items() if k is not None}
    out["fewest_ablated_dictionary_baseline"] = min(reached.values()) if reached else None
    out["stagewise_fewer_ablated_than_every_dictionary_baseline"] = (
        main["min_k_ablate"] is not None and all(k is None or main["min_k_ablate"] < k for k in others.values()))
    return out
