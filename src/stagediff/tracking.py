"""MLflow tracking: one parent run per pipeline execution, one child run per stage.

Stages run as separate processes under `dvc repro`, so the parent is found again by a
tag (`stagediff.pipeline`): `$STAGEDIFF_PIPELINE_ID` when set (CI sets one per job), else
a hash of `params.yaml` and `dvc.yaml` (all stages run from one configuration share a
parent). The parent carries the settings (once, when created) and each stage's headline
figures (the metrics `gate.checks` watches, and every ranking's AP), named
`<stage>.<key>`, so pipelines (seeds, variants) compare side by side in the MLflow UI.
A stage that raises marks its run FAILED. A stage killed outright (SIGKILL, OOM)
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

    def __init__(self, client, run_id: str, experiment: str, tracking_uri: str, stage: str,
                 parent_id: str | None = None, headline: dict[str, set[str]] | None = None):
        self.client, self.run_id = client, run_id
        self.experiment, self.tracking_uri, self.stage = experiment, tracking_uri, stage
        self.parent_id, self.headline = parent_id, headline or {}

    def log_metrics(self, metrics: dict, step: int = 0, run_id: str | None = None) -> None:
        """Numeric values, nested dicts flattened to `outer.inner` keys."""
        for key, value in flatten(metrics).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(run_id or self.run_id, METRIC_NAME_BAD.sub("_", key), float(value), step=step)

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
        name = name or self.stage
        path = metrics_file(name)
        write_json(path, metrics)
        self.log_metrics(metrics)
        self.log_artifact(path, "metrics")
        if self.parent_id:
            self.log_metrics({name: headline_figures(metrics, self.headline.get(name, set()))}, run_id=self.parent_id)
        return path


def headline_figures(metrics: dict, gated: set[str]) -> dict:
    """The figures of a metrics file the parent run shows: the gated keys (dotted keys reach
    into nested blocks) and every top-level AP (`*_ap`, `*_ap_truth_*`)."""
    flat = flatten(metrics)
    return {k: v for k, v in flat.items() if k in gated or ("." not in k and (k.endswith("_ap") or "_ap_truth_" in k))}


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


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created on first use with its artifacts beside the SQLite store
    (`mlruns/artifacts` by default), wherever the stage runs (a queued `dvc exp` runs in a
    temporary copy of the project)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    store = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path("mlruns")
    artifacts = (store / "artifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifacts.as_uri())


def _parent_run(client, exp_id: str, pid: str, params: dict) -> str:
    """The pipeline's parent run, created (with every setting as a param) on first use."""
    found = client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{STAGE_TAG}` = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pipeline-{pid}", tags={PIPELINE_TAG: pid, STAGE_TAG: "pipeline"})
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def _log_params(client, run_id: str, params: dict) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])


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
    exp_id = _experiment_id(client, cfg.tracking.experiment, uri)
    pid = pipeline_id()
    flat = cfg.as_flat_dict()
    parent = _parent_run(client, exp_id, pid, flat)
    for dead in fail_dead_runs(client, exp_id, stage):
        print(f"{stage}: MLflow run {dead} was left RUNNING by a killed process; marked FAILED")
    run = client.create_run(
        exp_id, run_name=stage,
        tags={PIPELINE_TAG: pid, STAGE_TAG: stage, "mlflow.parentRunId": parent,
              HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())},
    )
    run_id = run.info.run_id
    _log_params(client, run_id, flat)
    try:
        yield StageRun(client, run_id, cfg.tracking.experiment, uri, stage, parent, cfg.headline_metrics())
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        client.set_terminated(parent, "FAILED")  # until a later stage of the pipeline finishes
        raise
    client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
