"""Figures of the evaluation report (matplotlib, Agg): ROC and PR curves with every set
overlaid, confusion matrices, reliability diagram. Each function returns PNG bytes."""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from mammo_ray.config import LABELS


def _figure(size=(5, 4)):
    import matplotlib  # deferred: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=110)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _curve_figure(curves: dict[str, dict[str, Any]], *, curve: str, x: str, y: str, metric: str, short: str,
                  title: str, xlabel: str, ylabel: str, legend_loc: str, diagonal: bool) -> bytes:
    plt, fig, ax = _figure()
    for name, res in curves.items():
        points = res.get(curve)
        if not points:
            continue
        value = res["metrics"].get(metric)
        ax.plot(points[x], points[y], label=f"{name} ({short} {value:.3f})" if value is not None else name)
    if diagonal:
        ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc=legend_loc)
    return _png(plt, fig)


def roc_figure(curves: dict[str, dict[str, Any]], title: str) -> bytes:
    """``curves``: set name -> evaluate_set() output (uses its roc curve and AUC)."""
    return _curve_figure(curves, curve="roc", x="fpr", y="tpr", metric="roc_auc", short="AUC", title=title,
                         xlabel="1 - specificity", ylabel="sensitivity", legend_loc="lower right", diagonal=True)


def pr_figure(curves: dict[str, dict[str, Any]], title: str) -> bytes:
    return _curve_figure(curves, curve="pr", x="recall", y="precision", metric="pr_auc", short="AP", title=title,
                         xlabel="recall (sensitivity)", ylabel="precision", legend_loc="lower left", diagonal=False)


def confusion_figure(confusion: dict[str, int], title: str) -> bytes:
    plt, fig, ax = _figure((3.4, 3.0))
    m = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=list(LABELS), yticklabels=list(LABELS),
           xlabel="predicted", ylabel="true", title=title)
    return _png(plt, fig)


def reliability_figure(curves: dict[str, dict[str, Any]], title: str) -> bytes:
    plt, fig, ax = _figure()
    for name, res in curves.items():
        rel = res.get("reliability")
        if not rel:
            continue
        pts = [(m, f) for m, f, c in zip(rel["mean_score"], rel["fraction_positive"], rel["count"], strict=True) if c]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ece = res["metrics"].get("ece")
            ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})" if ece is not None else name)
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="fraction malignant", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper left")
    return _png(plt, fig)
