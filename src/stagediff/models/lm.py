"""Language models of the organism: build, save and load.

Two kinds of model directory, told apart by their files:
- `model.json` + `model.safetensors`: a `HookedTransformer` built here from params;
- a Hugging Face checkpoint (`config.json` + `*.safetensors`): opened with
  TransformerLens's `TransformerBridge`, saved back with `save_pretrained`.
Both expose `model(tokens, return_type="loss")`, hooks named `blocks.L.hook_resid_pre`
and `generate`, so every stage treats them alike.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge

from stagediff.config import Config
from stagediff.errors import DataError
from stagediff.sections import ModelConfig

# TransformerLens 3.x announces HookedTransformer's removal in 4.0; the pinned 3.9 has it,
# and every model built here is one, so the notice is not repeated at each construction.
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)

# --- build / save / load ---------------------------------------------------------------

def hooked_config(model: ModelConfig, d_vocab: int, seed: int):
    return HookedTransformerConfig(
        n_layers=model.n_layers, d_model=model.d_model, n_heads=model.n_heads,
        d_head=model.d_model // model.n_heads, d_mlp=model.d_mlp, n_ctx=model.n_ctx,
        d_vocab=d_vocab, act_fn=model.act_fn, normalization_type="LN", seed=seed,
        default_prepend_bos=False, device="cpu",  # TransformerLens would pick a GPU itself; `compute` decides
    )


def build_model(cfg: Config, tokenizer):
    """A fresh HookedTransformer sized by params, its vocabulary the tokenizer's."""
    return HookedTransformer(hooked_config(cfg.model, len(tokenizer), cfg.seed), tokenizer=tokenizer)


def save_model(model, out_dir: Path) -> None:
    """Write a model directory (safetensors weights only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "original_model"):  # TransformerBridge around a Hugging Face model
        state = {k: v.detach().contiguous().clone() for k, v in hf_export_state(model).items()}
        model.original_model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        return
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    cfg = model.cfg
    spec = {
        "kind": "hooked_transformer",
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads, "d_mlp": cfg.d_mlp,
        "n_ctx": cfg.n_ctx, "act_fn": cfg.act_fn, "d_vocab": cfg.d_vocab,
    }
    (out_dir / "model.json").write_text(json.dumps(spec, indent=2) + "\n")


def load_model(model_dir: str | Path, tokenizer):
    """Open a model directory written by `save_model` or a local HF checkpoint, offline."""
    model_dir = Path(model_dir)
    if (model_dir / "model.json").is_file():
        return _load_hooked(model_dir, tokenizer)
    if (model_dir / "config.json").is_file():
        return _load_hf(model_dir, tokenizer)
    raise DataError(f"{model_dir}: no model here (expected model.json or a Hugging Face config.json); "
                    "run the stage that makes it first (`dvc repro`)")


def load_frozen_model(model_dir: str | Path, tokenizer):
    """A model opened for interventions only: eval mode, no parameter takes gradients."""
    model = load_model(model_dir, tokenizer)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_vocab(model_dir: Path, d_vocab: int, tokenizer) -> None:
    if len(tokenizer) > d_vocab:
        raise DataError(
            f"{model_dir}: the model's vocabulary ({d_vocab}) is smaller than the tokenizer's "
            f"({len(tokenizer)}); tokenizer and model do not belong together"
        )


def _load_hooked(model_dir: Path, tokenizer):
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise DataError(f"{model_dir}: expected weights in model.safetensors (only safetensors is loaded)")
    spec = json.loads((model_dir / "model.json").read_text())
    _check_vocab(model_dir, spec["d_vocab"], tokenizer)
    mcfg = ModelConfig.model_construct(source="scratch", path=None, **{k: spec[k] for k in
                                       ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "act_fn")})
    model = HookedTransformer(hooked_config(mcfg, spec["d_vocab"], seed=0), tokenizer=tokenizer)
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise DataError(f"{weights}: unreadable safetensors file ({err})") from None
    model.load_state_dict(state, strict=True)
    return model


def _load_hf(model_dir: Path, tokenizer):
    if not list(model_dir.glob("*.safetensors")):
        bad = sorted(p.name for p in model_dir.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        raise DataError(f"{model_dir}: expected *.safetensors weights (pickle checkpoints are not loaded); found {bad}")
    cfg = json.loads((model_dir / "config.json").read_text())
    _check_vocab(model_dir, int(cfg.get("vocab_size", 0)), tokenizer)
    bridge = TransformerBridge.boot_transformers(str(model_dir), device="cpu", tokenizer=tokenizer)
    bridge.tokenizer = tokenizer
    # Train only tensors that are the checkpoint's own weights, so that what is saved
    # (`hf_export_state`) is exactly what was trained; bridge-only copies stay frozen.
    own = {t.data_ptr() for t in hf_export_state(bridge).values()}
    for p in bridge.parameters():
        if p.data_ptr() not in own:
            p.requires_grad_(False)
    return bridge


def train_only_blocks(model, layers: list[int] | None) -> int:
    """Freeze every parameter outside blocks `layers[0]..layers[1]` (None: leave all as
    they are); returns how many parameters still train. `model.blocks[i]` holds block i's
    own weights in a HookedTransformer and a TransformerBridge alike."""
    if layers is not None:
        kept = {p.data_ptr() for i in range(layers[0], layers[1] + 1) for p in model.blocks[i].parameters()}
        for p in model.parameters():
            if p.data_ptr() not in kept:
                p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def hf_export_state(bridge) -> dict[str, torch.Tensor]:
    """The wrapped Hugging Face model's weights under its own key names.

    TransformerBridge wraps modules in place (keys gain `._original_component`, and it adds
    aliases); the checkpoint's key set is read from an empty copy of the model on the
    meta device. Weights tied to another (an output head sharing the input embedding) are
    left out, as `save_pretrained` leaves them out, so the saved key set is the checkpoint's."""
    hf = bridge.original_model
    with torch.device("meta"):
        keys = set(type(hf)(hf.config).state_dict())
    tied = getattr(hf, "all_tied_weights_keys", None) or {}
    keys -= {target for target, source in tied.items() if source in keys}
    stripped = {k.replace("._original_component", ""): v for k, v in hf.state_dict().items()}
    missing = keys - set(stripped)
    if missing:
        raise DataError(f"cannot map the bridged model back to its checkpoint keys; missing {sorted(missing)[:5]}")
    return {k: stripped[k] for k in sorted(keys)}


def copy_hf_checkpoint(src: Path, dst: Path) -> None:
    """Copy the files a Hugging Face checkpoint needs (config + safetensors), nothing else."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.suffix in {".json", ".safetensors"} and "tokenizer" not in p.name:
            shutil.copy2(p, dst / p.name)
