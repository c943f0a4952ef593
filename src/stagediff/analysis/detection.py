"""Detection by a feature or a direction: pooled over a window of each held-out sequence
(the prompt, its last token, or the model's own answer), scored by AUROC in two forms
(triggered vs untriggered prompts; prompts that show the behaviour vs decoys that do not)."""

from __future__ import annotations

import torch

from stagediff.analysis.scoring import auroc

WINDOWS = ("prompt", "last_prompt", "answer")
FORMS = {"triggered": "triggered vs untriggered", "behaviour": "behaviour vs decoy"}


@torch.no_grad()
def window_pools(splice, sequences: list[list[int]], prompt_lens: list[int],
                 probes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per sequence and window (WINDOWS), the max of every feature and of each probe's
    projection (`probe/<name>/<window>`) over the window's positions: the prompt (the
    leading end-of-text is never read), its last token, or the answer as it is produced
    (from the position that predicts its first token to its end: an output read-out, not
    a prediction)."""
    feats = {w: [] for w in WINDOWS}
    proj = {(name, w): [] for name in probes for w in WINDOWS}
    for ids, n in zip(sequences, prompt_lens):
        tokens = torch.tensor([ids])
        act, f = splice.features(tokens)
        act, f = act[0], f[0].float()
        projections = {name: act.float() @ v.float() for name, v in probes.items()}
        for w, (a, b) in {"prompt": (1, n), "last_prompt": (n - 1, n), "answer": (n - 1, len(ids))}.items():
            feats[w].append(f[a:b].max(0).values)
            for name, p in projections.items():
                proj[(name, w)].append(p[a:b].max())
    return {**{f"features/{w}": torch.stack(v) for w, v in feats.items()},
            **{f"probe/{name}/{w}": torch.stack(v) for (name, w), v in proj.items()}}


def detection_rows(pools: dict[str, dict[str, torch.Tensor]], labels: dict[str, tuple[list[int], list[int]]],
                   top: dict[str, list[int]], probe_pools: dict[str, torch.Tensor]) -> list[dict]:
    """AUROC of each method's top candidates, and of the probe, per window and form.
    `labels[form]` = (positive rows, negative rows, into the stacked eval sequences)."""
    rows = []
    for form, (pos, neg) in labels.items():
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        rows_idx = torch.tensor(pos + neg, dtype=torch.long)
        for w in WINDOWS:
            for method, feats in top.items():
                scores = pools[method][f"features/{w}"][rows_idx]
                for rank, f in enumerate(feats, start=1):
                    rows.append({"method": method, "rank": rank, "feature": f, "window": w, "form": form,
                                 "auroc": auroc(scores[:, f], y)})
            for key in sorted(k for k in probe_pools if k.startswith("probe/") and k.endswith(f"/{w}")):
                rows.append({"method": key.split("/")[1], "rank": 0, "feature": -1, "window": w, "form": form,
                             "auroc": auroc(probe_pools[key][rows_idx], y)})
    return rows


def dictionary_auroc_summary(pool: dict[str, torch.Tensor], labels: dict, alive: torch.Tensor) -> dict:
    """Over every alive feature of the spliced dictionary: how many detect at AUROC > 0.9
    / 0.95, and the best one, per window and form (a lexical trigger detector passes
    triggered vs untriggered; behaviour vs decoy is the real test)."""
    out = {}
    idx = alive.nonzero().squeeze(1).tolist()
    for form, (pos, neg) in labels.items():
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        rows_idx = torch.tensor(pos + neg, dtype=torch.long)
        for w in WINDOWS:
            scores = pool[f"features/{w}"][rows_idx]
            values = torch.tensor([auroc(scores[:, f], y) for f in idx], dtype=torch.float64)
            ok = ~values.isnan()
            best = int(values.nan_to_num(-1).argmax()) if ok.any() else -1
            out[f"{form}/{w}"] = {"n_above_0.9": int((values[ok] > 0.9).sum()), "n_above_0.95": int((values[ok] > 0.95).sum()),
                                  "best_feature": idx[best] if best >= 0 else -1,
                                  "best_auroc": float(values[best]) if best >= 0 else float("nan")}
    return out
