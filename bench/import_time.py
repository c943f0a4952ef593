"""Start-up of each stage: wall time to import its module in a fresh process (median of
--repeats), and which heavy libraries it pulls in.

    python bench/import_time.py [--repeats 3] [--out bench/results/import_time_cpu.json]

Every `dvc repro` starts one process per stage (25 for the default pipeline); a stage
imports only what its own work needs (`tests/test_cli.py` holds the budget). Run it on an
idle machine: the figures are seconds of wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stagediff.cli import COMMANDS  # noqa: E402

HEAVY = ("torch", "transformers", "transformer_lens", "sae_lens", "lightning", "mlflow", "great_expectations",
         "seaborn")


def one(module: str) -> tuple[float, list[str]]:
    code = (f"import sys, json; import {module}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return time.perf_counter() - start, json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "import_time_cpu.json")
    args = parser.parse_args()
    modules = {"python (bare)": "sys", "stagediff.cli": "stagediff.cli"}
    modules.update({f"stages.{m}": f"stagediff.stages.{m}" for m in sorted({m for m, _, _ in COMMANDS.values()})})
    modules.update({f"library: {lib}": lib for lib in HEAVY})
    result = {}
    for name, module in modules.items():
        runs = [one(module) for _ in range(args.repeats)]
        result[name] = {"seconds": statistics.median(r[0] for r in runs), "heavy": runs[0][1]}
        print(f"{name:32s} {result[name]['seconds']:6.2f} s  {', '.join(result[name]['heavy'])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
