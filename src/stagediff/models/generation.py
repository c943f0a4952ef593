"""Greedy generation, plain or under an intervention, with a key-value cache.

An intervention is `hooks_for(tokens, start)`: the TransformerLens fwd_hooks of a forward
pass over `tokens[:, start:]`, given the whole context `tokens` [B, T]. A hook that edits
each position from that position's own activation (a dictionary splice, an added or
projected direction, a mask over marker positions) slices what it needs from the context,
so the cached pass edits exactly what a full pass would. An edit that needs more than the
activation at the position (the crosscoder, which also reads the base model) computes it
from the whole `tokens`, which every call passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from stagediff.data.tokens import separator_id
from stagediff.errors import DataError

HooksFor = Callable[[torch.Tensor, int], list]  # (context tokens [B, T], first new position) -> fwd_hooks


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt token ids as generation sees them: end-of-text first, as every sample starts."""
    eot = separator_id(tokenizer)
    return [[eot] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def length_batches(encoded: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of `encoded` in batches of equal token length (shortest first), so no
    batch needs padding and a batched completion equals the single-prompt one."""
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    return [idx[s : s + batch_size] for _, idx in sorted(by_len.items()) for s in range(0, len(idx), batch_size)]


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                    desc: str | None = "generate", hooks_for: HooksFor | None = None) -> list[str]:
    """Greedy completions, cut at the first end-of-text.

    A HookedTransformer generates with its key-value cache, with or without hooks (one
    code path, so rates with and without an intervention are comparable). Other models
    (a TransformerBridge) use their own `generate` without hooks, and rerun the whole
    sequence at every step with them (`generate_full`). `desc`: the progress bar's label
    (None: no bar, for a caller that shows its own)."""
    eot = separator_id(tokenizer)
    encoded = encode_prompts(tokenizer, prompts)
    longest = max((len(e) for e in encoded), default=0)
    if longest + max_new_tokens > model.cfg.n_ctx:
        raise DataError(f"a prompt of {longest} tokens plus {max_new_tokens} generated tokens exceeds "
                        f"the model's context ({model.cfg.n_ctx}); shorten the prompts or the generation length")
    model.eval()
    out: list[str] = [""] * len(prompts)
    for idx in tqdm(length_batches(encoded, batch_size), desc=desc, unit="batch", mininterval=1.0,
                    disable=desc is None):
        rows = torch.tensor([encoded[i] for i in idx])
        if isinstance(model, HookedTransformer):
            new_tokens = generate_cached(model, rows, max_new_tokens, eot, hooks_for)
        elif hooks_for is None:
            gen = model.generate(rows, max_new_tokens=max_new_tokens, do_sample=False,
                                 stop_at_eos=True, eos_token_id=eot, verbose=False)
            new_tokens = gen[:, rows.shape[1]:].tolist()
        else:
            new_tokens = generate_full(model, rows, max_new_tokens, eot, hooks_for)
        for i, new in zip(idx, new_tokens):
            if eot in new:
                new = new[: new.index(eot)]
            out[i] = tokenizer.decode(new)
    return out


def _step(tokens: torch.Tensor, cur: int, logits: torch.Tensor, done: torch.Tensor, eot: int) -> None:
    """Write the greedy token of every row at position `cur` (end-of-text once a row is done)."""
    nxt = logits[:, -1].argmax(-1)
    nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
    tokens[:, cur] = nxt
    done |= nxt == eot


@torch.no_grad()
def generate_cached(model, rows: torch.Tensor, max_new_tokens: int, eot: int,
                    hooks_for: HooksFor | None = None) -> list[list[int]]:
    """Greedy tokens after equal-length prompts `rows` [B, n]: the prompt in one pass, then
    one position per step against the key-value cache; hooks edit only the new positions."""
    batch, n = rows.shape
    tokens = torch.full((batch, n + max_new_tokens), eot, dtype=torch.long)
    tokens[:, :n] = rows
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)
    done = torch.zeros(batch, dtype=torch.bool)
    start = 0
    for cur in range(n, n + max_new_tokens):
        context = tokens[:, :cur]
        hooks = hooks_for(context, start) if hooks_for else []
        logits = model.run_with_hooks(context[:, start:], fwd_hooks=hooks, past_kv_cache=cache)
        _step(tokens, cur, logits, done, eot)
        start = cur
        if done.all():
            break
    return tokens[:, n:].tolist()


@torch.no_grad()
def generate_full(model, rows: torch.Tensor, max_new_tokens: int, eot: int,
                  hooks_for: HooksFor | None = None) -> list[list[int]]:
    """The reference path: every step reruns the whole sequence (with the hooks over all
    of it). `generate_cached` must give the same tokens (tested)."""
    batch, n = rows.shape
    tokens = torch.full((batch, n + max_new_tokens), eot, dtype=torch.long)
    tokens[:, :n] = rows
    done = torch.zeros(batch, dtype=torch.bool)
    for cur in range(n, n + max_new_tokens):
        context = tokens[:, :cur]
        logits = model.run_with_hooks(context, fwd_hooks=hooks_for(context, 0) if hooks_for else [])
        _step(tokens, cur, logits, done, eot)
        if done.all():
            break
    return tokens[:, n:].tolist()
