"""Next-token loss of a language model over held-out windows, optionally under an
intervention: the clean-loss figure of every stage."""

from __future__ import annotations

from dataclasses import dataclass

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
def windows_loss(model, windows: torch.Tensor, batch_size: int, hooks_for: HooksFor | None = None,
                 resumed: ResumedWindows | None = None) -> float:
    """Mean next-token loss over `windows`, in batches of `batch_size`. With `resumed`
    (the same windows' residual stream entering a layer, from `resume_point`), each pass
    starts at that layer: the layers before it are the same under every intervention at
    or after it, so they are run once, not per intervention (same batches, same values)."""
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        hooks = hooks_for(batch, 0) if hooks_for else []
        if resumed is not None:
            loss = model.run_with_hooks(resumed.resid[start : start + batch_size], start_at_layer=resumed.layer,
                                        tokens=batch, return_type="loss", fwd_hooks=hooks)
        elif hooks:
            loss = model.run_with_hooks(batch, return_type="loss", fwd_hooks=hooks)
        else:
            loss = model(batch, return_type="loss")
        total += loss.item() * len(batch)
        count += len(batch)
    return total / count


@dataclass(frozen=True)
class ResumedWindows:
    """The residual stream entering `layer` on some windows, to resume forward passes from."""

    layer: int
    resid: torch.Tensor


@torch.no_grad()
def resume_point(model, windows: torch.Tensor, layer: int, batch_size: int) -> ResumedWindows | None:
    """The residual stream entering `layer` on `windows`, computed in the batches
    `windows_loss` uses (so a resumed pass sees exactly the values a full one would).
    None for a Hugging Face model (TransformerBridge cannot start at a layer): full passes."""
    if hasattr(model, "original_model"):
        return None
    model.eval()
    resid = [model(windows[s : s + batch_size], stop_at_layer=layer) for s in range(0, len(windows), batch_size)]
    return ResumedWindows(layer, torch.cat(resid))


def clean_loss(model, cfg: Config, heldout_tokens: dict[str, torch.Tensor]) -> float:
    """Loss on the first CLEAN_LOSS_WINDOWS held-out windows (base and fine-tune stages)."""
    return mean_loss(model, heldout_tokens, cfg.model.n_ctx, cfg.eval.batch_size, max_windows=CLEAN_LOSS_WINDOWS)
