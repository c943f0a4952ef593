"""The regression gate on hand-made metrics: thresholds, regressions against a directory or
a git revision, NaN and missing values, the table and the CLI's exit status."""

import json
import math
import subprocess

import pytest

from helpers import make_config
from stagediff.cli import main
from stagediff.errors import ConfigError, DataError
from stagediff.stages import gate

CHECKS = [
    {"metric": "diff:stagewise_ap", "better": "higher", "min": 0.5, "tolerance": 0.05},
    {"metric": "steer:backdoor_rate_ablate_top10", "better": "lower", "max": 0.05, "tolerance": 0.02},
    {"metric": "sae_F_via_M@main:explained_variance", "better": "higher", "tolerance": 0.01},
    {"metric": "validate:success", "better": "higher", "min": 1},
    {"metric": "diff:methods.stagewise.recall_at_20", "better": "higher", "min": 0.8},
]
GOOD = {"diff": {"stagewise_ap": 0.74, "methods": {"stagewise": {"recall_at_20": 1.0}}},
        "steer": {"backdoor_rate_ablate_top10": 0.02}, "sae_F_via_M@main": {"explained_variance": 0.75},
        "validate": {"success": True}}


def gate_config(checks=None, baseline=None):
    return make_config({"gate": {"baseline": baseline, "checks": CHECKS if checks is None else checks}})


def write_metrics(directory, metrics):
    directory.mkdir(parents=True, exist_ok=True)
    for stem, values in metrics.items():
        (directory / f"{stem}.json").write_text(json.dumps(values))
    return directory


def changed(**values):
    out = json.loads(json.dumps(GOOD))
    for dotted, value in values.items():
        stem, key = dotted.split("__")
        out[stem][key] = value
    return out


def test_identical_metrics_pass(tmp_path):
    cur = write_metrics(tmp_path / "cur", GOOD)
    outcomes = gate.run_gate(gate_config(), cur, str(write_metrics(tmp_path / "base", GOOD)))
    assert all(o.passed for o in outcomes) and len(outcomes) == len(CHECKS)
    assert [o.baseline for o in outcomes] == [0.74, 0.02, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("changes,failing,reason", [
    ({"diff__stagewise_ap": 0.45}, "diff:stagewise_ap", "below min 0.5"),
    ({"diff__stagewise_ap": 0.68}, "diff:stagewise_ap", "regressed by 0.06 > tolerance 0.05"),
    ({"steer__backdoor_rate_ablate_top10": 0.045}, "steer:backdoor_rate_ablate_top10", "regressed by 0.025"),
    ({"steer__backdoor_rate_ablate_top10": 0.06}, "steer:backdoor_rate_ablate_top10", "above max 0.05"),
    ({"sae_F_via_M@main__explained_variance": float("nan")}, "sae_F_via_M@main:explained_variance", "NaN"),
    ({"validate__success": False}, "validate:success", "below min 1"),
    ({"validate__success": "yes"}, "validate:success", "not a number"),
])
def test_each_kind_of_failure_is_named(tmp_path, changes, failing, reason):
    cur = write_metrics(tmp_path / "cur", changed(**changes))
    outcomes = gate.run_gate(gate_config(), cur, str(write_metrics(tmp_path / "base", GOOD)))
    failed = [o for o in outcomes if not o.passed]
    assert [o.metric for o in failed] == [failing]
    assert reason in failed[0].reason


def test_improvements_and_regressions_within_tolerance_pass(tmp_path):
    cur = write_metrics(tmp_path / "cur", changed(diff__stagewise_ap=0.70, steer__backdoor_rate_ablate_top10=0.0,
                                                  **{"sae_F_via_M@main__explained_variance": 0.741}))
    assert all(o.passed for o in gate.run_gate(gate_config(), cur, str(write_metrics(tmp_path / "b", GOOD))))


def test_nan_in_both_is_no_regression_and_new_metrics_have_no_baseline(tmp_path):
    nan = changed(**{"sae_F_via_M@main__explained_variance": float("nan")})
    cur, base = write_metrics(tmp_path / "cur", nan), write_metrics(tmp_path / "base", nan)
    assert all(o.passed for o in gate.run_gate(gate_config(), cur, str(base)))
    (base / "diff.json").unlink()
    outcomes = gate.run_gate(gate_config(), cur, str(base))
    assert outcomes[0].passed and outcomes[0].baseline is None


def test_missing_file_or_key_fails_the_check(tmp_path):
    metrics = json.loads(json.dumps(GOOD))
    del metrics["steer"], metrics["diff"]["stagewise_ap"]
    outcomes = gate.run_gate(gate_config(), write_metrics(tmp_path / "cur", metrics), None)
    reasons = {o.metric: o.reason for o in outcomes if not o.passed}
    assert reasons == {"diff:stagewise_ap": "key 'stagewise_ap' not in metrics/diff.json",
                       "steer:backdoor_rate_ablate_top10": "metrics/steer.json missing"}


def test_baseline_from_a_git_revision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], check=True)
    write_metrics(tmp_path / "metrics", GOOD)
    subprocess.run(["git", "add", "metrics"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "baseline"], check=True)
    write_metrics(tmp_path / "metrics", changed(diff__stagewise_ap=0.6))  # uncommitted regression
    outcomes = gate.run_gate(gate_config(baseline="HEAD"))
    assert [(o.metric, o.baseline) for o in outcomes if not o.passed] == [("diff:stagewise_ap", 0.74)]
    with pytest.raises(DataError, match="gate.baseline 'v9': expected a directory of metrics files or a git"):
        gate.run_gate(gate_config(baseline="v9"))


def test_cli_prints_the_table_and_exits_1_on_a_regression(tmp_path, monkeypatch, capsys):
    from ruamel.yaml import YAML

    from helpers import micro_params, with_changes

    monkeypatch.chdir(tmp_path)
    params = with_changes(micro_params(), {"gate": {"baseline": "base", "checks": CHECKS}})
    with open("params.yaml", "w") as f:
        YAML(typ="safe", pure=True).dump(params, f)
    write_metrics(tmp_path / "base", GOOD)
    write_metrics(tmp_path / "metrics", GOOD)
    assert main(["gate"]) == 0
    assert "gate: 5 of 5 checks passed" in capsys.readouterr().out
    write_metrics(tmp_path / "metrics", changed(diff__stagewise_ap=0.6))
    assert main(["gate"]) == 1
    out = capsys.readouterr().out
    assert "gate: 4 of 5 checks passed; 1 FAILED" in out
    row = next(line for line in out.splitlines() if line.startswith("diff:stagewise_ap"))
    assert "0.6" in row and "0.74" in row and "FAIL: regressed by 0.14 > tolerance 0.05" in row


@pytest.mark.parametrize("check,message", [
    ({"metric": "nocolon", "better": "higher", "min": 0}, "gate.checks.0.metric: expected '<metrics file>:<key>'"),
    ({"metric": "a:b", "better": "up", "min": 0}, "gate.checks.0.better"),
    ({"metric": "a:b", "better": "higher"}, "at least one of min, max, tolerance"),
    ({"metric": "a:b", "better": "higher", "min": 2, "max": 1}, "min <= max"),
    ({"metric": "a:b", "better": "higher", "tolerance": -0.1}, "gate.checks.0.tolerance"),
    ({"metric": "a:b", "better": "higher", "min": 0, "threshold": 1}, "gate.checks.0.threshold: unknown key"),
])
def test_bad_checks_are_refused_at_load(check, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gate_config([check])


def test_duplicate_checks_are_refused():
    with pytest.raises(ConfigError, match="gate.checks.1.metric: expected each metric checked once"):
        gate_config([CHECKS[0], CHECKS[0]])


def test_real_params_gate_on_the_committed_metrics(tmp_path):
    """The project's own gate: the committed metrics meet params.yaml's thresholds, and a
    copy in which one metric regressed beyond its tolerance fails on exactly that check."""
    import shutil

    from helpers import ROOT, real_params
    from stagediff.config import parse_config

    cfg = parse_config(real_params())
    thresholds_only = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"baseline": None})})
    outcomes = gate.run_gate(thresholds_only, ROOT / "metrics")
    assert len(outcomes) >= 20 and all(o.passed for o in outcomes), [o for o in outcomes if not o.passed]
    assert not any(o.value is None or math.isnan(o.value) for o in outcomes)
    regressed = shutil.copytree(ROOT / "metrics", tmp_path / "metrics")
    diff = json.loads((regressed / "diff.json").read_text())
    check = next(c for c in cfg.gate.checks if c.metric == "diff:stagewise_ap")
    diff["stagewise_ap"] -= check.tolerance + 0.01
    (regressed / "diff.json").write_text(json.dumps(diff))
    outcomes = gate.run_gate(cfg, regressed, str(ROOT / "metrics"))
    assert [o.metric for o in outcomes if not o.passed] == ["diff:stagewise_ap"]
