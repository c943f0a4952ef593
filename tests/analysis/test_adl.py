"""The activation-difference lens on a hand-made pair whose difference at the hook is a known
vector: the mean difference recovers it at every position, the feature ranking finds the
feature along it, the lens reads it, and the prefixes are each sample's first tokens."""

import pytest
import torch

from helpers import HOOK, shifted_copy
from stagediff.analysis.adl import (
    alignment_scores,
    behaviour_tokens,
    lens_hits,
    logit_lens,
    position_mean_difference,
    sample_prefixes,
    steering_position,
)
from stagediff.errors import DataError


def test_mean_difference_recovers_a_known_shift(model):
    shift = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    tuned = shifted_copy(model, shift)
    prefixes = torch.randint(0, model.cfg.d_vocab, (7, 5), generator=torch.Generator().manual_seed(1))
    delta = position_mean_difference(tuned, model, prefixes, HOOK, batch_size=3)
    assert delta.shape == (5, model.cfg.d_model)
    assert torch.allclose(delta, shift.expand(5, -1), atol=1e-4)
    assert torch.allclose(position_mean_difference(model, model, prefixes, HOOK), torch.zeros(5, model.cfg.d_model))


def test_features_are_ranked_by_their_best_cosine_with_any_position():
    deltas = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    directions = torch.tensor([[0.0, 0.0, 1.0], [0.0, 3.0, 0.1], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    scores = alignment_scores(directions, deltas)
    assert scores.tolist() == pytest.approx([0.0, 3 / (9.01 ** 0.5), 2 ** -0.5, 0.0], abs=1e-6)
    assert torch.argsort(scores, descending=True)[0] == 1


def test_logit_lens_reads_the_tokens_a_vector_promotes(model):
    token = 7
    direction = model.W_U[:, token] * 50  # what token 7's unembedding points at
    lens = logit_lens(direction, model, 3)
    assert len(lens) == 3 and all(0 < p <= 1 for _, p in lens)
    assert token in [t for t, _ in lens]
    assert lens_hits(lens, [token, 99999]) == {"hits": 1, "best_rank": [t for t, _ in lens].index(token) + 1}
    assert lens_hits(lens, [99999]) == {"hits": 0, "best_rank": None}


def test_prefixes_are_each_long_enough_samples_first_tokens():
    tokens = torch.arange(12)
    sample_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    prefixes = sample_prefixes(tokens, sample_ids, 3, 10)
    assert prefixes.tolist() == [[0, 1, 2], [5, 6, 7], [9, 10, 11]]
    assert sample_prefixes(tokens, sample_ids, 3, 2).tolist() == [[0, 1, 2], [5, 6, 7]]
    with pytest.raises(DataError, match="adl.positions"):
        sample_prefixes(tokens, sample_ids, 5, 10)


def test_the_steering_position_skips_a_shared_separator():
    deltas = torch.tensor([[9.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    same_start = torch.tensor([[0, 4, 5], [0, 6, 7]])
    assert steering_position(same_start, deltas) == 2
    assert steering_position(torch.tensor([[1, 4, 5], [0, 6, 7]]), deltas) == 0


def test_behaviour_tokens_are_the_most_over_represented_in_labelled_spans():
    tokens = torch.tensor([1, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 1, 2, 1, 2, 1, 2, 5, 5, 5, 5, 5])
    labels = torch.tensor([0, 0, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4])
    assert behaviour_tokens(tokens, labels, vocab=8, n=2) == [3, 5]
    assert behaviour_tokens(tokens, torch.zeros_like(labels), vocab=8, n=2) == []


def test_behaviour_tokens_leave_out_the_ids_to_skip():
    tokens = torch.tensor([3, 3, 3, 3, 3, 7, 7, 7, 7, 7, 1, 1])
    labels = torch.tensor([3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0])
    assert behaviour_tokens(tokens, labels, vocab=8, n=2) == [3, 7]
    assert behaviour_tokens(tokens, labels, vocab=8, n=2, skip={7}) == [3]
