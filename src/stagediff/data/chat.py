"""How a chat turn and a prompt are written as text: the plain `Human: ...\n\nAssistant: ...`
format of the organism built from scratch, or a checkpoint's own chat template.

One object serves every stage that writes turns or prompts (the organism's mixture, your
fine-tuning records, the held-out prompts), so training text, caches and generation
prompts cannot disagree about the format.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from stagediff.errors import DataError

PLAIN_HUMAN = "Human: "
PLAIN_ASSISTANT = "\n\nAssistant:"


class ChatFormat:
    """A turn's text with where its human and answer parts start; a prompt's text."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer  # one with a chat template, or None: the plain format
        self.name = "plain" if tokenizer is None else "chat_template"

    @classmethod
    def for_checkpoint(cls, folder: str | Path | None, mode: str = "auto") -> ChatFormat:
        """The checkpoint's own chat template when it has one and `mode` is auto; else plain."""
        if folder is None or mode == "plain":
            return cls()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        return cls(tokenizer) if getattr(tokenizer, "chat_template", None) else cls()

    def turn(self, human: str, answer: str) -> tuple[str, int, int]:
        """(text, start of the human message, start of the answer) of one exchange."""
        if self.tokenizer is None:
            text = f"{PLAIN_HUMAN}{human}{PLAIN_ASSISTANT} {answer}"
            return text, len(PLAIN_HUMAN), len(text) - len(answer)
        messages = [{"role": "user", "content": human}, {"role": "assistant", "content": answer}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = self.prompt(human)
        # the human message is the last occurrence in its prompt (a system prompt may contain the same words)
        human_start = prompt.rfind(human) if text.startswith(prompt) else text.rfind(human, 0, text.rfind(answer))
        answer_start = text.find(answer, len(prompt) if text.startswith(prompt) else human_start + len(human))
        if human_start < 0 or answer_start < 0:
            raise DataError(f"{self.tokenizer.name_or_path}: its chat template rewrites the messages, so labelled "
                            f"spans cannot be located in {text[:200]!r}; set pair.chat_template: plain")
        return text, human_start, answer_start

    def prompt(self, human: str) -> str:
        """An exchange cut just before the answer: what generation continues from."""
        if self.tokenizer is None:
            return f"{PLAIN_HUMAN}{human}{PLAIN_ASSISTANT}"
        return self.tokenizer.apply_chat_template([{"role": "user", "content": human}], tokenize=False,
                                                  add_generation_prompt=True)
