"""Where training and caching run: the `compute` settings turned into a torch device, an
autocast context and Lightning Trainer arguments, and which process of a multi-process run
this is. One place, so every stage reads them alike; Lightning does the device work itself."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext

import numpy as np
import torch

from stagediff.config import Config
from stagediff.errors import ConfigError, TrainingError
from stagediff.sections import ComputeConfig

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def device(compute: ComputeConfig) -> torch.device:
    """The device of a single-process stage (caching, evaluation)."""
    if compute.accelerator == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if compute.accelerator == "auto":
        return torch.device("cpu")
    raise ConfigError(f"compute.accelerator: 'cuda', but torch {torch.__version__} finds no CUDA device "
                      f"(built for CUDA {torch.version.cuda}); expected cpu or auto on this machine")


def setup_process(cfg: Config) -> None:
    """Threads, matmul precision and every global seed (Python, NumPy, torch), as
    Lightning's `seed_everything(seed, workers=True)` sets them. Stages that do not train
    call this instead of Lightning's, so that they need not import Lightning (seconds of
    start-up); training stages call both (`training.setup_training`)."""
    torch.set_num_threads(cfg.threads)
    os.environ["OMP_NUM_THREADS"] = str(cfg.threads)  # so Lightning's DDP launcher keeps it for every rank
    apply_matmul_precision(cfg.compute)
    os.environ["PL_GLOBAL_SEED"] = str(cfg.seed)
    os.environ["PL_SEED_WORKERS"] = "1"
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)


def lightning_accelerator(compute: ComputeConfig) -> str:
    return device(compute).type  # "cpu" | "cuda"; also checks that a requested GPU exists


def autocast(compute: ComputeConfig, on: torch.device):
    """Mixed-precision context of forward passes outside Lightning (caching), as Lightning's
    own `precision` does inside training; a no-op at 32-true."""
    dtype = AUTOCAST_DTYPES.get(compute.precision)
    return torch.autocast(on.type, dtype=dtype) if dtype is not None else nullcontext()


def apply_matmul_precision(compute: ComputeConfig) -> None:
    torch.set_float32_matmul_precision(compute.matmul_precision)


def trainer_kwargs(compute: ComputeConfig) -> dict:
    """Lightning Trainer arguments. The batch split across ranks is the data modules' own
    (every process takes an equal share of each global batch), so Lightning's sampler
    replacement is off."""
    return {"accelerator": lightning_accelerator(compute), "devices": compute.devices,
            "strategy": compute.strategy, "precision": compute.precision,
            "deterministic": compute.deterministic, "use_distributed_sampler": False}


def process_rank() -> int:
    """Global rank of this process: 0 unless Lightning launched it as another DDP rank."""
    for key in ("RANK", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def is_rank_zero() -> bool:
    return process_rank() == 0


def any_rank(flag: bool, trainer) -> bool:
    """True if `flag` holds on any rank (all ranks must call it at the same step), so that
    every process stops together instead of one waiting on the others forever."""
    if trainer.world_size == 1:
        return flag
    return trainer.strategy.reduce_boolean_decision(flag, all=False)


def fail_if_not_finite(loss: torch.Tensor, trainer, what: str, advice: str) -> None:
    """Stop training on a non-finite loss on any rank, with one message."""
    if any_rank(not bool(torch.isfinite(loss)), trainer):
        raise TrainingError(f"{what} training loss is {loss.item()} at step {trainer.global_step}; {advice}")


def rank_share(rows, rank: int, world: int):
    """This rank's equal, contiguous share of a global batch (rows: a tensor or a list)."""
    n = len(rows) // world
    return rows[rank * n : (rank + 1) * n]


def compile_sae(sae) -> None:
    """torch.compile the SAE's encoder and decoder (its matmuls; the losses are elementwise)
    on this instance; `uncompile_sae` restores the plain methods before saving."""
    sae.encode_with_hidden_pre = torch.compile(sae.encode_with_hidden_pre)
    sae.decode = torch.compile(sae.decode)


def uncompile_sae(sae) -> None:
    for name in ("encode_with_hidden_pre", "decode"):
        sae.__dict__.pop(name, None)


def on_cpu(compute: ComputeConfig) -> ComputeConfig:
    """The settings for a stage that trains next to a frozen model kept on the CPU
    (ISaeRFT: its spliced model is not a submodule Lightning would move)."""
    return compute.model_copy(update={"accelerator": "cpu", "devices": 1, "strategy": "auto",
                                      "precision": "32-true", "compile": False})


def place(module, on: torch.device):
    """`module` on device `on` (moved only if it is elsewhere)."""
    param = next(module.parameters(), None)
    return module if param is None or param.device == on else module.to(on)
