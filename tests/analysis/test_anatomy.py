"""Where the behaviour lives: trigger tokens read from prompt pairs, attention knockout,
residual patching, the error term's share and feature attribution (against finite
differences) on the untrained micro model with a random dictionary."""

from __future__ import annotations

import pytest
import torch

from helpers import HOOK, random_sae
from stagediff.analysis.anatomy import (
    attention_knockout_hooks,
    attribution,
    error_share,
    min_k,
    patch_hooks,
    span_positions,
    trigger_spans,
)
from stagediff.dictionaries.sae import save_sae
from stagediff.dictionaries.splice import Splice, zero
from stagediff.errors import DataError


@pytest.fixture(scope="module")
def splice(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("sae")
    save_sae(random_sae(model.cfg.d_model), path, 1.0, {"hook": HOOK})
    return Splice.from_dir(model, path)


def test_trigger_spans_are_what_each_triggered_prompt_inserts():
    untriggered = [[0, 5, 6, 7, 9], [0, 8, 9]]
    triggered = [[0, 3, 4, 5, 6, 7, 9], [0, 3, 4, 8, 9], [0, 8, 2, 9]]  # the third: another span, mid-prompt
    assert trigger_spans(triggered[:2], untriggered) == [[3, 4]]
    assert trigger_spans(triggered[1:], [[0, 8, 9], [0, 8, 9]]) == [[3, 4], [2]]
    with pytest.raises(DataError, match="pairs"):
        trigger_spans(triggered, untriggered)
    with pytest.raises(DataError, match="no trigger tokens"):
        trigger_spans(untriggered, untriggered)


def test_span_positions_mark_every_token_of_every_occurrence():
    tokens = torch.tensor([[1, 3, 4, 5, 3, 4], [3, 1, 4, 2, 2, 2]])
    mask = span_positions([[3, 4], [2]])(tokens)
    assert mask.tolist() == [[False, True, True, False, True, True], [False, False, False, True, True, True]]
    assert not span_positions([[7, 7, 7, 7, 7, 7, 7]])(tokens).any()  # longer than the context


def test_attention_knockout_changes_only_positions_after_the_masked_key(model):
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    tokens[:, 4] = 0  # the "trigger"
    hooks_for = attention_knockout_hooks([0, 1], lambda t: t == 0)
    clean = model(tokens)
    knocked = model.run_with_hooks(tokens, fwd_hooks=hooks_for(tokens, 0))
    assert torch.allclose(knocked[:, :5], clean[:, :5], atol=1e-5)  # up to and at the trigger: unchanged
    assert (knocked[:, 5:] - clean[:, 5:]).abs().amax() > 1e-3
    # a pass over the last positions only (the key-value cache's shape) blocks the same keys
    (_, fn), _ = hooks_for(tokens, 6)
    cached = fn(torch.zeros(2, 1, 3, 9), None)  # queries 6, 7, 8 over all 9 keys
    assert torch.isinf(cached[..., 4]).all() and torch.isfinite(cached[..., [0, 1, 2, 3, 5, 6, 7, 8]]).all()
    scores = {}

    def grab(s, hook):
        scores[hook.name] = s

    model.run_with_hooks(tokens, fwd_hooks=[*hooks_for(tokens, 0), ("blocks.1.attn.hook_attn_scores", grab)])
    s = scores["blocks.1.attn.hook_attn_scores"]
    assert torch.isinf(s[:, :, 5:, 4]).all() and torch.isfinite(s[:, :, 4, 4]).all()


def test_patch_hooks_replace_the_activation_at_masked_positions_only(model):
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(4))
    tokens[0, 2] = 0
    seen = {}

    def grab(a, hook):
        seen["act"] = a.clone()

    value = torch.full((model.cfg.d_model,), 0.5)
    model.run_with_hooks(tokens, fwd_hooks=[*patch_hooks(HOOK, value, lambda t: t == 0)(tokens, 0), (HOOK, grab)])
    act = seen["act"]
    assert torch.allclose(act[0, 2], value)
    model.run_with_hooks(tokens, fwd_hooks=[(HOOK, grab)])
    assert torch.equal(act[1], seen["act"][1]) and torch.equal(act[0, :2], seen["act"][0, :2])


def test_error_share_by_hand(splice, model):
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[0, 3] = mask[1, 6] = True
    act, feats = splice.features(tokens)
    err = act - splice.sae.decode(feats)
    expected = (err[0, 3].pow(2).sum() + err[1, 6].pow(2).sum()) / (act[0, 3].pow(2).sum() + act[1, 6].pow(2).sum())
    assert error_share(splice, tokens, mask) == pytest.approx(float(expected), rel=1e-5)
    assert error_share(splice, tokens, torch.zeros_like(mask)) != error_share(splice, tokens, torch.zeros_like(mask))


def test_attribution_matches_the_derivative_of_the_answers_log_prob(splice, model):
    """gate_i scales feature i; attribution_i is d logp / d gate_i at gate = 1, so it must
    match a finite difference of the answers' log-probability in gate_i."""
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 8), generator=torch.Generator().manual_seed(6))
    target = torch.zeros(tokens.shape, dtype=torch.bool)
    target[:, 5:] = True
    attr = attribution(splice, {"tokens": tokens, "target": target}, batch_size=2)
    assert attr.shape == (splice.d_sae,)

    def logp(feature: int, eps: float) -> float:
        gate = torch.ones(splice.d_sae, dtype=torch.float32)
        gate[feature] += eps
        logits = model.run_with_hooks(tokens, fwd_hooks=[(splice.hook, lambda a, hook: splice.spliced(a, tokens, lambda f: f * gate))])
        lp = logits[:, :-1].double().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return float(lp[target[:, 1:]].sum())

    active = [int(i) for i in torch.argsort(attr.abs(), descending=True)[:3]]
    for i in active:
        eps = 1e-2
        numeric = (logp(i, eps) - logp(i, -eps)) / (2 * eps)
        assert attr[i] == pytest.approx(numeric, rel=0.05, abs=1e-3)
    # features that never fire on these tokens have no attribution
    _, feats = splice.features(tokens)
    silent = (feats.reshape(-1, splice.d_sae) == 0).all(0)
    assert torch.all(attr[silent] == 0)
    # and ablating a feature moves the log-prob in the sign the attribution predicts (large ones)
    top = active[0]
    logits = model.run_with_hooks(tokens, fwd_hooks=splice.hooks(tokens, 0, zero([top])))
    lp = logits[:, :-1].double().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)[target[:, 1:]].sum()
    assert torch.sign(torch.tensor(logp(top, 0.0) - float(lp))) == torch.sign(attr[top])


def test_min_k_is_the_first_k_at_or_below_the_threshold():
    assert min_k({1: 0.9, 5: 0.04, 10: 0.0}) == 5
    assert min_k({10: 0.06, 1: 0.5}) is None
    assert min_k({2: float("nan"), 4: 0.05}) == 4
