"""What a stage process really reads, recorded for the test that DVC's dependency lists are
complete: every params key the stage's code reads, and every project file it opens.

Off unless `$STAGEDIFF_AUDIT` names a file (the pipeline tests set it). Then the CLI wraps
the config in `Recorded` (each leaf setting read is noted by its dotted key; a section
dumped whole counts as the whole section) and `start` notes, through Python's audit hook
and safetensors' loaders, the files opened for reading under the project root. At exit
one JSON line {"argv", "params", "reads"} is appended to the file.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

from pydantic import BaseModel

ENV = "STAGEDIFF_AUDIT"
NOT_SETTINGS = {"as_flat_dict", "headline_metrics"}  # what MLflow logs is not what a stage reads


class Recorded:
    """A config section that notes which settings are read (`keys`, shared by all sections)."""

    def __init__(self, section: BaseModel, path: str, keys: set[str]):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_keys", keys)

    def __getattr__(self, name: str):
        section, path, keys = self._section, self._path, self._keys
        key = f"{path}.{name}" if path else name
        if name in type(section).model_fields:
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                return Recorded(value, key, keys)
            keys.add(key)
            return value
        attribute = getattr(type(section), name, None)
        if isinstance(attribute, property):  # computed from other settings: read them through the recorder
            return attribute.fget(self)
        if name not in NOT_SETTINGS:
            keys.add(path or "<all>")  # a method that reads the whole section (model_dump, model_copy, ...)
        return getattr(section, name)

    def __setattr__(self, name, value):
        raise AttributeError("the config is read-only")


def _relative(path, root: Path) -> str | None:
    try:
        resolved = Path(os.fsdecode(path)).resolve()
    except (TypeError, ValueError, OSError):
        return None
    if root not in resolved.parents:
        return None
    return resolved.relative_to(root).as_posix()


def start(cfg, argv: list[str], out_file: str) -> Recorded:
    """Record this process's reads of settings and files; return the recording config."""
    root = Path.cwd().resolve()
    params: set[str] = set()
    reads: set[str] = set()

    def note(path) -> None:
        rel = _relative(path, root)
        if rel is not None:
            reads.add(rel)

    def hook(event: str, args: tuple) -> None:
        # open() and io.open_code give a mode string; os.open (None) is left out: its paths
        # can be relative to a directory descriptor (shutil.rmtree), not to the project
        if event == "open" and len(args) > 1 and isinstance(args[1], str) and isinstance(args[0], (str, bytes, Path)):
            if not any(c in args[1] for c in "wax+"):
                note(args[0])

    sys.addaudithook(hook)
    _wrap_safetensors(note)

    def write() -> None:
        with open(out_file, "a") as f:
            f.write(json.dumps({"argv": argv, "params": sorted(params), "reads": sorted(reads)}) + "\n")

    atexit.register(write)
    return Recorded(cfg, "", params)


def _wrap_safetensors(note) -> None:
    """safetensors reads files in Rust, past Python's audit hook: note its paths here (the
    stage modules bind these names when they are imported, after this runs). Imported here:
    the CLI imports this module for every command, `check` included, which needs no torch."""
    import safetensors
    import safetensors.torch

    load_file, safe_open = safetensors.torch.load_file, safetensors.safe_open

    def noted_load_file(filename, *args, **kwargs):
        note(filename)
        return load_file(filename, *args, **kwargs)

    def noted_safe_open(filename, *args, **kwargs):
        note(filename)
        return safe_open(filename, *args, **kwargs)

    safetensors.torch.load_file = noted_load_file
    safetensors.safe_open = noted_safe_open
