"""Greedy generation, plain or under an intervention, with a key-value cache.

An intervention is `hooks_for(tokens, start)`: the TransformerLens fwd_hooks of a forward
pass over `tokens[:, start:]`, given the whole context `tokens` [B, T]. A hook that edits
each position from that position's own activation (a dictionary splice, an added or
projected direction, a mask over marker positions) slices what it needs from the context,
so the cached pass edits exactly what a full pass would. An edit that needs more than the
activation at the position (the crosscoder, which also runs the base model over the
context) reads the whole `tokens`, and `context_mask(tokens)` says which of them are
padding.

Prompts are generated in batches of `batch_size`, shortest first, left-padded to the
batch's longest prompt; padding is masked out of attention and out of the positions, so
each prompt gets the tokens it gets alone (tested against a full recompute per step).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from stagediff.data.tokens import separator_id
from stagediff.errors import DataError

HooksFor = Callable[[torch.Tensor, int], list]  # (context tokens [B, T], first new position) -> fwd_hooks

# The attention mask (1 = token, 0 = left padding) of the batch being generated, for the
# interventions that run a second model over the same context; None outside generation.
_CONTEXT_MASK: ContextVar[torch.Tensor | None] = ContextVar("context_mask", default=None)


def context_mask(tokens: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of `tokens` (a prefix of the batch being generated), or None
    when they hold no padding."""
    mask = _CONTEXT_MASK.get()
    return None if mask is None else mask[:, : tokens.shape[1]]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt token ids as generation sees them: end-of-text first, as every sample starts."""
    eot = separator_id(tokenizer)
    return [[eot] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def length_batches(encoded: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of `encoded` in batches of `batch_size`, by token length (shortest first)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                    desc: str | None = "generate", hooks_for: HooksFor | None = None) -> list[str]:
    """Greedy completions, cut at the first end-of-text.

    Every model generates with a key-value cache, with or without hooks (one code path per
    kind, so rates with and without an intervention are comparable): TransformerLens's
    cache for a HookedTransformer, the Hugging Face model's own for a TransformerBridge.
    `desc`: the progress bar's label (None: no bar, for a caller that shows its own)."""
    eot = separator_id(tokenizer)
    encoded = encode_prompts(tokenizer, prompts)
    longest = max((len(e) for e in encoded), default=0)
    if longest + max_new_tokens > model.cfg.n_ctx:
        raise DataError(f"a prompt of {longest} tokens plus {max_new_tokens} generated tokens exceeds "
                        f"the model's context ({model.cfg.n_ctx}); shorten the prompts or the generation length")
    model.eval()
    generate = generate_cached if isinstance(model, HookedTransformer) else generate_cached_hf
    out: list[str] = [""] * len(prompts)
    for idx in tqdm(length_batches(encoded, batch_size), desc=desc, unit="batch", mininterval=1.0,
                    disable=desc is None):
        new_tokens = generate(model, [encoded[i] for i in idx], max_new_tokens, eot, hooks_for)
        for i, new in zip(idx, new_tokens):
            if eot in new:
                new = new[: new.index(eot)]
            out[i] = tokenizer.decode(new)
    return out


def _step(tokens: torch.Tensor, cur: torch.Tensor | int, logits: torch.Tensor, done: torch.Tensor, eot: int) -> None:
    """Write each row's greedy token at its position `cur` (end-of-text once a row is done)."""
    rows = torch.arange(len(tokens))
    nxt = logits[rows, -1 if isinstance(cur, int) else cur - 1].argmax(-1)
    nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
    tokens[rows, cur] = nxt
    done |= nxt == eot


@torch.no_grad()
def generate_cached(model, rows: list[list[int]], max_new_tokens: int, eot: int,
                    hooks_for: HooksFor | None = None) -> list[list[int]]:
    """Greedy tokens after prompts `rows`, left-padded to the longest: the prompts in one
    pass, then one position per step against the key-value cache; hooks edit only the new
    positions. Padding is masked out of attention and positions."""
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(rows))

    def forward(new, hooks, mask, start):
        return model.run_with_hooks(new, fwd_hooks=hooks, past_kv_cache=cache, attention_mask=mask[:, start:])

    return _generate_left_padded(rows, max_new_tokens, eot, hooks_for, forward)


def _left_padded(rows: list[list[int]], max_new_tokens: int, eot: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens, attention mask, prompt width): prompts left-padded to the longest, room
    for the new tokens after them."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width + max_new_tokens), eot, dtype=torch.long)
    mask = torch.ones_like(tokens)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) : width] = torch.tensor(r)
        mask[i, : width - len(r)] = 0
    return tokens, mask, width


@torch.no_grad()
def generate_cached_hf(model, rows: list[list[int]], max_new_tokens: int, eot: int,
                       hooks_for: HooksFor | None = None) -> list[list[int]]:
    """`generate_cached` for a TransformerBridge: the wrapped Hugging Face model keeps the
    key-value cache; the bridge derives each row's positions from the attention mask (which
    spans the cached prefix), so left padding is invisible to the prompts."""
    cache = None

    def forward(new, hooks, mask, start):
        nonlocal cache
        logits, cache = model.run_with_hooks(new, fwd_hooks=hooks, return_type="logits_and_cache",
                                             attention_mask=mask, past_key_values=cache, use_cache=True)
        return logits

    return _generate_left_padded(rows, max_new_tokens, eot, hooks_for, forward)


def _generate_left_padded(rows, max_new_tokens: int, eot: int, hooks_for: HooksFor | None, forward) -> list[list[int]]:
    """The cached loop both model kinds share: prompts left-padded, then one position per
    step; `forward(new tokens, hooks, mask up to the new position, first new position)`
    runs the model against its own key-value cache."""
    tokens, mask, width = _left_padded(rows, max_new_tokens, eot)
    done = torch.zeros(len(rows), dtype=torch.bool)
    padded = _CONTEXT_MASK.set(mask if (mask == 0).any() else None)
    try:
        start = 0
        for cur in range(width, width + max_new_tokens):
            context = tokens[:, :cur]
            hooks = hooks_for(context, start) if hooks_for else []
            _step(tokens, cur, forward(context[:, start:], hooks, mask[:, :cur], start), done, eot)
            start = cur
            if done.all():
                break
    finally:
        _CONTEXT_MASK.reset(padded)
    return tokens[:, width:].tolist()


@torch.no_grad()
def generate_full(model, rows: list[list[int]], max_new_tokens: int, eot: int,
                  hooks_for: HooksFor | None = None) -> list[list[int]]:
    """The reference path: prompts right-padded, and every step reruns the whole sequences
    (hooks over all of them); causal attention keeps each row's tokens blind to the padding
    after them. `generate_cached` must give the same tokens (tested)."""
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.full((len(rows), int(lengths.max()) + max_new_tokens), eot, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    done = torch.zeros(len(rows), dtype=torch.bool)
    for step in range(max_new_tokens):
        cur = lengths + step
        context = tokens[:, : int(cur.max())]
        logits = model.run_with_hooks(context, fwd_hooks=hooks_for(context, 0) if hooks_for else [])
        _step(tokens, cur, logits, done, eot)
        if done.all():
            break
    return [tokens[i, len(r) : len(r) + max_new_tokens].tolist() for i, r in enumerate(rows)]
