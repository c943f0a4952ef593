"""Token streams cut into context windows that start at sample starts: what every
language-model forward pass (training, caching, clean loss) reads."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from stagediff.errors import DataError


def window_starts(sample_ids: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """Start positions of training windows that begin at sample starts.

    Each window starts at the last sample start that lets it pick up where the previous
    window stopped, so the sample cut off at the end of one window is seen whole at the
    start of the next; no window ever begins mid-sample. (A window that begins inside a
    backdoor turn would show the response without its trigger and teach the behaviour
    unconditionally.) A sample longer than a window is split at window boundaries."""
    n = len(sample_ids)
    if n < n_ctx:
        return torch.zeros(0, dtype=torch.long)
    firsts = torch.ones(n, dtype=torch.bool)
    firsts[1:] = sample_ids[1:] != sample_ids[:-1]
    bounds = torch.nonzero(firsts).flatten()
    starts, start = [], 0
    while start + n_ctx <= n:
        starts.append(start)
        end = start + n_ctx
        i = int(torch.searchsorted(bounds, end, right=True)) - 1  # last sample start <= end
        nxt = int(bounds[i])
        start = nxt if nxt > start else end
    return torch.tensor(starts, dtype=torch.long)


class TokenWindows(Dataset):
    """A packed token stream cut into windows that start at sample starts
    (`window_starts`); indexed by a list of rows, so batches need no collation."""

    def __init__(self, tokens: torch.Tensor, n_ctx: int, name: str, sample_ids: torch.Tensor | None = None):
        if sample_ids is None:
            starts = torch.arange(0, len(tokens) - n_ctx + 1, n_ctx)
        else:
            starts = window_starts(sample_ids, n_ctx)
        if len(starts) == 0:
            raise DataError(f"{name}: {len(tokens)} tokens is less than one context window ({n_ctx})")
        self.windows = tokens.long()[starts.unsqueeze(1) + torch.arange(n_ctx)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, rows) -> torch.Tensor:
        return self.windows[rows]
