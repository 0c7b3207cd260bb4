"""PNG figures for evaluation: expert usage per demographic group, true vs predicted answer shares per group, and
reliability diagrams.

matplotlib runs on the Agg backend (no display); every function writes one PNG and returns its path.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_routing_heatmap(usage: pd.DataFrame, dimension: str, path: str | Path, max_panels: int = 4) -> Path:
    """Expert-usage heatmaps for one demographic dimension: rows = its groups, columns = experts.

    usage: the table from `cuma_model.survey.evaluate.routing_usage_table` (columns dimension, group, router, expert,
    share). Draws the mean over routers first, then up to `max_panels - 1` routers spread evenly over the model.
    """
    df = usage[usage["dimension"] == dimension]
    if df.empty:
        raise ValueError(f"no routing usage for dimension {dimension!r}")
    routers = list(dict.fromkeys(df["router"]))
    n_pick = min(len(routers), max(max_panels - 1, 0))
    picked = [routers[i] for i in np.linspace(0, len(routers) - 1, n_pick).round().astype(int)] if n_pick else []
    picked = list(dict.fromkeys(picked))
    groups = list(dict.fromkeys(df["group"]))
    experts = sorted(df["expert"].unique())

    def grid(sub: pd.DataFrame) -> np.ndarray:
        t = sub.pivot_table(index="group", columns="expert", values="share", aggfunc="mean", fill_value=0.0)
        return t.reindex(index=groups, columns=experts, fill_value=0.0).to_numpy()

    panels = [("mean over routers", grid(df))] + [(r, grid(df[df["router"] == r])) for r in picked]
    vmax = max(float(g.max()) for _, g in panels) or 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.55 * len(experts) * len(panels),
                                                     1.2 + 0.4 * len(groups)), squeeze=False)
    for ax, (title, g) in zip(axes[0], panels):
        im = ax.imshow(g, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(str(title), fontsize=8)
        ax.set_xticks(range(len(experts)), [str(e) for e in experts], fontsize=7)
        ax.set_yticks(range(len(groups)), groups if ax is axes[0][0] else [""] * len(groups), fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of routed slots")
    fig.suptitle(f"expert usage by {dimension}", fontsize=9, y=1.04)
    return _save(fig, path)


def plot_group_answer_shares(question_ids: Sequence, true_idx: Sequence[int], pred_idx: Sequence[int],
                             labels: Sequence, dimension: str, path: str | Path,
                             choice_names: Sequence[str] | None = None, questions: Sequence | None = None,
                             max_groups: int = 8) -> Path:
    """Bars of true vs predicted answer shares, one panel per group of `dimension` (the largest `max_groups`).

    Rows are pooled over `questions` (all by default) by choice index, which reads well when the questions share
    one answer scale; pass one question id to look at a single question. `choice_names` labels the x axis.
    """
    q = np.asarray(question_ids)
    keep = np.isin(q, list(questions)) if questions is not None else np.ones(q.size, dtype=bool)
    t, p = np.asarray(true_idx)[keep], np.asarray(pred_idx)[keep]
    lab = np.array([str(x) if x is not None else None for x in labels], dtype=object)[keep]
    k = int(max(t.max(initial=0), p.max(initial=0))) + 1
    names = [str(c) for c in choice_names] if choice_names is not None else []
    names += [chr(ord("A") + i) for i in range(len(names), k)]
    counts = pd.Series([x for x in lab if x is not None]).value_counts()
    groups = list(counts.index[:max_groups])
    if not groups:
        raise ValueError(f"no labelled rows for dimension {dimension!r}")
    ncols = min(4, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.4 * nrows), squeeze=False, sharey=True)
    x = np.arange(len(names))
    for ax, g in zip(axes.flat, groups):
        r = lab == g
        ax.bar(x - 0.2, np.bincount(t[r], minlength=len(names)) / r.sum(), 0.4, label="true")
        ax.bar(x + 0.2, np.bincount(p[r], minlength=len(names)) / r.sum(), 0.4, label="predicted")
        ax.set_title(f"{g} (n={int(r.sum())})", fontsize=8)
        ax.set_xticks(x, names, fontsize=7, rotation=30 if max(map(len, names)) > 3 else 0)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"answer shares by {dimension}: true vs predicted", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(curves: dict, path: str | Path, title: str = "", n_bins: int = 10) -> Path:
    """Reliability diagram: per bin of the top answer's probability (equal widths), the share of answers whose top
    choice was right, against the bin's mean probability; a calibrated predictor lies on the diagonal. Bars under
    the curves count the answers per bin (first curve).

    curves: {label: (top-choice probability [N], top choice right [N] bool)}."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.6, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for k, (label, (confidence, correct)) in enumerate(curves.items()):
        confidence = np.asarray(confidence, dtype=np.float64)
        correct = np.asarray(correct, dtype=np.float64)
        bins = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
        n = np.bincount(bins, minlength=n_bins)
        seen = n > 0
        mean_conf = np.bincount(bins, confidence, n_bins)[seen] / n[seen]
        hit = np.bincount(bins, correct, n_bins)[seen] / n[seen]
        ece = float(np.sum(np.abs(hit - mean_conf) * n[seen]) / max(n.sum(), 1))
        ax.plot(mean_conf, hit, marker="o", ms=3, label=f"{label} (ECE {ece:.3f})")
        if k == 0:
            hist.bar(edges[:-1], n, width=1.0 / n_bins, align="edge", color="C0", alpha=0.5)
    ax.set_ylabel("share right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: reliability" if title else "reliability", fontsize=9)
    hist.set_xlabel("probability of the top answer")
    hist.set_ylabel("answers", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_validation_curves(curves: dict, path: str | Path, title: str = "validation NLL during training") -> Path:
    """Validation NLL per scored step, raw (solid) and at each step's fitted temperature (dashed), one colour per
    run; the kept step of each run is circled.

    curves: {label: {"scores": [{"step", "val_nll", "val_nll_calibrated"}, ...], "best_step": int}}
    (metrics.json's train.selection)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k, (label, sel) in enumerate(curves.items()):
        steps = [s["step"] for s in sel["scores"]]
        ax.plot(steps, [s["val_nll"] for s in sel["scores"]], color=f"C{k}", marker="o", ms=3, label=f"{label}")
        ax.plot(steps, [s["val_nll_calibrated"] for s in sel["scores"]], color=f"C{k}", ls="--", lw=1,
                label=f"{label}, at T")
        best = [s for s in sel["scores"] if s["step"] == sel.get("best_step")]
        if best:
            ax.plot([best[0]["step"]], [best[0]["val_nll"]], "o", ms=10, mfc="none", color=f"C{k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("NLL of the validation answers")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
