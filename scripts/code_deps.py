"""Which package files each DVC stage runs, from the imports, against what `dvc.yaml` declares.

    python scripts/code_deps.py            # list every stage whose code deps differ (exit 1 if any)
    python scripts/code_deps.py --print    # the expected code deps of every stage, as YAML lines
    python scripts/code_deps.py --write    # rewrite dvc.yaml's code deps to the expected ones

A stage's code is `stagediff/cli.py` (which loads the config and dispatches) and its
command's module `stagediff/stages/<module>.py`, with every package module they import,
transitively (imports inside functions too), and the `__init__.py` of every package on
the way (Python runs them on import). `tests/test_code_deps.py` runs the same check.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stagediff"


def _module_file(src: Path, module: str) -> Path | None:
    base = src.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(src: Path, module: str) -> list[str]:
    """The module and every package above it (their __init__ runs first)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(path: Path) -> set[str]:
    """Package modules a file imports (anywhere in it, except under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == PACKAGE:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def closure(src: Path, roots: list[str], exclude: set[str] = frozenset()) -> set[Path]:
    """Files of `roots` and of everything they import, transitively (modules in `exclude`
    are neither followed nor listed: the CLI's lazily imported stage modules)."""
    seen: set[str] = set()
    todo = [m for r in roots for m in _with_parents(src, r)]
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen or module in exclude:
            continue
        seen.add(module)
        file = _module_file(src, module)
        if file is None:  # a name imported from a module, not a module
            continue
        files.add(file)
        for imported in imported_modules(file):
            todo.extend(_with_parents(src, imported))
    return files


def stage_commands(dvc_yaml: Path) -> dict[str, tuple[str, list[str]]]:
    """DVC stage name -> (stagediff command, declared deps), foreach stages under each name."""
    from ruamel.yaml import YAML

    stages = YAML(typ="safe", pure=True).load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        words = body["cmd"].split()
        if words[0] != PACKAGE:
            continue
        out[name] = (words[1], [str(d) for d in body.get("deps", [])])
    return out


def expected_code_deps(root: Path, command: str) -> list[str]:
    """Repository-relative files the command's process runs from the package."""
    sys.path.insert(0, str(root / "src"))
    try:
        from stagediff.cli import COMMANDS
    finally:
        sys.path.pop(0)
    src = root / "src"
    stage_modules = {f"{PACKAGE}.stages.{m}" for m, _, _ in COMMANDS.values()}
    module = f"{PACKAGE}.stages.{COMMANDS[command][0]}"
    files = closure(src, [f"{PACKAGE}.cli"], exclude=stage_modules) | closure(src, [module])
    return sorted(str(f.relative_to(root)) for f in files)


def differences(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """Per DVC stage whose code deps are not exactly its imports: the missing and extra files."""
    out = {}
    for name, (command, deps) in stage_commands(root / "dvc.yaml").items():
        declared = {d for d in deps if d.startswith(f"src/{PACKAGE}/")}
        want = set(expected_code_deps(root, command))
        if declared != want:
            out[name] = {"missing": sorted(want - declared), "extra": sorted(declared - want)}
    return out


def write(root: Path = ROOT) -> None:
    """Replace each stage's `src/stagediff/` deps in dvc.yaml by the expected ones (first,
    sorted), keeping every other dep, comment and anchor."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    path = root / "dvc.yaml"
    doc = yaml.load(path.read_text())
    commands = stage_commands(path)
    for name, stage in doc["stages"].items():
        if name not in commands:
            continue
        deps = stage.get("do", stage)["deps"]
        others = [d for d in deps if not str(d).startswith(f"src/{PACKAGE}/")]
        deps[:] = expected_code_deps(root, commands[name][0]) + others
    with open(path, "w") as f:
        yaml.dump(doc, f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print each stage's expected code deps")
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = parser.parse_args()
    if args.write:
        write()
        return 0
    if args.print:
        for name, (command, _) in stage_commands(ROOT / "dvc.yaml").items():
            print(f"{name}:")
            for dep in expected_code_deps(ROOT, command):
                print(f"  - {dep}")
        return 0
    diff = differences()
    for name, d in diff.items():
        print(f"{name}: missing {d['missing']}; extra {d['extra']}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
