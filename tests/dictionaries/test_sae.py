"""The SAE of every stage: sae_lens classes built from params, the saved format and its
normalisation folding, exact parent initialisation, streamed batches, resume, and that
fine-tuning keeps feature indices aligned on a synthetic dictionary."""

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import make_config
from stagediff.analysis.scoring import row_cosines
from stagediff.dictionaries.cache import ActivationCache, write_tensor_cache
from stagediff.dictionaries.evaluation import alignment_summary
from stagediff.dictionaries.sae import build_sae, load_inference_sae, load_training_state, save_sae
from stagediff.dictionaries.sae_training import (
    ActivationDataModule,
    SAEModule,
    ShardBatches,
    explained_variance,
    firing,
)
from stagediff.errors import DataError
from stagediff.training import fit

ARCHITECTURES = ["standard", "topk", "batchtopk"]
CPU = make_config().compute


def sae_config(architecture="topk", d_sae=16, k=4, **extra):
    changes = {"sae.architecture": architecture, "sae.d_sae": d_sae, "sae.k": k}
    changes.update({f"sae.{key}": value for key, value in extra.items()})
    return make_config(changes).sae


def train_config(**changes):
    base = make_config().sae_train.S
    return base.model_copy(update=changes)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_build_uses_the_sae_lens_training_class(architecture):
    sae = build_sae(sae_config(architecture), d_in=8)
    assert type(sae).__module__.startswith("sae_lens.saes.")
    assert sae.cfg.architecture() == architecture
    assert sae.W_dec.shape == (16, 8) and sae.W_enc.shape == (8, 16)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_saved_sae_loads_with_sae_lens_and_works_on_raw_activations(tmp_path, architecture):
    from sae_lens import SAE

    torch.manual_seed(0)
    sae = build_sae(sae_config(architecture), d_in=8)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    scale = 0.37
    save_sae(sae, tmp_path, scale, {"stage": "S"})
    loaded = SAE.load_from_disk(str(tmp_path))
    assert loaded.cfg.architecture() == architecture
    keys = list(json.loads((tmp_path / "cfg.json").read_text()))
    assert keys == sorted(keys)  # the same SAE gives the same bytes in every process
    x = torch.randn(50, 8) * 3
    with torch.no_grad():
        expected = sae(x * scale) / scale  # the training SAE sees normalised activations
        assert torch.allclose(loaded(x), expected, atol=1e-5)


def test_batchtopk_saves_as_jumprelu_with_a_folded_threshold(tmp_path):
    from sae_lens import SAE
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    sae = build_sae(sae_config("batchtopk"), d_in=8)
    sae.training_forward_pass(TrainStepInput(sae_in=torch.randn(64, 8), coefficients={}, dead_neuron_mask=None,
                                             n_training_steps=0, is_logging_step=False))
    threshold = float(sae.topk_threshold)
    assert threshold > 0
    save_sae(sae, tmp_path, 0.5, {"stage": "S"})
    loaded = SAE.load_from_disk(str(tmp_path))
    assert loaded.cfg.architecture() == "jumprelu"
    # W_dec rows keep their direction (rescaled by the decoder norm and the fold)
    cos = row_cosines(loaded.W_dec.detach(), sae.W_dec.detach())
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert torch.allclose(loaded.threshold, torch.full_like(loaded.threshold, threshold / 0.5), rtol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_child_loads_the_parents_training_weights_exactly(tmp_path, architecture):
    parent = build_sae(sae_config(architecture), d_in=8)
    with torch.no_grad():
        parent.W_dec.mul_(1.7)
    save_sae(parent, tmp_path, 0.37, {"stage": "S"})
    child = build_sae(sae_config(architecture), d_in=8)
    load_training_state(child, tmp_path)
    for key, value in parent.state_dict().items():
        assert torch.equal(child.state_dict()[key], value), key


def test_parent_of_another_shape_is_refused(tmp_path):
    save_sae(build_sae(sae_config(d_sae=16), d_in=8), tmp_path, 1.0, {"stage": "S"})
    with pytest.raises(DataError, match="the parent SAE is .*'d_sae': 16.* this stage builds .*'d_sae': 32"):
        load_training_state(build_sae(sae_config(d_sae=32), d_in=8), tmp_path)
    with pytest.raises(DataError, match="no SAE stage output here"):
        load_inference_sae(tmp_path / "missing")


def test_k_must_be_below_d_sae():
    from stagediff.errors import ConfigError

    with pytest.raises(ConfigError, match="sae.k: expected fewer active latents than sae.d_sae"):
        sae_config(d_sae=16, k=16)


def test_l1_warms_up_from_scratch_but_not_in_a_fine_tune_and_resumes_at_its_step():
    cfg = sae_config("standard", l1_coefficient=4.0, l1_warm_up_steps=100)
    scratch = SAEModule(build_sae(cfg, 8), train_config(), 10)
    assert scratch.coefficients["l1"].value == 0.0
    fine_tune = SAEModule(build_sae(cfg, 8), train_config(), 10, fine_tune=True)
    assert fine_tune.coefficients["l1"].value == 4.0
    scratch.on_load_checkpoint({"global_step": 40})  # 40 completed steps of a 100-step warm-up
    assert scratch.coefficients["l1"].value == pytest.approx(4.0 * 40 / 100)


def test_explained_variance_hand_case():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    recon = torch.tensor([[0.5, 0.0], [-0.5, 0.0]])
    assert explained_variance(x, recon).item() == pytest.approx(0.75)  # 1 - 0.5 / 2


def test_decoder_cosines_and_alignment_summary_hand_case():
    cos = row_cosines(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
                          torch.tensor([[1.0, 1.0], [0.0, -2.0], [3.0, 0.0]]))
    assert torch.allclose(cos, torch.tensor([2**-0.5, -1.0, 1.0]))
    summary = alignment_summary(cos, -cos, torch.tensor([True, False, True]))
    assert summary["alignment_median_cos_S"] == pytest.approx(2**-0.5)  # lower median of the two alive
    assert summary["alignment_share_aligned"] == 0.5
    assert summary["alignment_median_cos_parent"] == pytest.approx(-1.0)
    with pytest.raises(DataError, match="different shapes"):
        row_cosines(torch.zeros(3, 2), torch.zeros(4, 2))


# --- streamed batches ----------------------------------------------------------------------------

@pytest.fixture
def small_cache(tmp_path):
    acts = torch.arange(1000 * 4, dtype=torch.float32).reshape(1000, 4)
    write_tensor_cache(tmp_path, acts, torch.randn(40, 4), shard_tokens=300)
    return ActivationCache(tmp_path)


def test_batch_of_a_step_does_not_depend_on_where_iteration_started(small_cache):
    def take(start, n):
        it = iter(ShardBatches(small_cache, 50, seed=3, start_step=lambda: start))
        return [next(it) for _ in range(n)]

    from_zero = take(0, 40)
    from_seven = take(7, 33)
    for a, b in zip(from_zero[7:], from_seven):
        assert torch.equal(a, b)


def test_an_epoch_visits_every_row_once_and_epochs_differ(small_cache):
    batches = ShardBatches(small_cache, 50, seed=0, start_step=lambda: 0)
    assert batches.per_epoch == 6 + 6 + 6 + 2  # 300, 300, 300, 100 rows in batches of 50
    it = iter(batches)
    scale = small_cache.scaling_factor
    first = torch.cat([next(it) for _ in range(batches.per_epoch)])
    second = torch.cat([next(it) for _ in range(batches.per_epoch)])
    ids = (first[:, 0] / scale / 4).round().long()
    assert sorted(ids.tolist()) == list(range(1000))
    assert not torch.equal(first, second)


def test_ranks_split_every_global_batch_into_equal_parts(small_cache):
    """Two DDP ranks see the two halves of the batch one process sees, step by step."""
    def take(rank, world):
        it = iter(ShardBatches(small_cache, 50, seed=5, start_step=lambda: 0, rank=rank, world=world))
        return [next(it) for _ in range(25)]

    whole, first, second = take(0, 1), take(0, 2), take(1, 2)
    for w, a, b in zip(whole, first, second):
        assert a.shape == b.shape == (25, 4)
        assert torch.equal(torch.cat([a, b]), w)


def test_firing_reads_dense_and_sparse_activations_alike():
    acts = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.5, 0.0, 0.0]])
    for feats in (acts, acts.to_sparse()):
        fired, l0 = firing(feats)
        assert fired.tolist() == [False, True, False, True]
        assert float(l0) == pytest.approx(4 / 3)


@pytest.mark.parametrize("changes", [{"precision": "bf16-mixed"}, {"compile": True}], ids=["bf16-mixed", "compile"])
def test_mixed_precision_and_compile_train_on_the_cpu(changes, tmp_path, monkeypatch):
    """The GPU settings' code paths, exercised on the CPU: Lightning's bf16 autocast, and
    torch.compile of the encoder/decoder (removed again before the SAE is saved). Both
    reconstruct held-out activations as well as the plain fp32 run, within 0.05 FVE."""
    monkeypatch.chdir(tmp_path)
    write_tensor_cache(tmp_path / "c", torch.randn(3000, 8), torch.randn(200, 8), 1500)
    train = train_config(max_steps=30, batch_size=100, val_every=15, val_batches=1)
    cache = ActivationCache(tmp_path / "c")
    runs = {}
    for name, compute in (("fp32", CPU), ("changed", CPU.model_copy(update=changes))):
        torch.manual_seed(0)
        module = SAEModule(build_sae(sae_config(d_sae=32, k=4), d_in=8), train, 10, compile=compute.compile)
        fit(module, ActivationDataModule(cache, 100, 0), train, compute, None, name, {})
        assert "decode" not in module.sae.__dict__  # the plain methods are back
        save_sae(module.sae, tmp_path / name, cache.scaling_factor, {"stage": name})
        assert module.sae.W_dec.dtype == torch.float32
        held_out = cache.eval_set()["acts"].float() * cache.scaling_factor
        with torch.no_grad():
            runs[name] = float(explained_variance(held_out, module.sae(held_out)))
    assert runs["fp32"] > 0.3
    assert runs["changed"] == pytest.approx(runs["fp32"], abs=0.05)
    assert (tmp_path / "changed" / "cfg.json").is_file()


def test_cache_smaller_than_a_batch_is_refused(small_cache):
    with pytest.raises(DataError, match="no shard holds a full batch of 400"):
        ShardBatches(small_cache, 400, seed=0, start_step=lambda: 0)


# --- training --------------------------------------------------------------------------------

class _Kill(Exception):
    pass


class _StepWatch(Callback):
    """Records the first step a run trains; dies at `kill_at` (a stand-in for SIGKILL mid-run)."""

    def __init__(self, kill_at=None):
        self.kill_at, self.first_step = kill_at, None

    def on_train_batch_start(self, trainer, *args):
        if self.first_step is None:
            self.first_step = trainer.global_step
        if trainer.global_step == self.kill_at:
            raise _Kill()


def _train(cache, ckpt_name, train, callbacks=()):
    torch.manual_seed(0)
    module = SAEModule(build_sae(sae_config(d_sae=16, k=2), d_in=4), train, dead_feature_window=5)
    trainer = fit(module, ActivationDataModule(cache, train.batch_size, seed=0), train, CPU, None, ckpt_name,
                  {"test": ckpt_name}, callbacks=tuple(callbacks))
    return module, trainer


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_where_an_unbroken_run_does(in_tmp, small_cache):
    train = train_config(max_steps=12, batch_size=50, val_every=4, val_batches=1, warmup_steps=2)
    unbroken, _ = _train(small_cache, "unbroken", train)
    with pytest.raises(_Kill):
        _train(small_cache, "resumed", train, [_StepWatch(kill_at=6)])
    watcher = _StepWatch()
    resumed, trainer = _train(small_cache, "resumed", train, [watcher])
    assert watcher.first_step == 4  # the last checkpoint before the kill
    assert trainer.global_step == 12
    for key, value in unbroken.sae.state_dict().items():
        assert torch.allclose(resumed.sae.state_dict()[key], value, atol=1e-6), key
    assert torch.equal(resumed.steps_since_fired, unbroken.steps_since_fired)


def test_training_reduces_loss_and_tracks_dead_latents(in_tmp, tmp_path):
    """30 steps cut the held-out reconstruction error; latents that cannot fire (encoder
    bias -100) count 30 silent steps and are dead, the others fired within the window."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 4, generator=gen)
    acts = torch.rand(1200, 3, generator=gen) @ basis
    write_tensor_cache(tmp_path / "c", acts[:1000], acts[1000:], shard_tokens=500)
    cache = ActivationCache(tmp_path / "c")
    held_out = cache.eval_set()["acts"].float() * cache.scaling_factor
    train = train_config(max_steps=30, batch_size=50, val_every=10, val_batches=1, lr=1e-2, warmup_steps=2)
    torch.manual_seed(0)
    sae = build_sae(sae_config(d_sae=16, k=2, aux_loss_coefficient=0.0), d_in=4)
    with torch.no_grad():
        sae.b_enc[12:] = -100.0
    module = SAEModule(sae, train, dead_feature_window=5)

    def mse() -> float:
        with torch.no_grad():
            return float((sae(held_out) - held_out).pow(2).sum(-1).mean())

    before = mse()
    fit(module, ActivationDataModule(cache, train.batch_size, seed=0), train, CPU, None, "loss", {"test": "loss"})
    assert mse() < 0.5 * before
    assert module.steps_since_fired[12:].tolist() == [30] * 4
    assert module.dead_mask()[12:].all() and module.silent_mask()[12:].all()
    assert (module.steps_since_fired[:12] <= 5).sum() >= 2  # k = 2 latents fire on every batch


def _synthetic(atoms: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sparse non-negative combinations of 3 dictionary atoms per sample."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(len(atoms), generator=gen)[:3] for _ in range(n)])
    coef = 1 + torch.rand(n, 3, generator=gen)
    return (coef.unsqueeze(-1) * atoms[idx]).sum(1)


def test_fine_tuning_keeps_indices_aligned_and_rotates_only_changed_features(tmp_path, monkeypatch):
    """S learns a synthetic dictionary; D fine-tunes it on data where 4 of 24 atoms turned:
    most features stay put (cos > 0.9) and the features of the turned atoms rotate."""
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(24, 16, generator=gen), dim=1)
    turned = atoms.clone()
    turned[:4] = torch.nn.functional.normalize(atoms[:4] + 1.5 * torch.randn(4, 16, generator=gen), dim=1)
    write_tensor_cache(tmp_path / "s", _synthetic(atoms, 20000, 1), _synthetic(atoms, 500, 2), 5000)
    write_tensor_cache(tmp_path / "d", _synthetic(turned, 20000, 3), _synthetic(turned, 500, 4), 5000)
    cfg = sae_config(d_sae=48, k=3)
    train = train_config(max_steps=400, batch_size=256, lr=3e-3, warmup_steps=10, val_every=200, val_batches=1)

    torch.manual_seed(0)
    s_sae = build_sae(cfg, 16)
    s_module = SAEModule(s_sae, train, 50)
    fit(s_module, ActivationDataModule(ActivationCache(tmp_path / "s"), 256, 0), train, CPU, None, "s", {})
    save_sae(s_sae, tmp_path / "S", ActivationCache(tmp_path / "s").scaling_factor, {"stage": "S"})

    d_sae = build_sae(cfg, 16)
    load_training_state(d_sae, tmp_path / "S")
    tune = train.model_copy(update={"max_steps": 300})
    d_module = SAEModule(d_sae, tune, 50)
    fit(d_module, ActivationDataModule(ActivationCache(tmp_path / "d"), 256, 0), tune, CPU, None, "d", {})

    w_s, w_d = s_sae.W_dec.detach(), d_sae.W_dec.detach()
    cos = row_cosines(w_s, w_d)
    alive = ~d_module.silent_mask()
    summary = alignment_summary(cos, cos, alive)
    assert summary["alignment_median_cos_S"] > 0.9
    # features that S learned for the turned atoms (best match > 0.9) rotated; the others did not
    match = torch.nn.functional.normalize(w_s, dim=1) @ atoms.T
    best_cos, best_atom = match.max(1)
    learned = alive & (best_cos > 0.9)
    on_turned = learned & (best_atom < 4)
    on_kept = learned & (best_atom >= 4)
    assert on_turned.sum() >= 2 and on_kept.sum() >= 10
    assert cos[on_turned].mean() < 0.8 < cos[on_kept].median()
