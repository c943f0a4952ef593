"""Feature cards: readable token text, and cards whose every field is the measured one."""

from __future__ import annotations

import torch

from helpers import make_config, random_sae
from stagediff.analysis.cards import build_cards, token_text
from stagediff.analysis.features import cache_rows, feature_stats
from stagediff.analysis.rotation import MeasuredFeatures
from stagediff.dictionaries.cache import ActivationCache, write_tensor_cache
from stagediff.models.lm import save_model


def test_token_text_escapes_control_characters_and_split_bytes(tokenizer):
    # the byte-level alphabet: byte 0 is 'Ā', byte 0x0e is 'Ď', byte 0xc3 (half of a UTF-8 character) is 'Ã'
    nul, shift_out, half = (tokenizer.convert_tokens_to_ids(c) for c in ("Ā", "Ď", "Ã"))
    assert tokenizer.decode([nul]) == "\x00" and token_text(tokenizer, nul) == "\\x00"
    assert token_text(tokenizer, shift_out) == "\\x0e"
    assert "\ufffd" in tokenizer.decode([half]) and token_text(tokenizer, half) == "\\xc3"
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    assert token_text(tokenizer, newline) == "\\n"
    word = tokenizer("Human", add_special_tokens=False)["input_ids"][0]
    assert token_text(tokenizer, word) == tokenizer.decode([word])  # ordinary text unchanged


def test_cards_report_the_measured_figures(tmp_path, model, tokenizer):
    d = model.cfg.d_model
    gen = torch.Generator().manual_seed(0)
    n = 600
    write_tensor_cache(tmp_path / "cache", torch.randn(n, d, generator=gen), torch.randn(8, d, generator=gen),
                       shard_tokens=256)
    cache = ActivationCache(tmp_path / "cache")
    stream = {"tokens": torch.randint(0, len(tokenizer), (n + 8,), generator=gen),
              "labels": (torch.arange(n + 8) % 7 == 0).to(torch.int8)}
    sae = random_sae(d, d_sae=24, seed=1)
    stats = feature_stats(sae.encode, cache_rows(cache), 24, len(tokenizer))
    measured = MeasuredFeatures({"selectivity": stats.selectivity, "concentration": stats.concentration,
                                 "frequency": stats.frequency, "top_token": stats.top_token},
                                ["F"] * 24, {"F": sae}, cache)
    save_model(model, tmp_path / "model")
    ranked = torch.tensor([5, 3, 11, 0])
    diff = make_config({"diff.n_contexts": 2, "diff.logit_lens_tokens": 3}).diff
    cards = build_cards(diff, tokenizer, ranked, measured, "m", tmp_path / "model", stream, n_cards=3)
    assert [c["feature"] for c in cards] == [5, 3, 11] and [c["rank"] for c in cards] == [1, 2, 3]
    acts = torch.cat([sae.encode(cache.shard(i)["acts"].float()) for i in range(len(cache.shard_sizes))])
    for card in cards:
        f = card["feature"]
        assert card["selectivity"] == float(stats.selectivity[f]) and card["dictionary"] == "F"
        assert sum(card["histogram"]["counts"]) == int((acts[:, f] > 0).sum())
        assert card["contexts"][0]["activation"] == float(acts[:, f].max())
        lens_ids = (sae.W_dec[f].detach().double() @ model.W_U.detach().double()).topk(3).indices.tolist()
        assert [t for t, _ in card["logit_lens"]] == [token_text(tokenizer, i) for i in lens_ids]
