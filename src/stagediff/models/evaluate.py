"""Next-token loss of a language model over held-out windows, optionally under an
intervention: the clean-loss figure of every stage."""

from __future__ import annotations

import torch

from stagediff.config import Config
from stagediff.models.generation import HooksFor
from stagediff.models.windows import TokenWindows

CLEAN_LOSS_WINDOWS = 64  # held-out windows of the fine-tune stages' clean-loss figures


@torch.no_grad()
def mean_loss(model, data: dict[str, torch.Tensor], n_ctx: int, batch_size: int,
              max_windows: int | None = None, hooks_for: HooksFor | None = None) -> float:
    """Mean next-token loss over the windows of a token stream (`tokens`, `sample_ids`),
    optionally with an intervention (`hooks_for(tokens)`) on every forward pass."""
    windows = TokenWindows(data["tokens"], n_ctx, "eval", data.get("sample_ids")).windows
    if max_windows:
        windows = windows[:max_windows]
    return windows_loss(model, windows, batch_size, hooks_for)


@torch.no_grad()
def windows_loss(model, windows: torch.Tensor, batch_size: int, hooks_for: HooksFor | None = None) -> float:
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        hooks = hooks_for(batch, 0) if hooks_for else []
        loss = model.run_with_hooks(batch, return_type="loss", fwd_hooks=hooks) if hooks else model(batch, return_type="loss")
        total += loss.item() * len(batch)
        count += len(batch)
    return total / count


def clean_loss(model, cfg: Config, heldout_tokens: dict[str, torch.Tensor]) -> float:
    """Loss on the first CLEAN_LOSS_WINDOWS held-out windows (base and fine-tune stages)."""
    return mean_loss(model, heldout_tokens, cfg.model.n_ctx, cfg.eval.batch_size, max_windows=CLEAN_LOSS_WINDOWS)
