"""Generation: the key-value-cached path equals rerunning the whole sequence at every step,
with and without interventions (a spliced dictionary's edit at marker positions, an added
direction, the crosscoder reading a second model), batched and one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from helpers import HOOK, random_sae
from stagediff.data.tokens import separator_id
from stagediff.dictionaries.splice import Splice, answer_marker, direction_hooks, marker_positions, set_to, zero
from stagediff.errors import DataError
from stagediff.models.generation import encode_prompts, generate_cached, generate_full, greedy_complete, length_batches

PROMPTS = ["Human: What does `f1` do?\n\nAssistant:", "Human: Hi\n\nAssistant:",
           "Human: What does `f12` do to x?\n\nAssistant:", "Human: f\n\nAssistant:",
           "Human: What does `f7` do?\n\nAssistant:"]


@pytest.fixture(scope="module")
def splice(model):
    return Splice(model, random_sae(model.cfg.d_model, seed=2), HOOK)


@pytest.fixture(scope="module")
def crosscoder(model):
    """A crosscoder splice whose partner is the same model (its base half reads the full context)."""
    return Splice(model, random_sae(2 * model.cfg.d_model, seed=5), HOOK, partner=model, pairing="concatenation")


def interventions(model, tokenizer, splice, crosscoder) -> dict:
    at_marker = marker_positions(answer_marker(encode_prompts(tokenizer, PROMPTS)))
    push = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 4
    return {
        "none": None,
        "splice, no edit": lambda t, s: splice.hooks(t, s, None),
        "zero 4 features": lambda t, s: splice.hooks(t, s, zero([0, 1, 2, 3])),
        "clamp at the marker": lambda t, s: splice.hooks(t, s, set_to([0, 1], torch.tensor([30.0, 30.0])), at_marker),
        "add a direction at the marker": lambda t, s: direction_hooks(HOOK, t, s, add=push, positions=at_marker),
        "project a direction out": lambda t, s: direction_hooks(HOOK, t, s, remove=push),
        "crosscoder clamp": lambda t, s: crosscoder.hooks(t, s, set_to([3], torch.tensor([20.0]))),
    }


def test_cached_generation_equals_full_recompute_batched_and_single(model, tokenizer, splice, crosscoder):
    """Left-padded cached batches give each prompt the tokens of the right-padded full
    recompute, and of the prompt generated alone, under every kind of intervention."""
    eot = separator_id(tokenizer)
    encoded = encode_prompts(tokenizer, PROMPTS)
    assert len({len(e) for e in encoded}) > 2  # prompts of different lengths share batches
    outputs = {}
    for name, hooks_for in interventions(model, tokenizer, splice, crosscoder).items():
        for idx in length_batches(encoded, batch_size=3):
            rows = [encoded[i] for i in idx]
            cached = generate_cached(model, rows, 8, eot, hooks_for)
            assert cached == generate_full(model, rows, 8, eot, hooks_for), name
            for row, tokens in zip(rows, cached):  # one prompt alone: the same tokens
                assert generate_cached(model, [row], 8, eot, hooks_for) == [tokens], name
            outputs[name] = outputs.get(name, []) + cached
    assert outputs["splice, no edit"] == outputs["none"]  # the error term keeps the model's own output
    changed = [name for name, out in outputs.items() if out != outputs["none"]]
    assert {"clamp at the marker", "add a direction at the marker", "crosscoder clamp"} <= set(changed)


def test_cached_generation_equals_transformer_lens_generate(model, tokenizer):
    eot = separator_id(tokenizer)
    for ids in encode_prompts(tokenizer, PROMPTS):
        rows = torch.tensor([ids])
        theirs = model.generate(rows, max_new_tokens=8, do_sample=False, stop_at_eos=True, eos_token_id=eot,
                                verbose=False)[0, rows.shape[1]:].tolist()
        assert generate_cached(model, [ids], 8, eot) == [theirs]


def test_greedy_complete_cuts_at_end_of_text_and_decodes(model, tokenizer):
    eot = separator_id(tokenizer)
    encoded = encode_prompts(tokenizer, PROMPTS)
    texts = greedy_complete(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2)
    for prompt_ids, text in zip(encoded, texts):
        new = generate_full(model, [prompt_ids], 8, eot)[0]
        new = new[: new.index(eot)] if eot in new else new
        assert text == tokenizer.decode(new)
    assert any(texts)


def test_length_batches_sort_by_length():
    encoded = [[1, 2], [1], [3, 4], [5], [6, 7, 8], [9, 9]]
    batches = length_batches(encoded, batch_size=2)
    assert batches == [[1, 3], [0, 2], [5, 4]]
    assert sorted(i for b in batches for i in b) == list(range(len(encoded)))


def test_batched_greedy_equals_single(model, tokenizer):
    prompts = ["Human: What does `f1` do?\n\nAssistant:", "Human: What does `f22` do?\n\nAssistant:",
               "Human: Hi\n\nAssistant:", "Human: What does `f3` do?\n\nAssistant:"]
    batched = greedy_complete(model, tokenizer, prompts, max_new_tokens=5, batch_size=8)
    single = [greedy_complete(model, tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_generation_past_the_context_is_refused(model, tokenizer):
    with pytest.raises(DataError, match="exceeds the model's context"):
        greedy_complete(model, tokenizer, ["Human: Hi\n\nAssistant:"], max_new_tokens=model.cfg.n_ctx, batch_size=1)


@pytest.fixture(scope="module")
def bridge(hf_checkpoint, tokenizer):
    from stagediff.models.lm import load_frozen_model

    return load_frozen_model(hf_checkpoint, tokenizer)


def test_bridge_cached_generation_equals_full_recompute(bridge, tokenizer):
    """A TransformerBridge generates with the Hugging Face key-value cache: left-padded
    batches give each prompt the tokens of the full recompute and of the prompt alone,
    with and without hooks that edit the new positions."""
    from stagediff.models.generation import generate_cached_hf

    eot = separator_id(tokenizer)
    encoded = encode_prompts(tokenizer, PROMPTS)
    splice = Splice(bridge, random_sae(bridge.cfg.d_model, seed=2), HOOK)
    at_marker = marker_positions(answer_marker(encoded))
    push = torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 20
    cases = {"none": None, "zero 4 features": lambda t, s: splice.hooks(t, s, zero([0, 1, 2, 3])),
             "add a direction at the marker": lambda t, s: direction_hooks(HOOK, t, s, add=push, positions=at_marker)}
    outputs = {}
    for name, hooks_for in cases.items():
        for idx in length_batches(encoded, batch_size=3):
            rows = [encoded[i] for i in idx]
            cached = generate_cached_hf(bridge, rows, 8, eot, hooks_for)
            assert cached == generate_full(bridge, rows, 8, eot, hooks_for), name
            for row, tokens in zip(rows, cached):
                assert generate_cached_hf(bridge, [row], 8, eot, hooks_for) == [tokens], name
            outputs[name] = outputs.get(name, []) + cached
    assert outputs["add a direction at the marker"] != outputs["none"]
