"""MLflow tracking: one parent run per pipeline execution, one child run per stage.

Stages run as separate processes under `dvc repro`, so the parent is found again by a
tag (`stagediff.pipeline`): `$STAGEDIFF_PIPELINE_ID` when set (CI sets one per job), else
a hash of `params.yaml` and `dvc.yaml` (all stages run from one configuration share a
parent). A stage that raises marks its run FAILED. A stage killed outright (SIGKILL, OOM)
cannot; its run records host and pid, and the stage's next start marks it FAILED, so no
run is left RUNNING.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from stagediff.compute import is_rank_zero
from stagediff.config import Config, flatten
from stagediff.io import write_json
from stagediff.layout import PARAMS_FILE, metrics_file

PIPELINE_TAG = "stagediff.pipeline"
STAGE_TAG = "stagediff.stage"
HOST_TAG, PID_TAG = "stagediff.host", "stagediff.pid"
METRIC_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")  # characters MLflow refuses in metric names


def pipeline_id(params_path: str | Path = PARAMS_FILE) -> str:
    if os.environ.get("STAGEDIFF_PIPELINE_ID"):
        return os.environ["STAGEDIFF_PIPELINE_ID"]
    h = hashlib.sha256()
    for name in (params_path, "dvc.yaml"):
        if Path(name).is_file():
            h.update(Path(name).read_bytes())
    return h.hexdigest()[:12]


class StageRun:
    """A stage's MLflow child run: metrics, params, artifacts, and a Lightning logger."""

    def __init__(self, client, run_id: str, experiment: str, tracking_uri: str, stage: str):
        self.client, self.run_id = client, run_id
        self.experiment, self.tracking_uri, self.stage = experiment, tracking_uri, stage

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        """Numeric values, nested dicts flattened to `outer.inner` keys."""
        for key, value in flatten(metrics).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(self.run_id, METRIC_NAME_BAD.sub("_", key), float(value), step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def lightning_logger(self, prefix: str = ""):
        # Lightning is imported only by the training stages that ask for its logger.
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(
            experiment_name=self.experiment, tracking_uri=self.tracking_uri, run_id=self.run_id, prefix=prefix
        )

    def write_metrics(self, metrics: dict, name: str | None = None) -> Path:
        """`metrics/<stage>.json` (a DVC metric) and the same numbers in MLflow."""
        path = metrics_file(name or self.stage)
        write_json(path, metrics)
        self.log_metrics(metrics)
        self.log_artifact(path, "metrics")
        return path


class OtherRankRun(StageRun):
    """The stand-in of a DDP rank other than 0 (a process Lightning relaunched): it
    records nothing, and its Lightning logger is one Lightning keeps silent off rank 0."""

    def __init__(self, cfg: Config, stage: str):
        super().__init__(None, None, cfg.tracking.experiment, cfg.tracking.tracking_uri, stage)

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def write_metrics(self, metrics: dict, name: str | None = None) -> Path:
        raise RuntimeError("only rank 0 writes a stage's metrics")


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = (Path("mlruns") / "artifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifacts.as_uri())


def _parent_run(client, exp_id: str, pid: str) -> str:
    found = client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{STAGE_TAG}` = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pipeline-{pid}", tags={PIPELINE_TAG: pid, STAGE_TAG: "pipeline"})
    return run.info.run_id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fail_dead_runs(client, exp_id: str, stage: str) -> list[str]:
    """Mark FAILED the stage's runs left RUNNING by a process of this host that no longer exists."""
    host = socket.gethostname()
    found = client.search_runs([exp_id], filter_string=f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'RUNNING'")
    dead = []
    for run in found:
        tags = run.data.tags
        if tags.get(HOST_TAG) == host and tags.get(PID_TAG, "").isdigit() and not _alive(int(tags[PID_TAG])):
            client.set_tag(run.info.run_id, "stagediff.end", "process died without closing the run (killed)")
            client.set_terminated(run.info.run_id, "FAILED")
            dead.append(run.info.run_id)
    return dead


@contextmanager
def stage_run(cfg: Config, stage: str) -> Iterator[StageRun]:
    """Open the stage's child run under the pipeline's parent; FINISHED or FAILED at exit."""
    if not is_rank_zero():
        yield OtherRankRun(cfg, stage)
        return
    uri = cfg.tracking.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, cfg.tracking.experiment)
    pid = pipeline_id()
    parent = _parent_run(client, exp_id, pid)
    for dead in fail_dead_runs(client, exp_id, stage):
        print(f"{stage}: MLflow run {dead} was left RUNNING by a killed process; marked FAILED")
    run = client.create_run(
        exp_id, run_name=stage,
        tags={PIPELINE_TAG: pid, STAGE_TAG: stage, "mlflow.parentRunId": parent,
              HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())},
    )
    run_id = run.info.run_id
    flat = cfg.as_flat_dict()
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(flat.items())])
    try:
        yield StageRun(client, run_id, cfg.tracking.experiment, uri, stage)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        client.set_terminated(parent, "FAILED")  # until a later stage of the pipeline finishes
        raise
    client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
