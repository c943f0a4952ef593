"""The CLI: every command dispatches to its stage module, and a stage imports only the heavy
libraries it uses (the start-up each `dvc repro` pays 25 times)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT
from stagediff.cli import COMMANDS, build_parser

HEAVY = ("lightning", "sae_lens", "transformer_lens", "great_expectations", "seaborn", "mlflow")
# what each stage module may pull in at import: the libraries its own work needs
BUDGET = {
    "inputs": set(),
    "corpus": {"mlflow"},
    "tokenizer": {"mlflow"},
    "activations": {"mlflow", "transformer_lens"},
    "validate": {"mlflow", "great_expectations"},
    "diff": {"mlflow", "transformer_lens", "sae_lens"},
    "steer": {"mlflow", "transformer_lens", "sae_lens"},
    "adl": {"mlflow", "transformer_lens"},
    "yardstick": {"mlflow"},
    "report": {"mlflow", "seaborn"},
    "gate": set(),
    "ui": set(),
}


def imported_heavy(module: str) -> set[str]:
    code = (f"import sys, json; import stagediff.stages.{module}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", sorted(BUDGET))
def test_a_stage_imports_only_the_libraries_it_uses(module):
    assert imported_heavy(module) <= BUDGET[module]


def test_config_check_imports_no_heavy_library():
    code = ("import sys, json; from stagediff.cli import main; main(['check']); "
            f"print(json.dumps([m for m in {HEAVY!r} + ('torch',) if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_every_command_names_an_existing_stage_module_with_run():
    import importlib

    parser = build_parser()
    for name, (module, _, _) in COMMANDS.items():
        assert callable(importlib.import_module(f"stagediff.stages.{module}").run), name
        required = {"activations": ["--model", "base"], "sae": ["--stage", "S"], "import": ["--role", "base_data"]}
        parser.parse_args([name, *required.get(name, [])])
