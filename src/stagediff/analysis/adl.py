"""The activation-difference lens (ADL; Minder et al. 2026, "Narrow finetuning leaves clearly
readable traces in activation differences"): a narrow fine-tune shifts the residual stream
even on text unrelated to it, most of all at the first few positions, so the mean of
h_ft - h_base over the first k positions of unrelated text reads what the fine-tune was
about: through the logit lens (the fine-tuned model's final norm and unembedding), as a
steering vector, and here also as a ranking of a dictionary's features (cosine with it).

Pure functions over models and token tensors; the `adl` stage runs them, `steer` steers
with the vector.
"""

from __future__ import annotations

import torch

from stagediff.dictionaries.cache import hook_activations
from stagediff.errors import DataError


def sample_prefixes(tokens: torch.Tensor, sample_ids: torch.Tensor, n_positions: int, max_samples: int) -> torch.Tensor:
    """[m, n_positions]: the first `n_positions` tokens of each sample of a packed stream
    (samples with fewer tokens are skipped), the first `max_samples` of them."""
    if len(tokens) != len(sample_ids):
        raise DataError(f"a stream of {len(tokens)} tokens with {len(sample_ids)} sample ids")
    ids = sample_ids.long()
    starts = torch.cat([torch.tensor([0]), (ids[1:] != ids[:-1]).nonzero().squeeze(1) + 1])
    ends = torch.cat([starts[1:], torch.tensor([len(ids)])])
    keep = starts[(ends - starts) >= n_positions][:max_samples]
    if len(keep) == 0:
        raise DataError(f"no sample of the held-out stream has {n_positions} tokens (adl.positions)")
    return torch.stack([tokens[s:s + n_positions].long() for s in keep.tolist()])


@torch.no_grad()
def position_mean_difference(model_ft, model_base, prefixes: torch.Tensor, hook: str,
                             batch_size: int = 64) -> torch.Tensor:
    """delta [n_positions, d_model]: mean over the prefixes of h_ft - h_base at the hook,
    per position."""
    total = None
    for chunk in torch.split(prefixes, batch_size):
        diff = (hook_activations(model_ft, chunk, hook).double() - hook_activations(model_base, chunk, hook).double())
        total = diff.sum(0) if total is None else total + diff.sum(0)
    return (total / len(prefixes)).float()


@torch.no_grad()
def mean_norm(model, windows: torch.Tensor, hook: str, skip: int, batch_size: int = 64) -> float:
    """Mean L2 norm of the model's activations at the hook, positions from `skip` on (the
    first positions' norms are outliers): the scale a steering vector is set to."""
    norms = [hook_activations(model, w, hook)[:, skip:].norm(dim=-1).double().flatten()
             for w in torch.split(windows, batch_size)]
    return float(torch.cat(norms).mean())


@torch.no_grad()
def logit_lens(vector: torch.Tensor, model, k: int) -> list[tuple[int, float]]:
    """The k tokens the vector promotes most through the model's final norm (where the model
    exposes one as `ln_final`) and unembedding `W_U`, with their probabilities (the lens as
    the ADL applies it to the raw difference)."""
    x = vector.float()[None, None]
    norm = getattr(model, "ln_final", None)
    if callable(norm):
        x = norm(x)
    probs = (x[0, 0] @ model.W_U.float()).double().softmax(-1)
    values, ids = probs.topk(min(k, len(probs)))
    return list(zip(ids.tolist(), values.tolist()))


def alignment_scores(directions: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """[d_sae]: each feature's largest cosine with the difference vector of any position
    (how the ADL reads a dictionary: features pointing where the fine-tune moved)."""
    d = torch.nn.functional.normalize(directions.double(), dim=1)
    v = torch.nn.functional.normalize(deltas.double(), dim=1)
    return (d @ v.T).max(1).values.float()


def behaviour_tokens(tokens: torch.Tensor, labels: torch.Tensor, vocab: int, n: int, min_count: int = 5,
                     skip: set[int] = frozenset()) -> list[int]:
    """The `n` token ids most over-represented in the behaviour's own text (labels 3, 4: the
    backdoor responses and labelled spans) relative to the whole stream: what a lens that
    "reads the behaviour" should promote. Ids seen fewer than `min_count` times there, and
    the ids in `skip` (whitespace: a lens promoting a space reads nothing), are left out;
    empty without labelled spans."""
    spans = (labels == 3) | (labels == 4)
    if not spans.any():
        return []
    in_spans = torch.bincount(tokens[spans].long(), minlength=vocab).double()
    overall = torch.bincount(tokens.long(), minlength=vocab).double()
    keep = in_spans >= min_count
    if skip:
        keep[torch.tensor(sorted(skip), dtype=torch.long)] = False
    lift = torch.where(keep, (in_spans / in_spans.sum()) / (overall / overall.sum()).clamp_min(1e-30),
                       torch.zeros_like(in_spans))
    top = lift.topk(min(n, int((lift > 0).sum()))).indices
    return sorted(top.tolist())


def lens_hits(lens: list[tuple[int, float]], targets: list[int]) -> dict:
    """How the lens's tokens meet a target set: hits in the list and the best rank (1 = top;
    None if none)."""
    ids = [t for t, _ in lens]
    hit_ranks = [i + 1 for i, t in enumerate(ids) if t in set(targets)]
    return {"hits": len(hit_ranks), "best_rank": hit_ranks[0] if hit_ranks else None}


def steering_position(prefixes: torch.Tensor, deltas: torch.Tensor) -> int:
    """The position whose difference steers: the largest-norm one, skipping position 0 when
    every prefix starts with the same token (a separator: its difference is a constant of
    that token, not of the text). Blind to any ground truth."""
    first = 1 if len(deltas) > 1 and bool((prefixes[:, 0] == prefixes[0, 0]).all()) else 0
    return first + int(deltas[first:].norm(dim=1).argmax())
