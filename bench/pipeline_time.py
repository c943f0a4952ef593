"""End-to-end `dvc repro` wall time from scratch, and of a no-op rerun, in a fresh workspace.

    python bench/pipeline_time.py                         # the CPU default (params.yaml)
    python bench/pipeline_time.py --overlay tests/params_micro.yaml --out bench/results/pipeline_micro.json
    python bench/pipeline_time.py --set 'backdoor.variant="code_vuln"' --out bench/results/pipeline_code_vuln_cpu.json
    python bench/pipeline_time.py --overlay presets/smollm2.yaml --set 'inputs={"base_model": "'$PWD'/data/external/SmolLM2-135M-Instruct.Q4_1.gguf"}' \
        --metrics --out bench/results/smollm2_cpu.json

The workspace is built as the tests and CI build theirs (`scripts/micro_pipeline.py`:
dvc.yaml, src, the params file; `dvc init`; the workspace's own src runs), in a temporary directory unless --workspace
names one. Per-stage times are read from the stages' MLflow runs. Prints the figures and
writes them as JSON (--out); with --compare DIR, also whether every metrics file equals
the one in DIR (e.g. `metrics`, the committed results).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import micro_pipeline  # noqa: E402


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as out:
        code = subprocess.run(cmd, cwd=cwd, env=micro_pipeline.workspace_env(cwd), stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code:
        sys.exit(f"{' '.join(cmd)} failed ({code}); see {log}")
    return seconds


def stage_seconds(workspace: Path) -> dict[str, float]:
    """Wall time of each stage's MLflow run (the stage's own work, not its imports)."""
    db = workspace / "mlruns" / "mlflow.db"
    with sqlite3.connect(db) as con:
        rows = con.execute("select name, (end_time - start_time) / 1000.0 from runs "
                           "where name not like 'pipeline-%' and end_time is not null order by start_time").fetchall()
    return {name: seconds for name, seconds in rows}


def run_metrics(workspace: Path) -> dict[str, dict]:
    """Every metrics file of the run, by stage name (what `--metrics` embeds in the results)."""
    return {f.stem: json.loads(f.read_text()) for f in sorted((workspace / "metrics").glob("*.json"))}


def collect(workspace: Path, out: Path) -> None:
    """The figures of a workspace whose `dvc repro` ran elsewhere: each stage's last run,
    their sum, the wall clock from the first stage's start to the last one's end (failed
    attempts included) and every metrics file."""
    stages = stage_seconds(workspace)
    with sqlite3.connect(workspace / "mlruns" / "mlflow.db") as con:
        first, last = con.execute("select min(start_time), max(end_time) from runs "
                                  "where name not like 'pipeline-%'").fetchone()
    result = {"workspace": str(workspace), "machine": {"cpu": platform.processor() or platform.machine(),
                                                       "cores": os.cpu_count()},
              "stage_run_s": stages, "stage_run_total_s": sum(stages.values()),
              "first_stage_start_to_last_stage_end_s": (last - first) / 1000.0,
              "metrics": run_metrics(workspace)}
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--overlay", type=Path, action="append", default=[],
                   help="a YAML overlay merged over --params (repeatable; e.g. presets/gpu.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override one setting, e.g. backdoor.variant='\"code_vuln\"'")
    p.add_argument("--workspace", type=Path, help="build the workspace here (must not exist) and keep it")
    p.add_argument("--compare", type=Path, help="a metrics directory the run's metrics should equal")
    p.add_argument("--metrics", action="store_true", help="also embed every metrics/*.json of the run in --out")
    p.add_argument("--collect", type=Path, metavar="WORKSPACE",
                   help="run nothing: write the stage times and metrics of a workspace already run (e.g. resumed by hand)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline_cpu.json")
    args = p.parse_args()
    if args.collect:
        collect(args.collect, args.out)
        return

    params = micro_pipeline.compose_params(args.params, *args.overlay)
    for item in args.set:
        key, _, raw = item.partition("=")
        micro_pipeline.set_dotted(params, key, json.loads(raw))
    tmp = None
    if args.workspace is None:
        tmp = tempfile.TemporaryDirectory()
        args.workspace = Path(tmp.name) / "ws"
    ws = micro_pipeline.make_workspace(args.workspace, params)
    log = ws / "repro.log"
    print(f"workspace {ws}; log {log}", flush=True)
    scratch = timed(["dvc", "repro"], ws, log)
    print(f"dvc repro from scratch: {scratch:.0f} s", flush=True)
    noop = timed(["dvc", "repro"], ws, log)
    status = timed(["dvc", "status"], ws, log)
    print(f"no-op dvc repro: {noop:.1f} s; dvc status: {status:.1f} s", flush=True)
    stages = stage_seconds(ws)
    result = {
        "params": str(args.params), "overlays": [str(o) for o in args.overlay], "set": args.set, "machine": {"cpu": platform.processor() or platform.machine(),
                                                "cores": os.cpu_count()},
        "repro_from_scratch_s": scratch, "noop_repro_s": noop, "status_s": status,
        "stage_run_s": stages, "stage_run_total_s": sum(stages.values()),
        "outside_stage_runs_s": scratch - sum(stages.values()),
    }
    if args.compare:
        names = sorted(f.name for f in args.compare.glob("*.json"))
        _, mismatch, missing = filecmp.cmpfiles(args.compare, ws / "metrics", names, shallow=False)
        result["metrics_equal_to"] = {"dir": str(args.compare), "files": len(names), "differ": mismatch,
                                      "missing": missing}
    print(json.dumps(result, indent=2))
    if args.metrics:
        result["metrics"] = run_metrics(ws)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
