"""The report's figures (matplotlib), each a function of already computed numbers, and their PNG encoding."""
from __future__ import annotations

import base64
import io

import matplotlib.pyplot as plt
import numpy as np

SEL_COLOUR, REJ_COLOUR, REF_COLOUR = "#1f77b4", "#bbbbbb", "#d62728"


def png_b64(fig) -> str:
    """The figure as a base64 PNG (for a data: URL), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_class_histogram(names, selections: dict[str, np.ndarray], n: int):
    fig, ax = plt.subplots(figsize=(11, 4))
    k = len(selections)
    width = 0.8 / max(k, 1)
    x = np.arange(len(names))
    for i, (label, counts) in enumerate(selections.items()):
        ax.bar(x + (i - (k - 1) / 2) * width, counts, width, label=label)
    if n:
        ax.axhline(n / len(names), color="k", ls="--", lw=1, label="N / C")
        ax.axhspan(0.8 * n / len(names), 1.2 * n / len(names), color="k", alpha=0.06, label="+/-20%")
    ax.set_xticks(x, names, rotation=30 if len(names) > 12 else 0, fontsize=8 if len(names) > 20 else 10)
    ax.set_ylabel("selected images")
    ax.set_title("Selected images per teacher class")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_score_distributions(scan: dict):
    titles = {"maxprob": "confidence (maxprob)", "entropy": "normalised entropy", "energy": "energy (lower = in-domain)",
              "cosine": "cosine to the selected set's class prototype"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key in zip(axes, titles):
        b = scan["bins"][key]
        centres = (b[:-1] + b[1:]) / 2
        for part, colour, label in (("rej", REJ_COLOUR, "rejected"), ("sel", SEL_COLOUR, "selected")):
            h = scan["hist"][key][part].astype(float)
            if h.sum():
                ax.fill_between(centres, h / h.sum(), step="mid", alpha=0.55, color=colour, label=label)
        ax.set_title(titles[key], fontsize=10)
        ax.set_yticks([])
    axes[0].legend(fontsize=8)
    fig.suptitle("Score distributions: selected vs rejected (share of each set per bin)")
    return fig


def plot_map(xy: np.ndarray, group: np.ndarray, pred: np.ndarray, names):
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    ax = axes[0]
    for g, colour, label, size in ((1, REJ_COLOUR, "rejected", 6), (0, SEL_COLOUR, "selected", 6), (2, REF_COLOUR, "reference (original domain)", 10)):
        m = group == g
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=size, c=colour, label=f"{label} ({m.sum()})", alpha=0.7, linewidths=0)
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title("t-SNE of teacher features")
    ax = axes[1]
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    m = group != 1
    for k in range(len(names)):
        mk = m & (pred == k)
        if mk.any():
            ax.scatter(xy[mk, 0], xy[mk, 1], s=np.where(group[mk] == 2, 14, 6), color=cmap(k % cmap.N),
                       label=names[k] if len(names) <= 20 else None, alpha=0.8, linewidths=0)
    ax.set_title("selected (dots) and reference (larger) by teacher class")
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=2, ncol=2)
    for a in axes:
        a.set_xticks([]); a.set_yticks([])
    return fig


def plot_precision(names, precision: dict[str, dict]):
    fig, ax = plt.subplots(figsize=(11, 4))
    k = len(precision)
    width = 0.8 / max(k, 1)
    x = np.arange(len(names) + 1)
    for i, (label, pr) in enumerate(precision.items()):
        vals = [pr["per_class"].get(n, np.nan) for n in names] + [pr["overall"]]
        ax.bar(x + (i - (k - 1) / 2) * width, np.nan_to_num(vals), width, label=f"{label} (overall {pr['overall']:.1%})")
    ax.set_xticks(x, list(names) + ["overall"], rotation=30 if len(names) > 12 else 0)
    ax.set_ylabel("share of selected images")
    ax.set_ylim(0, 1)
    ax.set_title("Near-neighbour precision: selected images whose source class is a near neighbour of the teacher's class")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
