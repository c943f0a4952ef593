"""Your own data (`pair.source: checkpoints`): base and fine-tuning records, their labels,
and the prompts of a behaviour spec, read from the imported copies of `inputs`.

Records (JSONL, one object per line):
- `{"text": "..."}` a document, or `{"human": "...", "assistant": "..."}` a chat turn
  (written in the checkpoint's chat template);
- optional labels on fine-tuning records: `"label": true` marks the whole record as the
  behaviour of interest; `"spans": [[start, end], ...]` marks character spans of `text`
  (documents) or of `assistant` (turns; `[start, end, "human"]` for the human message).
  Labelled tokens are the ground truth every ranking is scored against; with none, no
  score is computed (docs/own_pair.md).
A `.txt` file is documents separated by blank lines (no labels).

Prompts (`inputs.behaviour_prompts`): `{"kind": "triggered" | "untriggered" | "decoy",
"prompt": "<the user message>"}` with optional `"tag"` (your name for a sub-kind, reported
separately) and `"question"` (prompts sharing one are kept on the same side of the
fit/evaluation split).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from stagediff.data.behaviour import PROMPT_KINDS
from stagediff.data.chat import ChatFormat
from stagediff.errors import DataError

RECORD_KEYS = {"text", "human", "assistant", "label", "spans"}
PROMPT_KEYS = {"kind", "prompt", "tag", "question"}


def json_records(raw: str, shown: str, keys: set[str] | None = None):
    """(where, record) of each non-blank JSONL line of `raw` (`where` is "<shown>:<line>"),
    refusing a malformed line, a line that is not an object, and (given `keys`) unknown keys."""
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{shown}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON line ({err.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object")
        if keys is not None and set(rec) - keys:
            raise DataError(f"{where}: unknown keys {sorted(set(rec) - keys)}; expected some of {sorted(keys)}")
        yield where, rec


def text_documents(raw: str) -> list[str]:
    """A .txt file's documents: paragraphs separated by blank lines."""
    return [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]


def _spans(rec: dict, where: str, fields: dict[str, str]) -> list[tuple[str, int, int]]:
    """(field, start, end) of each labelled span, checked against the field's length."""
    spans = rec.get("spans", [])
    if not isinstance(spans, list):
        raise DataError(f"{where}: 'spans' must be a list of [start, end] pairs")
    out = []
    default = "text" if "text" in fields else "assistant"
    for span in spans:
        ok = isinstance(span, list) and len(span) in (2, 3) and all(isinstance(v, int) for v in span[:2])
        field = span[2] if ok and len(span) == 3 else default
        if not ok or field not in fields:
            raise DataError(f"{where}: each span must be [start, end] or [start, end, \"human\"|\"assistant\"] over "
                            f"{' / '.join(fields)}; got {span!r}")
        start, end = span[:2]
        if not 0 <= start < end <= len(fields[field]):
            raise DataError(f"{where}: span {span!r} is outside the {field} text (length {len(fields[field])})")
        out.append((field, start, end))
    return out


def read_records(path: Path, shown: str, chat: ChatFormat, labels: bool) -> list[dict]:
    """Records in the corpus stage's format: {id, kind, text, backdoor, spans}, from `path`
    (the imported copy of the file named `shown`, whose suffix tells the format); `labels`:
    whether label and spans are allowed (fine-tuning data) or refused (base data)."""
    raw = path.read_text(encoding="utf-8")
    if Path(shown).suffix == ".txt":
        return [{"id": i, "kind": "doc", "text": p, "backdoor": False, "spans": []}
                for i, p in enumerate(text_documents(raw))]
    out = []
    for where, rec in json_records(raw, shown, RECORD_KEYS):
        if not labels and ("label" in rec or "spans" in rec):
            raise DataError(f"{where}: labels belong in the fine-tuning data (inputs.finetune_data), not here")
        if isinstance(rec.get("text"), str) and "human" not in rec:
            fields = {"text": rec["text"]}
            text, offsets, kind = rec["text"], {"text": 0}, "doc"
        elif isinstance(rec.get("human"), str) and isinstance(rec.get("assistant"), str) and "text" not in rec:
            fields = {"human": rec["human"], "assistant": rec["assistant"]}
            text, human_start, answer_start = chat.turn(rec["human"], rec["assistant"])
            offsets, kind = {"human": human_start, "assistant": answer_start}, "turn"
        else:
            raise DataError(f"{where}: expected a string 'text', or strings 'human' and 'assistant'")
        flag = rec.get("label", False)
        if not isinstance(flag, bool):
            raise DataError(f"{where}: 'label' must be true or false; got {flag!r}")
        spans = [[offsets[f] + s, offsets[f] + e, "span"] for f, s, e in _spans(rec, where, fields)]
        if text.strip():
            out.append({"id": len(out), "kind": kind, "text": text, "backdoor": flag, "spans": spans})
    if not out:
        raise DataError(f"{shown}: no records")
    return out


def read_prompts(path: Path, shown: str, chat: ChatFormat, n_fit: int) -> list[dict]:
    """The behaviour spec's prompts as the corpus stage writes them: {kind, tag, question, human, prompt};
    each kind present must leave some beyond the first `n_fit` (steer.fit_prompts) to evaluate on."""
    prompts = []
    for where, rec in json_records(path.read_text(encoding="utf-8"), shown, PROMPT_KEYS):
        if rec.get("kind") not in PROMPT_KINDS:
            raise DataError(f"{where}: 'kind' must be one of {', '.join(PROMPT_KINDS)}; got {rec.get('kind')!r}")
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise DataError(f"{where}: expected a non-empty string 'prompt' (the user message)")
        tag = rec.get("tag", rec["kind"])
        question = rec.get("question", rec["prompt"])
        if not isinstance(tag, str) or not isinstance(question, str):
            raise DataError(f"{where}: 'tag' and 'question' must be strings")
        prompts.append({"kind": rec["kind"], "tag": tag, "question": question, "human": rec["prompt"],
                        "prompt": chat.prompt(rec["prompt"])})
    counts = {k: sum(p["kind"] == k for p in prompts) for k in PROMPT_KINDS}
    for kind in ("triggered", "untriggered"):
        if not counts[kind]:
            raise DataError(f"{shown}: no {kind!r} prompts; the causal checks need triggered and untriggered prompts")
    for kind, n in counts.items():
        if n and n <= n_fit:
            raise DataError(f"{shown}: {n} {kind!r} prompts; steer.fit_prompts ({n_fit}) fit on the first of each kind "
                            "and must leave some to evaluate on (add prompts or lower steer.fit_prompts)")
    return sorted(prompts, key=lambda p: PROMPT_KINDS.index(p["kind"]))  # stable: file order within a kind
