"""ruff (configured in pyproject.toml) passes on the whole project: part of the test suite, so
CI and a local run check the same thing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def ruff() -> str:
    found = Path(sys.executable).parent / "ruff"
    return str(found) if found.is_file() else shutil.which("ruff") or "ruff"


def test_ruff_passes():
    result = subprocess.run([ruff(), "check", "src", "tests", "scripts", "bench"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_reports_a_broken_file(tmp_path):
    """The check can fail: an unused import and an undefined name are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    result = subprocess.run([ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "F401" in result.stdout and "F821" in result.stdout
