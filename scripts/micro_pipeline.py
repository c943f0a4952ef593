"""Run the real pipeline on the micro configuration in a fresh workspace.

    python scripts/micro_pipeline.py DIR [--params tests/params_micro.yaml] [--set key=value ...]

Copies `dvc.yaml`, `src/` and the params file into DIR (which must not exist), runs
`dvc init --no-scm` and `dvc repro` there, and exits with `dvc repro`'s status. The
tests build their workspaces with the same `make_workspace`; `.ci/run` uses the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MICRO_PARAMS = ROOT / "tests" / "params_micro.yaml"


def stagediff_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("STAGEDIFF_PIPELINE_ID", "micro")
    return env


def make_workspace(dst: Path, params: dict) -> Path:
    """A runnable copy of the project (dvc.yaml, src, params) in `dst`, DVC initialised."""
    from ruamel.yaml import YAML

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "dvc.yaml", dst / "dvc.yaml")
    shutil.copytree(ROOT / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    with open(dst / "params.yaml", "w") as f:
        YAML(typ="safe", pure=True).dump(params, f)
    env = stagediff_env()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=dst, env=env, check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=dst, env=env, check=True)
    return dst


def set_dotted(params: dict, dotted: str, value) -> None:
    node = params
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise SystemExit(f"--set {dotted}: {part!r} is not a section of the params")
        node = node[part]
    node[last] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--params", type=Path, default=MICRO_PARAMS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one setting, e.g. backdoor.fraction=0.05")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from stagediff.config import read_params

    if args.workspace.exists():
        raise SystemExit(f"{args.workspace}: exists; give a new directory")
    params = read_params(args.params)
    for item in args.set:
        key, _, raw = item.partition("=")
        set_dotted(params, key, json.loads(raw))
    root = make_workspace(args.workspace, params)
    return subprocess.run(["dvc", "repro"], cwd=root, env=stagediff_env()).returncode


if __name__ == "__main__":
    sys.exit(main())
