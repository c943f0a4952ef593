"""ISaeRFT: s = 0 is the identity, only latents that fire move, the loss pieces on hand
cases, and the saved adapter applies again."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import HOOK, make_config, random_sae
from stagediff.analysis.causal import answer_examples
from stagediff.dictionaries.isaerft import (
    ISaeRFTDataModule,
    ISaeRFTModule,
    LatentScales,
    kl_from,
    load_adapter,
    save_adapter,
    unlikelihood,
)
from stagediff.dictionaries.sae import save_sae
from stagediff.dictionaries.splice import Splice
from stagediff.errors import DataError
from stagediff.training import fit


@pytest.fixture(scope="module")
def half_dead_sae_dir(tmp_path_factory, model):
    """A dictionary whose latents 12..23 can never fire (encoder bias far below zero)."""
    sae = random_sae(model.cfg.d_model)
    with torch.no_grad():
        sae.b_enc[12:] = -1e4
    path = tmp_path_factory.mktemp("sae")
    save_sae(sae, path, 1.0, {"hook": HOOK})
    return path


def _examples(model, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, model.cfg.d_vocab, (4 + i % 3,), generator=gen).tolist() for i in range(n)]
    answers = [torch.randint(1, model.cfg.d_vocab, (3,), generator=gen).tolist() for _ in range(n)]
    return answer_examples(prompts, answers, eot=0)


def test_answer_examples_pad_and_mark_the_answer():
    ex = answer_examples([[5, 6], [5, 6, 7]], [[8, 9], [8]], eot=0)
    assert ex["tokens"].tolist() == [[5, 6, 8, 9], [5, 6, 7, 8]]
    assert ex["target"].tolist() == [[False, False, True, True], [False, False, False, True]]


def test_unlikelihood_and_kl_hand_cases():
    vocab = 4
    logits = torch.zeros(1, 3, vocab)  # uniform: p = 1/4 for every token
    tokens = torch.tensor([[0, 1, 2]])
    target = torch.tensor([[False, True, True]])
    assert unlikelihood(logits, tokens, target).item() == pytest.approx(-math.log(1 - 1 / vocab))
    confident = torch.full((1, 3, vocab), -30.0)
    confident[0, :, 3] = 30.0  # every position predicts token 3, never the target tokens
    assert unlikelihood(confident, tokens, target).item() == pytest.approx(0, abs=1e-6)
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    assert kl_from(p, q).item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert kl_from(q, q).item() == pytest.approx(0, abs=1e-7)


def test_zero_scales_are_the_identity(model, half_dead_sae_dir):
    splice = Splice.from_dir(model, half_dead_sae_dir)
    tokens = _examples(model)["tokens"]
    module = ISaeRFTModule(splice, LatentScales(splice.d_sae), make_config().isaerft, tokens)
    assert torch.allclose(module(tokens), model(tokens), atol=1e-5)


def test_only_latents_that_fire_move(in_tmp, model, half_dead_sae_dir):
    splice = Splice.from_dir(model, half_dead_sae_dir)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = make_config({"isaerft.train.max_steps": 6, "isaerft.train.batch_size": 2, "isaerft.train.val_every": 3,
                       "isaerft.train.lr": 0.05, "isaerft.l1_coefficient": 0.0, "isaerft.train.warmup_steps": 0})
    examples = _examples(model)
    scales = LatentScales(splice.d_sae)
    module = ISaeRFTModule(splice, scales, cfg.isaerft, examples["tokens"])
    fit(module, ISaeRFTDataModule(examples, 2, seed=0, n_val=2), cfg.isaerft.train, cfg.compute, None, "test_isaerft",
        {"test": "only_latents_that_fire_move"})
    s = scales.s.detach()
    assert torch.equal(s[12:], torch.zeros(12))  # never active: no gradient, no move
    assert (s[:12].abs() > 1e-4).sum() >= 3
    # the model itself is untouched (only the scales are optimised)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_with_nothing_to_remove_nothing_moves(in_tmp, model, half_dead_sae_dir):
    """No answer tokens to push down: the unlikelihood is 0 and the clean KL is at its
    minimum at s = 0. Adam normalises even the float-rounding gradient of the KL, so a
    latent that fires jitters by about one learning-rate step, and the L1 term holds it
    there: none moves past `moved_threshold`; latents that never fire stay exactly at 0."""
    splice = Splice.from_dir(model, half_dead_sae_dir)
    cfg = make_config({"isaerft.train.max_steps": 8, "isaerft.train.batch_size": 2, "isaerft.train.val_every": 4,
                       "isaerft.train.lr": 0.01, "isaerft.train.warmup_steps": 0, "isaerft.l1_coefficient": 0.1})
    examples = _examples(model)
    examples["target"][:] = False
    assert unlikelihood(model(examples["tokens"]), examples["tokens"], examples["target"]).item() == 0
    scales = LatentScales(splice.d_sae)
    module = ISaeRFTModule(splice, scales, cfg.isaerft, examples["tokens"])
    fit(module, ISaeRFTDataModule(examples, 2, seed=0, n_val=2), cfg.isaerft.train, cfg.compute, None, "test_isaerft_idle",
        {"test": "nothing_moves"})
    s = scales.s.detach()
    assert s.abs().max() <= 2 * 0.01 < cfg.isaerft.moved_threshold
    assert torch.equal(s[12:], torch.zeros(12))


def test_adapter_round_trip(tmp_path, model, half_dead_sae_dir):
    splice = Splice.from_dir(model, half_dead_sae_dir)
    s = torch.linspace(-0.5, 0.5, splice.d_sae)
    save_adapter(s, tmp_path / "adapter", {"dictionary": str(half_dead_sae_dir), "hook": HOOK})
    loaded_splice, edit = load_adapter(tmp_path / "adapter", model)
    tokens = _examples(model)["tokens"]
    expected = model.run_with_hooks(tokens, fwd_hooks=splice.hooks(tokens, 0, lambda f: f * (1 + s)))
    got = model.run_with_hooks(tokens, fwd_hooks=loaded_splice.hooks(tokens, 0, edit))
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, model(tokens), atol=1e-4)


def test_adapter_of_another_width_or_missing_is_refused(tmp_path, model, half_dead_sae_dir):
    save_adapter(torch.zeros(7), tmp_path / "bad", {"dictionary": str(half_dead_sae_dir), "hook": HOOK})
    with pytest.raises(DataError, match="7 scales for a dictionary of 24"):
        load_adapter(tmp_path / "bad", model)
    with pytest.raises(DataError, match="no ISaeRFT adapter"):
        load_adapter(tmp_path / "nothing", model)


def test_too_few_prompts_to_train():
    with pytest.raises(DataError, match="none to train on"):
        ISaeRFTDataModule(answer_examples([[1, 2]], [[3]], eot=0), 2, seed=0, n_val=1)
