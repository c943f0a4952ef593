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
