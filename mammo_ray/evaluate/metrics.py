"""Evaluation's statistics over the shared metric definitions (``mammo_ray.metrics``): the
(cluster) bootstrap, breast/exam-level aggregation and one set's JSON-ready result."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from mammo_ray.metrics import (
    _RANKING,
    _TOL,
    _UNDEFINED_CAUSE,
    MAX_CURVE_POINTS,
    METRIC_NAMES,
    _as_arrays,
    _bin_index,
    _both_classes,
    _check_threshold,
    binary_metrics,
    group_codes,
    reliability_curve,
    small_sample_reason,
)

# Bootstrap replicates are processed in chunks of at most this many (replicate x image) weights,
# so memory stays ~10 MB per array whatever n_boot and n are.
_CHUNK_ELEMENTS = 1_000_000

# --------------------------------------------------------------------------- bootstrap

def _group_codes(groups: Iterable[Any], n: int) -> tuple[np.ndarray, int]:
    """Integer code per row; None/NaN entries each get a code of their own."""
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries but labels has {n}: lengths must match")
    codes, keys = group_codes(groups, missing="own", name="groups")
    return codes, len(keys)


def _replicate_metrics(y: np.ndarray, s: np.ndarray, w: np.ndarray, *, threshold: float,
                       metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Metrics of many bootstrap replicates at once; NaN where undefined.

    A replicate is a weight vector (how often each image was drawn), so each replicate's metrics
    are weighted sums over the ORIGINAL images: one sort serves every replicate and the ROC/PR
    sums become a cumulative sum along rows. Calling scikit-learn per replicate would cost
    ~1-2 ms x 4 metrics x 1000 replicates; this is the same arithmetic (trapezoidal ROC AUC,
    step-wise average precision as in ``average_precision_score``) for the whole matrix.

    Args:
        w: (replicates, n) float counts.
    """
    yf = y.astype(np.float64)
    total = w.sum(axis=1)
    n_pos = w @ yf
    n_neg = total - n_pos
    pred = (s >= threshold).astype(np.float64)
    tp = w @ (yf * pred)
    fp = w @ ((1.0 - yf) * pred)
    fn, tn = n_pos - tp, n_neg - fp
    nan = np.nan
    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        if "accuracy" in metrics:
            out["accuracy"] = (tp + tn) / total
        if "precision" in metrics:
            out["precision"] = np.where(tp + fp > 0, tp / (tp + fp), nan)
        if "recall" in metrics:
            out["recall"] = np.where(n_pos > 0, tp / n_pos, nan)
        if "specificity" in metrics:
            out["specificity"] = np.where(n_neg > 0, tn / n_neg, nan)
        if "f1" in metrics:
            d = 2 * tp + fp + fn
            out["f1"] = np.where(d > 0, 2 * tp / d, nan)
        if "brier" in metrics:
            out["brier"] = (w @ (s - yf) ** 2) / total
        if "ece" in metrics:
            idx, _ = _bin_index(s, 10)
            onehot = np.zeros((len(s), 10))
            onehot[np.arange(len(s)), idx] = s - yf
            out["ece"] = np.abs(w @ onehot).sum(axis=1) / total
        if any(m in metrics for m in _RANKING):
            out.update(_replicate_ranking(yf, s, w, n_pos, n_neg, metrics))
    return out


def _replicate_ranking(yf: np.ndarray, s: np.ndarray, w: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray,
                       metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """The ranking metrics (ROC AUC, average precision, sensitivity at 90% specificity) of every
    replicate, from one sort of the scores (see ``_replicate_metrics``)."""
    nan, out = np.nan, {}
    order = np.argsort(-s, kind="mergesort")
    s_desc = s[order]
    # Last position of each run of equal scores: ties form one ROC step (as roc_curve).
    ends = np.r_[np.flatnonzero(np.diff(s_desc)), len(s) - 1]
    w_desc, y_desc = w[:, order], yf[order]
    tps = np.cumsum(w_desc * y_desc, axis=1)[:, ends]
    fps = np.cumsum(w_desc * (1.0 - y_desc), axis=1)[:, ends]
    zero = np.zeros((len(w), 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.hstack([zero, tps / n_pos[:, None]])
        fpr = np.hstack([zero, fps / n_neg[:, None]])
    both = (n_pos > 0) & (n_neg > 0)
    if "roc_auc" in metrics:
        auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1)
        out["roc_auc"] = np.where(both, auc, nan)
    if "pr_auc" in metrics:
        # AP = sum_k (R_k - R_{k-1}) P_k. Thresholds none of whose images were drawn have
        # 0/0 precision but also zero recall step, so they contribute 0.
        d = tps + fps
        prec = np.divide(tps, d, out=np.zeros_like(tps), where=d > 0)
        out["pr_auc"] = np.where(both, np.sum(np.diff(tpr, axis=1) * prec, axis=1), nan)
    if "sensitivity_at_90_specificity" in metrics:
        ok = (1.0 - fpr) >= 0.9 - _TOL
        sens = np.where(ok, tpr, -np.inf).max(axis=1)
        out["sensitivity_at_90_specificity"] = np.where(both, sens, nan)
    return out


def _check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown or not metrics:
        raise ValueError(f"metrics={list(metrics)!r}: use one or more of {', '.join(METRIC_NAMES)}")
    return metrics


def check_bootstrap(n_boot: int, alpha: float) -> None:
    """Raises ValueError unless n_boot is an integer >= 1 and alpha is in (0, 1)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}: must be an integer >= 1")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha={alpha!r}: must be in (0, 1)")


def replicate_weights(groups: Iterable[Any] | None, n: int, n_boot: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """The bootstrap's replicates as chunks of per-image weights: (first replicate, (r, n) float
    counts). With ``groups`` (patient keys; None entries are their own group) groups are drawn
    with replacement and give all their images their count (cluster bootstrap), else images.
    One draw per replicate, so the draws do not depend on the chunk size."""
    unit, n_units = (np.arange(n), n) if groups is None else _group_codes(groups, n)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // max(n, 1)))
    for start in range(0, n_boot, chunk):
        r = min(chunk, n_boot - start)
        counts = np.stack([np.bincount(rng.integers(0, n_units, size=n_units), minlength=n_units) for _ in range(r)])
        yield start, counts[:, unit].astype(np.float64)


def bootstrap_ci(labels: Iterable[int], scores: Iterable[float], *, threshold: float,
                 groups: Iterable[Any] | None = None, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, metrics: Iterable[str] = METRIC_NAMES) -> dict[str, Any]:
    """Percentile bootstrap (1 - alpha) confidence intervals (Efron & Tibshirani 1993, ch. 13).

    With ``groups`` (patient keys, one per image; None entries count as their own group), GROUPS
    are resampled with replacement and contribute all their images (cluster bootstrap: images of
    one patient are correlated, so resampling images would make intervals too narrow). Otherwise
    images are resampled. scikit-learn has no bootstrap.

    Replicates where a metric is undefined are skipped for it; if fewer than half are defined,
    its interval is None with a reason.

    Returns:
        {metric: {"low", "high", "n_valid", "reason"}, "_resampled": "patients" | "images",
        "_n_boot": n_boot}.

    Raises:
        ValueError: n_boot < 1, alpha outside (0, 1), unknown metrics, mismatched groups or
            invalid labels/scores.
    """
    y, s = _as_arrays(labels, scores)
    t = _check_threshold(threshold)
    metrics = _check_metrics(metrics)
    check_bootstrap(n_boot, alpha)
    values = {m: np.empty(n_boot) for m in metrics}
    for start, w in replicate_weights(groups, len(y), n_boot, seed):
        vals = _replicate_metrics(y, s, w, threshold=t, metrics=metrics)
        for m in metrics:
            values[m][start:start + len(w)] = vals[m]
    out: dict[str, Any] = {}
    for m in metrics:
        v = values[m][~np.isnan(values[m])]
        if 2 * len(v) < n_boot:
            out[m] = {"low": None, "high": None, "n_valid": len(v),
                      "reason": f"{m} defined in only {len(v)} of {n_boot} bootstrap replicates "
                                f"(the rest: {_UNDEFINED_CAUSE.get(m, 'undefined')}); "
                                "an interval needs at least half"}
        else:
            low, high = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
            out[m] = {"low": float(low), "high": float(high), "n_valid": len(v), "reason": None}
    out["_resampled"] = "images" if groups is None else "patients"
    out["_n_boot"] = int(n_boot)
    return out


# --------------------------------------------------------------------------- one set, JSON-ready

def _json_floats(a: np.ndarray) -> list[float | None]:
    # JSON has no inf/NaN (roc_curve's first threshold is +inf): those become None.
    return [float(x) if math.isfinite(x) else None for x in a]


def _downsample(n_points: int, max_points: int = MAX_CURVE_POINTS) -> np.ndarray:
    """Evenly spaced indices keeping both ends, at most max_points of them."""
    if n_points <= max_points:
        return np.arange(n_points)
    return np.unique(np.linspace(0, n_points - 1, max_points).round().astype(np.int64))


def evaluate_set(labels: Iterable[int], scores: Iterable[float], *, threshold: float,
                 groups: Iterable[Any] | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """binary_metrics + bootstrap_ci + reliability_curve + ROC/PR curve points for one set.

    Args:
        threshold: chosen on validation (``choose_threshold``) and applied unchanged here.
        groups: patient keys for the cluster bootstrap (see ``bootstrap_ci``).
        n_boot: bootstrap replicates; 0 skips the bootstrap ("ci" is None).

    Returns:
        A JSON-ready dict (python floats/ints/None/str only): "n", "n_pos", "n_neg", "threshold",
        "metrics" {METRIC_NAMES: float | None}, "undefined" {metric: reason}, "confusion",
        "ci" (bootstrap_ci output or None), "reliability", "roc" {"fpr", "tpr", "thresholds"} and
        "pr" {"precision", "recall", "thresholds"} (at most 200 points each; None with one class;
        a threshold with no finite value, e.g. ROC's first, is None), and "small_sample" (a
        reason string when a class has fewer than :data:`MIN_PER_CLASS` images, else None).

    Raises:
        ValueError: invalid inputs (see the functions above) or n_boot < 0.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot={n_boot!r}: must be an integer >= 0 (0 skips the bootstrap)")
    y, s = _as_arrays(labels, scores)
    bm = binary_metrics(y, s, threshold=threshold)
    res: dict[str, Any] = {
        "n": bm["n"], "n_pos": bm["n_pos"], "n_neg": bm["n_neg"], "threshold": bm["threshold"],
        "metrics": {m: (None if bm[m] is None else float(bm[m])) for m in METRIC_NAMES},
        "undefined": dict(bm["undefined"]),
        "confusion": dict(bm["confusion"]),
        "ci": bootstrap_ci(y, s, threshold=threshold, groups=groups, n_boot=int(n_boot), seed=seed)
        if n_boot > 0 else None,
        "reliability": reliability_curve(y, s, n_bins=10),
        "roc": None,
        "pr": None,
    }
    res["small_sample"] = small_sample_reason(bm["n_pos"], bm["n_neg"])
    if _both_classes(y):
        fpr, tpr, thr = roc_curve(y, s)
        i = _downsample(len(fpr))
        res["roc"] = {"fpr": _json_floats(fpr[i]), "tpr": _json_floats(tpr[i]), "thresholds": _json_floats(thr[i])}
        prec, rec, thr = precision_recall_curve(y, s)
        # precision_recall_curve's last point (recall 0, precision 1) has no threshold.
        thr = np.r_[thr, np.nan]
        i = _downsample(len(prec))
        res["pr"] = {"precision": _json_floats(prec[i]), "recall": _json_floats(rec[i]),
                     "thresholds": _json_floats(thr[i])}
    return res
