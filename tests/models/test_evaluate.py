"""Clean next-token loss: the window-weighted mean of the batches' losses, with or without
an intervention."""

from __future__ import annotations

import pytest
import torch

from helpers import HOOK
from stagediff.dictionaries.splice import direction_hooks
from stagediff.models.evaluate import mean_loss, windows_loss


def test_windows_loss_is_the_mean_over_windows_whatever_the_batch(model):
    windows = torch.randint(0, model.cfg.d_vocab, (5, 12), generator=torch.Generator().manual_seed(0))
    by_hand = sum(float(model(windows[i : i + 1], return_type="loss")) for i in range(5)) / 5
    assert windows_loss(model, windows, batch_size=2) == pytest.approx(by_hand, rel=1e-5)
    assert windows_loss(model, windows, batch_size=5) == pytest.approx(by_hand, rel=1e-5)


def test_an_intervention_changes_the_loss_and_no_hooks_do_not(model):
    windows = torch.randint(0, model.cfg.d_vocab, (4, 12), generator=torch.Generator().manual_seed(1))
    plain = windows_loss(model, windows, 2)
    assert windows_loss(model, windows, 2, hooks_for=lambda t, s: []) == plain
    push = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2)) * 5
    assert windows_loss(model, windows, 2, hooks_for=lambda t, s: direction_hooks(HOOK, t, s, add=push)) != plain


def test_mean_loss_reads_the_first_windows_of_a_stream(model):
    stream = {"tokens": torch.randint(0, model.cfg.d_vocab, (64 * 6,), generator=torch.Generator().manual_seed(3))}
    n_ctx = model.cfg.n_ctx
    windows = stream["tokens"][: (len(stream["tokens"]) // n_ctx) * n_ctx].long().view(-1, n_ctx)
    assert mean_loss(model, stream, n_ctx, 4, max_windows=2) == pytest.approx(windows_loss(model, windows[:2], 4))


def test_a_pass_resumed_at_the_hook_layer_gives_the_full_pass_loss(model):
    """windows_loss from the cached residual stream entering layer 1 equals the full pass,
    with no intervention and with one at that layer, batch by batch."""
    from stagediff.models.evaluate import resume_point

    windows = torch.randint(0, model.cfg.d_vocab, (5, 12), generator=torch.Generator().manual_seed(4))
    resumed = resume_point(model, windows, layer=1, batch_size=2)
    assert resumed.resid.shape == (5, 12, model.cfg.d_model)
    push = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5)) * 5
    for hooks_for in (None, lambda t, s: direction_hooks(HOOK, t, s, add=push)):
        assert windows_loss(model, windows, 2, hooks_for, resumed) == windows_loss(model, windows, 2, hooks_for)
