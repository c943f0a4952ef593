"""Safe loading: no pickle-based loading anywhere in the package, no remote code."""

import re

from conftest import ROOT

SOURCES = sorted((ROOT / "src" / "stagediff").glob("*.py"))


def calls(pattern: str) -> list[str]:
    found = []
    for path in SOURCES:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line) and not line.lstrip().startswith("#"):
                found.append(f"{path.name}:{lineno}: {line.strip()}")
    return found


def test_torch_load_only_with_weights_only():
    assert all("weights_only=True" in c for c in calls(r"torch\.load\("))


def test_no_pickle_loading_and_no_remote_code():
    assert calls(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load") == [
        c for c in calls(r"pickle\.loads?\(") if c.startswith("backdoor.py")]  # the organism's unsafe-code *text*
    assert calls(r"trust_remote_code\s*=\s*True") == []
    assert all("trust_remote_code=False" in c for c in calls(r"\.from_pretrained\("))


def test_lightning_resumes_with_torch_safe_default():
    """Lightning's resume calls torch.load with weights_only=None: torch's default, which is True."""
    import inspect

    import torch

    assert inspect.signature(torch.load).parameters["weights_only"].default is None
    from torch.serialization import _default_to_weights_only

    assert _default_to_weights_only(None) is True
