"""The compute settings: devices, precision, compile, the batch split across ranks, the GPU
preset, and (slow) the SAE stage trained by two DDP processes over gloo next to one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import ROOT, make_config, mlflow_runs, run_cli, with_changes
from stagediff import compute
from stagediff.errors import ConfigError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def compute_config(**changes):
    return make_config({f"compute.{k}": v for k, v in changes.items()}).compute


def test_cpu_and_auto_resolve_to_the_cpu_without_a_gpu():
    assert compute.device(compute_config()) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert compute.device(compute_config(accelerator="auto")).type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"compute.accelerator: 'cuda'.*no CUDA device.*cpu or auto"):
        compute.device(compute_config(accelerator="cuda"))


def test_trainer_kwargs_are_lightnings_own_settings():
    kwargs = compute.trainer_kwargs(compute_config(devices=2, strategy="ddp", precision="bf16-mixed",
                                                   deterministic=False))
    assert kwargs == {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "precision": "bf16-mixed",
                      "deterministic": False, "use_distributed_sampler": False}


def test_autocast_is_off_at_full_precision_and_bf16_when_mixed():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with compute.autocast(compute_config(), torch.device("cpu")):
        assert (a @ b).dtype == torch.float32
    with compute.autocast(compute_config(precision="bf16-mixed"), torch.device("cpu")):
        assert (a @ b).dtype == torch.bfloat16


@pytest.mark.parametrize("changes,message", [
    ({"compute.devices": 2}, "compute.strategy: expected ddp when compute.devices is 2"),
    ({"compute.strategy": "fsdp"}, "compute.strategy"),
    ({"compute.precision": "16-mixed"}, "compute.precision: expected 32-true or bf16-mixed on the CPU"),
    ({"compute.devices": 3, "compute.strategy": "ddp"}, "sae_train.S.batch_size: expected a multiple of compute.devices (3)"),
    ({"compute.accelerator": "tpu"}, "compute.accelerator"),
    ({"sae.sparse_decode": True, "sae.architecture": "standard"}, "sae.sparse_decode: expected false unless"),
    ({"sae.sparse_decode": True}, "sae.sparse_decode: expected false unless compute.accelerator is cuda"),
    ({"sae.sparse_decode": True, "compute.accelerator": "auto"}, "sae.sparse_decode: expected false unless"),
])
def test_bad_compute_settings_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(changes)


def test_process_rank_reads_the_launchers_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert compute.process_rank() == 0 and compute.is_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert compute.process_rank() == 1 and not compute.is_rank_zero()
    monkeypatch.setenv("RANK", "3")
    assert compute.process_rank() == 3


def test_rank_shares_partition_a_batch_in_order():
    rows = torch.arange(12)
    shares = [compute.rank_share(rows, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shares), rows)
    assert compute.rank_share(list(range(8)), 1, 2) == [4, 5, 6, 7]


def test_on_cpu_keeps_only_the_cpu_settings():
    cpu = compute.on_cpu(compute_config(devices=2, strategy="ddp", precision="bf16-mixed", compile=True))
    assert (cpu.accelerator, cpu.devices, cpu.strategy, cpu.precision, cpu.compile) == ("cpu", 1, "auto", "32-true", False)


def test_the_gpu_preset_is_a_valid_overlay_of_the_defaults():
    from stagediff.config import compose_params, merge_overlay, parse_config, read_params

    cfg = parse_config(compose_params(ROOT / "params.yaml", ROOT / "presets" / "gpu.yaml"))
    assert (cfg.compute.accelerator, cfg.compute.precision, cfg.compute.compile) == ("cuda", "bf16-mixed", True)
    assert (cfg.model.d_model, cfg.sae.d_sae, cfg.sae_train.S.batch_size) == (768, 24576, 4096)
    assert cfg.crosscoder.sae.architecture == "batchtopk"  # kept from the defaults
    with pytest.raises(ConfigError, match="model.d_modle: not a setting of the params file"):
        merge_overlay(read_params(ROOT / "params.yaml"), {"model": {"d_modle": 3}})


@needs_cuda
def test_sae_training_runs_on_the_gpu_in_bf16(tmp_path, monkeypatch):
    from stagediff.dictionaries.cache import ActivationCache, write_tensor_cache
    from stagediff.dictionaries.sae import build_sae
    from stagediff.dictionaries.sae_training import ActivationDataModule, SAEModule
    from stagediff.training import fit

    monkeypatch.chdir(tmp_path)
    write_tensor_cache(tmp_path / "c", torch.randn(8192, 32), torch.randn(512, 32), 4096)
    cfg = make_config({"compute.accelerator": "cuda", "compute.precision": "bf16-mixed",
                       "compute.deterministic": False, "sae.d_sae": 64})
    train = cfg.sae_train.S.model_copy(update={"max_steps": 20, "batch_size": 256})
    module = SAEModule(build_sae(cfg.sae, 32), train, 10)
    fit(module, ActivationDataModule(ActivationCache(tmp_path / "c"), 256, 0), train, cfg.compute, None, "gpu", {})
    assert module.sae.W_dec.device.type == "cpu" and torch.isfinite(module.sae.W_dec).all()


@needs_cuda
def test_sparse_topk_trains_like_dense_topk_on_the_gpu(tmp_path, monkeypatch):
    """sae_lens's sparse TopK activations (`sae.sparse_decode`) give the same training run
    as dense ones, up to float rounding."""
    from stagediff.dictionaries.cache import ActivationCache, write_tensor_cache
    from stagediff.dictionaries.sae import build_sae
    from stagediff.dictionaries.sae_training import ActivationDataModule, SAEModule
    from stagediff.training import fit

    monkeypatch.chdir(tmp_path)
    write_tensor_cache(tmp_path / "c", torch.randn(3000, 8), torch.randn(200, 8), 1500)
    weights = []
    for sparse in (False, True):
        cfg = make_config({"compute.accelerator": "cuda", "sae.d_sae": 32, "sae.k": 4, "sae.sparse_decode": sparse})
        train = cfg.sae_train.S.model_copy(update={"max_steps": 30, "batch_size": 100})
        torch.manual_seed(0)
        module = SAEModule(build_sae(cfg.sae, 8), train, 10)
        fit(module, ActivationDataModule(ActivationCache(tmp_path / "c"), 100, 0), train, cfg.compute, None,
            f"s{sparse}", {})
        weights.append(module.sae.W_dec.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-4)


# --- two processes (gloo) vs one -----------------------------------------------------------------

def _final_train_loss(ws: Path, stage: str) -> list[float]:
    client, runs = mlflow_runs(ws, stage)
    return [max(client.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step).value for r in runs]


@pytest.mark.slow
def test_the_sae_stage_trained_by_two_ddp_processes_matches_one(micro_runs, tmp_path):
    """`compute.devices: 2, strategy: ddp` on the CPU: Lightning relaunches the stage as a
    second rank, gloo averages the gradients, each rank takes half of every global batch.
    Only rank 0 records an MLflow run and writes the outputs; the held-out loss and the
    final training loss (averaged over the ranks, i.e. over the global batch) match the
    single-process stage's within 0.1% (measured: about 1e-9)."""
    ws = Path(shutil.copytree(micro_runs[0], tmp_path / "ws", ignore=shutil.ignore_patterns("repro.log")))
    from stagediff.config import read_params

    # both runs here, one torch thread each and 40 steps: the end-to-end overlay's 300 steps at 1e-2 of a
    # ReLU + L1 SAE turn summation-order differences (two threads vs one) into 1e-3 of MSE
    params = with_changes(read_params(ws / "params.yaml"), {"threads": 1, "sae_train.S.max_steps": 40,
                                                           "sae_train.S.val_every": 10})
    (ws / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    out = run_cli(["sae", "--stage", "S"], ws)
    assert out.returncode == 0, out.stderr[-3000:]
    single = json.loads((ws / "metrics" / "sae_S.json").read_text())
    params = with_changes(params, {"compute.devices": 2, "compute.strategy": "ddp"})
    (ws / "params.yaml").write_text(json.dumps(params))
    out = run_cli(["sae", "--stage", "S"], ws)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "sae_S: training: 2 processes (DDPStrategy, gloo)" in log, log[-3000:]
    ddp = json.loads((ws / "metrics" / "sae_S.json").read_text())
    assert ddp["mse"] == pytest.approx(single["mse"], rel=1e-3)
    assert ddp["explained_variance"] == pytest.approx(single["explained_variance"], abs=1e-3)
    assert ddp["l0"] == pytest.approx(single["l0"], rel=1e-3)
    assert ddp["dead_fraction"] == single["dead_fraction"]  # dead latents are tracked over both ranks
    losses = _final_train_loss(ws, "sae_S")
    assert len(losses) == 3  # the micro run's, the one-process rerun's, the two-process run's (rank 1 records nothing)
    assert losses[2] == pytest.approx(losses[1], rel=1e-3)
    assert not any((ws / "checkpoints").glob("sae_S/*/*.ckpt"))  # finished: checkpoints dropped

