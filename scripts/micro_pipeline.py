"""Run the real pipeline in a fresh workspace (the micro configuration unless told otherwise).

    python scripts/micro_pipeline.py DIR [--params tests/params_micro.yaml] [--preset FILE] [--set key=value ...]

Copies `dvc.yaml`, `src/` and the params file (with a preset's keys merged over it, e.g.
`--params params.yaml --preset presets/gpu.yaml`) into DIR, which must not exist; runs
`dvc init --no-scm` and `dvc repro` there with the copied `src/` first on the Python path
(the code DVC hashes is the code that runs), and exits with `dvc repro`'s status. The tests
and the pipeline benchmark build their workspaces with the same `make_workspace`.
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


def workspace_env(root: Path) -> dict:
    """`stagediff_env()` running the workspace's own copy of the package."""
    env = stagediff_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(root).resolve() / "src"), env.get("PYTHONPATH")) if p)
    return env


def merge(params: dict, preset: dict, where: str = "") -> dict:
    """`params` with a preset's keys merged in, section by section; a preset key that
    params lacks is refused (a typo would otherwise be silently added)."""
    out = dict(params)
    for key, value in preset.items():
        name = f"{where}{key}"
        if key not in params:
            raise SystemExit(f"preset key {name!r}: not a setting of the params file")
        out[key] = merge(params[key], value, name + ".") if isinstance(value, dict) and isinstance(params[key], dict) else value
    return out


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
    parser.add_argument("--preset", type=Path, help="a YAML overlay of settings merged over --params")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one setting, e.g. backdoor.fraction=0.05")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from stagediff.config import read_params

    if args.workspace.exists():
        raise SystemExit(f"{args.workspace}: exists; give a new directory")
    params = read_params(args.params)
    if args.preset:
        params = merge(params, read_params(args.preset))
    for item in args.set:
        key, _, raw = item.partition("=")
        set_dotted(params, key, json.loads(raw))
    root = make_workspace(args.workspace, params)
    return subprocess.run(["dvc", "repro"], cwd=root, env=workspace_env(root)).returncode


if __name__ == "__main__":
    sys.exit(main())
