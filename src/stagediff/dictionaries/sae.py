"""The sparse autoencoder of every stage: a sae_lens SAE, built, saved and loaded here
(trained by `stagediff.dictionaries.sae_training`).

- `build_sae` makes the sae_lens training SAE that params ask for (standard/L1, TopK,
  BatchTopK); its own `training_forward_pass` gives the loss.
- An SAE directory holds the sae_lens format (`cfg.json` + `sae_weights.safetensors`,
  normalisation folded in so `SAE.load_from_disk` works on raw activations) and
  `training_state.safetensors`, the unfolded training weights a child stage starts from.

SAEs train on activations multiplied by their cache's scaling factor (sqrt(d_in) / mean
norm), as SAELens does, and the factor is folded into the saved inference weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from safetensors.torch import load_file, save_file

from stagediff.errors import DataError
from stagediff.io import write_json
from stagediff.sections import SAEConfig

TRAINING_STATE = "training_state.safetensors"
STAGE_INFO = "stagediff.json"


# --- the SAE ---------------------------------------------------------------------------------

def build_sae(cfg: SAEConfig, d_in: int, metadata: dict | None = None):
    """A freshly initialised sae_lens training SAE of the configured architecture."""
    common = {"d_in": d_in, "d_sae": cfg.d_sae, "decoder_init_norm": cfg.decoder_init_norm,
              "metadata": SAEMetadata(**(metadata or {}))}
    if cfg.architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(
            l1_coefficient=cfg.l1_coefficient, l1_warm_up_steps=cfg.l1_warm_up_steps, **common))
    if cfg.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient,
                                                     use_sparse_activations=cfg.sparse_decode, **common))
    return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        k=float(cfg.k), aux_loss_coefficient=cfg.aux_loss_coefficient, **common))


def save_sae(sae, out_dir: Path, scaling_factor: float | torch.Tensor, info: dict) -> None:
    """Write the sae_lens inference format (normalisation folded in), the training weights
    and `stagediff.json` (architecture, scaling factor, provenance). `scaling_factor` is
    one constant, or one per input dimension (the crosscoder's two halves): folded with
    sae_lens's affine fold (a diagonal whitening), so the saved SAE reads raw activations."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, str(out_dir / TRAINING_STATE))
    inference = copy.deepcopy(sae)
    if not isinstance(scaling_factor, torch.Tensor):
        inference.fold_activation_norm_scaling_factor(scaling_factor)
    if sae.cfg.architecture() == "batchtopk":
        inference.save_inference_model(str(out_dir))  # a JumpReLU SAE with the learned threshold
    else:
        inference.save_model(str(out_dir))
    if isinstance(scaling_factor, torch.Tensor):
        # one constant per input dimension: folded into the saved inference SAE (after any
        # decoder-norm rescaling was folded by sae_lens) with its affine fold, a diagonal whitening
        scales = scaling_factor.double()
        folded = SAE.load_from_disk(str(out_dir), device="cpu")
        folded.fold_activation_whitening(torch.zeros_like(scales), torch.diag(scales), torch.diag(1 / scales))
        folded.to(torch.float32)
        folded.save_model(str(out_dir))
        scaling_factor = "per input dimension (folded)"
    # sae_lens writes cfg.json's keys in an order that varies between processes; sorted,
    # the same SAE always gives the same bytes (DVC sees no change on a rerun).
    cfg_file = out_dir / "cfg.json"
    write_json(cfg_file, json.loads(cfg_file.read_text()))
    meta = {"architecture": sae.cfg.architecture(), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
            "scaling_factor": scaling_factor, **info}
    (out_dir / STAGE_INFO).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_stage_info(sae_dir: Path) -> dict:
    path = Path(sae_dir) / STAGE_INFO
    if not path.is_file():
        raise DataError(f"{sae_dir}: no SAE stage output here (no {STAGE_INFO}); run its stage first (`dvc repro`)")
    return json.loads(path.read_text())


def load_training_state(sae, sae_dir: Path) -> None:
    """Initialise `sae` with a parent stage's training weights (exactly, no refolding)."""
    info = read_stage_info(sae_dir)
    want = {"architecture": sae.cfg.architecture(), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae}
    got = {k: info.get(k) for k in want}
    if got != want:
        raise DataError(f"{sae_dir}: the parent SAE is {got}, this stage builds {want} "
                        "(sae.* params or the cache's d_in changed since the parent was trained)")
    try:
        state = load_file(str(Path(sae_dir) / TRAINING_STATE))
    except Exception as err:
        raise DataError(f"{Path(sae_dir) / TRAINING_STATE}: unreadable ({err})") from None
    sae.load_state_dict(state, strict=True)


def load_inference_sae(sae_dir: Path):
    """The saved SAE as users open it: `sae_lens.SAE.load_from_disk` (raw activations in)."""
    read_stage_info(sae_dir)
    return SAE.load_from_disk(str(sae_dir), device="cpu")
