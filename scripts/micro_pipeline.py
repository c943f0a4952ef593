"""Run the real pipeline in a fresh workspace (params.yaml with the micro overlay unless told otherwise).

    python scripts/micro_pipeline.py DIR [--params params.yaml] [--overlay FILE ...] [--set key=JSON ...]
    python scripts/micro_pipeline.py DIR --overlay presets/gpu.yaml       # a preset instead of the micro overlay
    python scripts/micro_pipeline.py DIR --no-overlay                     # the default configuration

Copies `dvc.yaml`, `src/` and the composed params (params.yaml, each overlay merged over it
by `stagediff.config.compose_params`, then the --set values) into DIR, which must not
exist; runs `dvc init --no-scm` and `dvc repro` there with the copied `src/` first on the
Python path (the code DVC hashes is the code that runs), and exits with `dvc repro`'s
status. The tests and the pipeline benchmark build their workspaces with `make_workspace`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from stagediff.config import compose_params  # noqa: E402
from stagediff.errors import ConfigError  # noqa: E402

MICRO_OVERLAY = ROOT / "tests" / "params_micro.yaml"


def stagediff_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("STAGEDIFF_PIPELINE_ID", "micro")
    return env


def workspace_env(root: Path) -> dict:
    """`stagediff_env()` running the workspace's own copy of the package."""
    env = stagediff_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(root).resolve() / "src"), env.get("PYTHONPATH")) if p)
    return env


def make_workspace(dst: Path, params: dict, scm: bool = False) -> Path:
    """A runnable copy of the project (dvc.yaml, src, data/inputs, params) in `dst`, DVC
    initialised (`scm`: inside a new git repository, as `dvc exp` needs)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "dvc.yaml", dst / "dvc.yaml")
    shutil.copytree(ROOT / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # the committed input folders (their READMEs), which the stages that read your inputs depend on
    shutil.copytree(ROOT / "data" / "inputs", dst / "data" / "inputs", ignore=shutil.ignore_patterns("imported", ".*"))
    shutil.copytree(ROOT / "results", dst / "results")  # the committed aggregate over seeds the report shows
    with open(dst / "params.yaml", "w") as f:
        YAML(typ="safe", pure=True).dump(params, f)
    (dst / ".gitignore").write_text("dvc_plots/\n")
    env = stagediff_env()
    if scm:
        subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run(["dvc", "init", "-q"] if scm else ["dvc", "init", "--no-scm", "-q"], cwd=dst, env=env, check=True)
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
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--overlay", type=Path, action="append", default=None,
                        help="a YAML overlay merged over --params (repeatable; default: tests/params_micro.yaml)")
    parser.add_argument("--no-overlay", action="store_true", help="run --params as it is")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one setting, e.g. backdoor.fraction=0.05")
    args = parser.parse_args(argv)
    if args.workspace.exists():
        raise SystemExit(f"{args.workspace}: exists; give a new directory")
    overlays = [] if args.no_overlay else (args.overlay or [MICRO_OVERLAY])
    try:
        params = compose_params(args.params, *overlays)
    except ConfigError as err:
        raise SystemExit(f"micro_pipeline: {err}") from None
    for item in args.set:
        key, _, raw = item.partition("=")
        set_dotted(params, key, json.loads(raw))
    root = make_workspace(args.workspace, params)
    return subprocess.run(["dvc", "repro"], cwd=root, env=workspace_env(root)).returncode


if __name__ == "__main__":
    sys.exit(main())
