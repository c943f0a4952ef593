"""Stage `import@<role>`: copy one of your inputs (params `inputs.<role>`) into the project.

DVC tracks the file or folder named in params as this stage's dependency and the copy
(`data/inputs/<role>/imported`) as its output: edit your data or re-save a checkpoint and
`dvc status` names `import@<role>`; `dvc repro` re-imports it and reruns exactly what
reads it. Only what the pipeline may load is copied: a checkpoint's config, safetensors
weights, tokenizer and generation files (pickle checkpoints are refused). A `.gguf` model
file is dequantised into a float32 checkpoint folder (`models/gguf.py`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stagediff.config import Config
from stagediff.errors import DataError
from stagediff.io import atomic_dir, copy_file
from stagediff.layout import INPUT_ROLES, MODEL_ROLES, input_path
from stagediff.models.checkpoints import KEPT_SUFFIXES, check_weights, read_config
from stagediff.models.gguf import convert_gguf, is_gguf


def run(cfg: Config, role: str) -> dict:
    if role not in cfg.inputs:
        raise DataError(f"import: inputs.{role} is not set in params; expected one of {', '.join(cfg.inputs) or 'none'}")
    source = Path(cfg.inputs[role])
    target = input_path(role)
    if role in MODEL_ROLES.values() and is_gguf(source):
        with atomic_dir(target) as tmp:
            written = convert_gguf(source, tmp)
        return {"role": role, "files": 1, "converted_from": "gguf", **written}
    if role in MODEL_ROLES.values():
        read_config(source)
        check_weights(source)
        copied = [p for p in sorted(source.iterdir()) if p.is_file() and p.suffix in KEPT_SUFFIXES]
        with atomic_dir(target) as tmp:
            for p in copied:
                shutil.copy2(p, tmp / p.name)
    else:
        _check_text(source, role)
        copy_file(source, target)
        copied = [source]
    return {"role": role, "files": len(copied)}


def _check_text(path: Path, role: str) -> None:
    """Refuse a data file that is empty or not UTF-8 text, naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"inputs.{role}: {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        f"expected a {INPUT_ROLES[role]}") from None
    if not text.strip():
        raise DataError(f"inputs.{role}: {path} is empty; expected a {INPUT_ROLES[role]}")
