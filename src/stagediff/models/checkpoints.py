"""Hugging Face checkpoint folders as they are on disk: what they hold, and whether a base
and its fine-tunes can be compared at all.

Light on purpose (json, or a GGUF file's metadata): the config check reads a checkpoint's layer count before
any stage starts, and the `tokenizer` stage refuses an incomparable pair before any model
is loaded. The same architecture, width, depth and vocabulary are required: the method
compares one dictionary's decoder directions across the models' residual streams.
"""

from __future__ import annotations

import json
from pathlib import Path

from stagediff.errors import DataError
from stagediff.models.gguf import gguf_shape, is_gguf

CONFIG = "config.json"
# the config keys, per naming scheme, that make two checkpoints comparable
_SHAPE_KEYS = {
    "n_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "vocab_size": ("vocab_size",),
}
# files copied from a checkpoint folder (weights, config, tokenizer, generation defaults)
KEPT_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(folder: str | Path) -> dict:
    """A checkpoint's config.json (or a GGUF file's metadata, as config keys), naming the
    folder when it is missing or unreadable."""
    if is_gguf(folder):
        return gguf_shape(folder)
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise DataError(f"{folder}: not a Hugging Face checkpoint folder (no {CONFIG})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object")
    return config


def shape(config: dict) -> dict:
    """model_type, architectures, layer count, width and vocabulary size of a config."""
    out = {"model_type": config.get("model_type"), "architectures": config.get("architectures")}
    for name, keys in _SHAPE_KEYS.items():
        out[name] = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
    return out


def n_layers(folder: str | Path) -> int:
    layers = shape(read_config(folder))["n_layers"]
    if layers is None:
        raise DataError(f"{Path(folder) / CONFIG}: no layer count ({', '.join(_SHAPE_KEYS['n_layers'])})")
    return layers


def check_weights(folder: str | Path) -> None:
    """Only safetensors weights are loaded: refuse a folder that has pickles only (a GGUF
    file is converted to safetensors by its import)."""
    folder = Path(folder)
    if is_gguf(folder):
        return
    if not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        raise DataError(f"{folder}: expected *.safetensors weights (pickle checkpoints are not loaded: re-save with "
                        f"save_pretrained(..., safe_serialization=True)); found {pickles or 'no weights'}")


def vocabulary(folder: str | Path) -> dict[str, int] | None:
    """token -> id of a checkpoint's tokenizer (tokenizer.json, or vocab.json), None if it has none."""
    folder = Path(folder)
    if is_gguf(folder):  # (compared once imported: the import writes tokenizer.json)
        return None
    if (folder / "tokenizer.json").is_file():
        spec = json.loads((folder / "tokenizer.json").read_text())
        raw = spec.get("model", {}).get("vocab") or {}
        # unigram tokenizers list [piece, score] pairs: the id is the position
        vocab = {piece: i for i, (piece, _) in enumerate(raw)} if isinstance(raw, list) else dict(raw)
        vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
        return vocab
    if (folder / "vocab.json").is_file():
        return json.loads((folder / "vocab.json").read_text())
    return None


def check_pair(folders: dict[str, Path]) -> dict:
    """Refuse checkpoints that cannot be compared with the first one (the base), naming the
    folder and the mismatch: architecture, depth, width, vocabulary size or tokenizer.
    Returns the base's shape."""
    (base_role, base_dir), *others = folders.items()
    base = shape(read_config(base_dir))
    base_vocab = vocabulary(base_dir)
    for role, folder in others:
        other = shape(read_config(folder))
        for key, value in base.items():
            if other[key] != value and None not in (other[key], value):  # (None: not recorded)
                raise DataError(f"{folder} ({role}): {key} is {other[key]!r}, but the base model's ({base_dir}) is "
                                f"{value!r}; a fine-tune must keep its base's architecture, width and vocabulary")
        vocab = vocabulary(folder)
        if vocab is not None and base_vocab is not None and vocab != base_vocab:
            changed = sorted(set(vocab.items()) ^ set(base_vocab.items()))[:3]
            raise DataError(f"{folder} ({role}): its tokenizer differs from the base model's ({base_dir}), e.g. "
                            f"{changed}; both models must read the same token ids")
    return base
