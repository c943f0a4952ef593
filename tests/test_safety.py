"""Safe loading: no pickle-based loading anywhere in the package, no remote code."""

import re
from pathlib import Path

from helpers import ROOT

SOURCES = sorted((ROOT / "src" / "stagediff").rglob("*.py"))


def calls(pattern: str, sources: list[Path] = SOURCES) -> list[str]:
    found = []
    for path in sources:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line) and not line.lstrip().startswith("#"):
                found.append(f"{path.name}:{lineno}: {line.strip()}")
    return found


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scans below can fail: a file with the calls they forbid is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("x = torch.load(f)\ny = pickle.load(f)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n")
    assert len(calls(r"torch\.load\(", [bad])) == 1 and len(calls(r"\bpickle\.loads?\(", [bad])) == 1
    assert len(calls(r"trust_remote_code\s*=\s*True", [bad])) == 1


def test_no_torch_load_at_all():
    """Weights are safetensors everywhere; Lightning's resume is the only torch.load (below)."""
    assert calls(r"torch\.load\(") == []


def test_no_pickle_loading_and_no_remote_code():
    pickle_calls = calls(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load")
    # only the organism's unsafe-code *text* (the code_vuln backdoor writes `pickle.loads(...)` as data)
    assert pickle_calls and all(c.startswith("code_tasks.py") and '"' in c.split(":", 2)[2] for c in pickle_calls)
    assert calls(r"trust_remote_code\s*=\s*True") == []
    loaders = calls(r"\.from_pretrained\(")
    assert loaders and all("trust_remote_code=False" in c for c in loaders)


def test_lightning_resumes_with_torch_safe_default():
    """Lightning's resume calls torch.load with weights_only=None: torch's default, which is True."""
    import inspect

    import torch

    assert inspect.signature(torch.load).parameters["weights_only"].default is None
    from torch.serialization import _default_to_weights_only

    assert _default_to_weights_only(None) is True
