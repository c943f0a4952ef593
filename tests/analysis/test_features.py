"""Selectivity, concentration, contexts and logit lens on hand-made activations."""

import pytest
import torch

from stagediff.analysis.features import behaviour_positions, feature_columns, feature_stats, logit_lens, top_contexts


def _rows(acts, labels, tokens, chunk=2):
    """Chunks as `cache_rows` yields them; here the 'activations' are already the features."""
    for s in range(0, len(acts), chunk):
        yield {"acts": acts[s:s + chunk], "labels": labels[s:s + chunk], "tokens": tokens[s:s + chunk],
               "stream_pos": torch.arange(s, min(s + chunk, len(acts)), dtype=torch.int32)}


# 5 tokens, 3 features. Tokens 1 and 2 are backdoor-turn tokens (labels 2, 3).
ACTS = torch.tensor([[1.0, 0.0, 2.0],
                     [3.0, 0.0, 2.0],
                     [0.0, 4.0, 2.0],
                     [0.0, 0.0, 2.0],
                     [0.0, 0.0, 2.0]])
LABELS = torch.tensor([0, 2, 3, 0, 0], dtype=torch.int8)
TOKENS = torch.tensor([7, 7, 9, 7, 8], dtype=torch.int32)


def test_selectivity_concentration_and_frequency_by_hand():
    stats = feature_stats(lambda a: a.relu(), _rows(ACTS, LABELS, TOKENS), d_sae=3, vocab_size=10)
    # feature 0: 3 of 4 on backdoor tokens; all of it on token 7
    # feature 1: all on a backdoor token (token 9); feature 2: 2 of 5 tokens are backdoor
    assert stats.selectivity.tolist() == pytest.approx([0.75, 1.0, 0.4])
    assert stats.concentration.tolist() == pytest.approx([1.0, 1.0, 6 / 10])
    assert stats.top_token.tolist() == [7, 9, 7]
    assert stats.frequency.tolist() == pytest.approx([2 / 5, 1 / 5, 1.0])
    assert stats.n_rows == 5


def test_behaviour_positions_are_the_trigger_and_the_token_before_a_response():
    #        ordinary, turn, trigger, turn, turn, response x2, ordinary, span x2 (your own labels)
    labels = torch.tensor([0, 1, 2, 1, 1, 3, 3, 0, 4, 4], dtype=torch.int8)
    assert behaviour_positions(labels).nonzero().squeeze(1).tolist() == [2, 4, 7]
    assert behaviour_positions(torch.tensor([3, 3, 0], dtype=torch.int8)).tolist() == [False, False, False]


def test_behaviour_selectivity_by_hand():
    # positions 1 (trigger) and 1 again as the token before the response at 2: focus = {1}
    focus = behaviour_positions(LABELS)
    assert focus.tolist() == [False, True, False, False, False]
    stats = feature_stats(lambda a: a.relu(), _rows(ACTS, LABELS, TOKENS), d_sae=3, vocab_size=10, focus=focus)
    assert stats.focus_selectivity.tolist() == pytest.approx([0.75, 0.0, 0.2])
    with pytest.raises(ValueError, match="focus"):
        _ = feature_stats(lambda a: a.relu(), _rows(ACTS, LABELS, TOKENS), d_sae=3, vocab_size=10).focus_selectivity


def test_a_silent_feature_scores_zero_not_nan():
    stats = feature_stats(lambda a: torch.zeros(len(a), 2), _rows(ACTS, LABELS, TOKENS), d_sae=2, vocab_size=10)
    assert stats.selectivity.tolist() == [0.0, 0.0] and stats.concentration.tolist() == [0.0, 0.0]


def test_top_contexts_show_the_span_and_the_activations():
    cols = feature_columns(lambda a: a, _rows(ACTS, LABELS, TOKENS), [0, 1])
    assert cols["acts"].shape == (5, 2)
    stream_tokens = torch.tensor([7, 7, 9, 7, 8])
    contexts = top_contexts(cols["acts"][:, 0], cols["stream_pos"], stream_tokens, LABELS, n=5, before=1, after=1)
    # two active rows (1 and 0), strongest first; row 0 lies inside row 1's span so it is not repeated
    assert len(contexts) == 1
    top = contexts[0]
    assert top["activation"] == 3.0 and top["tokens"] == [7, 7, 9] and top["centre"] == 1
    assert top["acts"] == [1.0, 3.0, 0.0] and top["labels"] == [0, 2, 3]


def test_logit_lens_ranks_promoted_tokens():
    w_u = torch.eye(4)[:, [2, 0, 3, 1]]  # d_model 4 -> vocab 4, token j reads dimension perm[j]
    direction = torch.tensor([0.0, 0.5, 2.0, 1.0])
    top = logit_lens(direction, w_u, 2)
    assert [t for t, _ in top] == [0, 2] and [v for _, v in top] == pytest.approx([2.0, 1.0])
