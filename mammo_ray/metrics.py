"""Metric definitions of a benign (0) / malignant (1) classifier, shared by training (its
validation metrics) and evaluation, so a sweep's table and the evaluation report give the same
value, and the same undefined cases, for the same scores: point estimates, decision thresholds,
calibration, DeLong's AUC interval and the small-sample rule.

scikit-learn computes the point estimates (ROC/PR AUC, curves, confusion matrix, Brier score);
this module adds what it lacks: threshold selection, ECE and reliability bins and DeLong's
variance. Undefined values are ``None`` with a reason, never a silent 0. Bootstrap intervals
and aggregation, which only evaluation uses, are in ``mammo_ray.evaluate.metrics``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

METRIC_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
                "sensitivity_at_90_specificity", "brier", "ece")
THRESHOLD_METHODS = ("youden", "sensitivity", "fixed")
AGGREGATIONS = ("max", "mean")
MAX_CURVE_POINTS = 200

# Why each metric can be undefined (used for bootstrap replicates, where the cause is known
# from the metric alone).
_UNDEFINED_CAUSE = {
    "precision": "no positive predictions",
    "recall": "no malignant cases",
    "specificity": "no benign cases",
    "f1": "no malignant cases and no positive predictions",
    "roc_auc": "only one class",
    "pr_auc": "only one class",
    "sensitivity_at_90_specificity": "only one class",
}
_RANKING = ("roc_auc", "pr_auc", "sensitivity_at_90_specificity")

# Sensitivity/specificity are ratios of counts, and 1 - FPR can land one ulp below the target
# (1 - 0.7 == 0.30000000000000004 but 1 - 0.3 < 0.7 in floating point). The tolerance is far
# below 1/n for any real data set, so it never admits a genuinely lower operating point.
_TOL = 1e-12


# --------------------------------------------------------------------------- validation

def _as_arrays(labels: Iterable[Any], scores: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Validated (labels int64 0/1, scores float64 in [0, 1]) of equal, non-zero length.

    Raises:
        ValueError: on shape, length, label or score problems (the message names the problem).
    """
    y = np.asarray(labels)
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"scores must be numbers in [0, 1]: {e}") from None
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if len(y) != len(s):
        raise ValueError(f"labels has {len(y)} entries but scores has {len(s)}: lengths must match")
    if len(y) == 0:
        raise ValueError("labels and scores are empty: need at least one image")
    try:
        yf = y.astype(np.float64)
        bad = ~((yf == 0) | (yf == 1))
    except (TypeError, ValueError):
        bad = np.ones(len(y), dtype=bool)
    if bad.any():
        examples = [y[i].item() if hasattr(y[i], "item") else y[i] for i in np.flatnonzero(bad)[:5]]
        raise ValueError(f"labels must be 0 (benign) or 1 (malignant); {int(bad.sum())} are not, e.g. {examples}")
    finite = np.isfinite(s)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"scores must be finite; {int((~finite).sum())} are NaN or inf (first: index {i}, {s[i]})")
    if s.min() < 0.0 or s.max() > 1.0:
        raise ValueError(f"scores must be probabilities in [0, 1]; found min {s.min():g}, max {s.max():g}")
    return yf.astype(np.int64), s


def _check_threshold(threshold: float) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold={threshold!r}: must be a number") from None
    if not math.isfinite(t):
        raise ValueError(f"threshold={threshold!r}: must be finite")
    return t


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r}: must be an integer >= 1")
    return int(n_bins)


def _one_class_reason(y: np.ndarray, what: str = "labels") -> str:
    return f"only one class ({'malignant' if y[0] == 1 else 'benign'}) in {what}"


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.min() == 0 and y.max() == 1)


def _is_missing(key: Any) -> bool:
    # NaN counts as missing too: a pandas column of patient ids holds NaN, not None, for gaps.
    return key is None or (isinstance(key, float) and math.isnan(key))


def group_codes(keys: list, *, missing: str, name: str = "keys") -> tuple[np.ndarray, list]:
    """Dense integer codes of ``keys`` (first-seen order) and each code's key; a missing key
    (None, NaN) gets its own code (``missing="own"``, key None) or -1 (``"drop"``). Not pandas'
    factorize: it gives NaN no code of its own, and no error naming an unhashable entry."""
    codes = np.empty(len(keys), dtype=np.int64)
    seen: dict[Any, int] = {}
    group_keys: list = []
    for i, k in enumerate(keys):
        if _is_missing(k):
            codes[i] = -1 if missing == "drop" else len(group_keys)
            group_keys += [] if missing == "drop" else [None]
            continue
        try:
            c = seen.get(k)
        except TypeError:
            raise ValueError(f"{name}[{i}]={k!r}: {name} must be hashable (str, int, tuple)") from None
        if c is None:
            c = seen[k] = len(group_keys)
            group_keys.append(k)
        codes[i] = c
    return codes, group_keys


# --------------------------------------------------------------------------- thresholds

def choose_threshold(labels: Iterable[int], scores: Iterable[float], *, method: str = "youden",
                     target_sensitivity: float = 0.9, fixed: float = 0.5) -> dict[str, Any]:
    """Decision threshold chosen on the VALIDATION split (never on test).

    Args:
        labels, scores: validation labels (0/1) and malignancy probabilities.
        method: "youden" (max TPR - FPR over roc_curve thresholds), "sensitivity" (the highest
            threshold whose sensitivity >= target_sensitivity) or "fixed" (returns ``fixed``).
        target_sensitivity: in (0, 1], for method "sensitivity".
        fixed: in [0, 1]; also the fallback when labels hold one class only.

    Returns:
        {"threshold": float, "method": str, "reason": str | None}. With one class in labels,
        youden/sensitivity are undefined: method becomes "fixed" and reason says why.
        Predicted positive means score >= threshold.

    Raises:
        ValueError: unknown method, out-of-range options, or invalid labels/scores.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold_method={method!r}: use one of {', '.join(THRESHOLD_METHODS)}")
    if not 0.0 < float(target_sensitivity) <= 1.0:
        raise ValueError(f"target_sensitivity={target_sensitivity!r}: must be in (0, 1]")
    if not 0.0 <= float(fixed) <= 1.0:
        raise ValueError(f"fixed={fixed!r}: must be in [0, 1]")
    y, s = _as_arrays(labels, scores)
    if method == "fixed":
        return {"threshold": float(fixed), "method": "fixed", "reason": None}
    if not _both_classes(y):
        return {"threshold": float(fixed), "method": "fixed",
                "reason": f"{_one_class_reason(y, 'validation labels')}: the {method} threshold is undefined, "
                          f"so the fixed threshold {float(fixed):g} is used"}
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    # thresholds[0] is +inf ("nothing positive"), not an operating point anyone would deploy.
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
    if method == "youden":
        # Youden's J = sensitivity + specificity - 1 = TPR - FPR (Youden 1950, Cancer 3:32).
        # Thresholds decrease along the curve, so the first index at the maximum is the highest
        # threshold among ties: the same J with the fewest recalls. Ties are compared with _TOL
        # because equal J from different fractions can differ by an ulp (2/3 - 0 < 1 - 1/3).
        j = tpr - fpr
        i = int(np.argmax(j >= j.max() - _TOL))
    else:
        # TPR never decreases as the threshold decreases, so the first index meeting the target
        # is the highest such threshold; TPR is 1 at the lowest score, so one always exists.
        i = int(np.argmax(tpr >= float(target_sensitivity) - _TOL))
    return {"threshold": float(thr[i]), "method": method, "reason": None}


# --------------------------------------------------------------------------- point estimates

def sensitivity_at_specificity(labels: Iterable[int], scores: Iterable[float], *,
                               specificity: float = 0.9) -> float | None:
    """Highest sensitivity over thresholds whose specificity is >= ``specificity``.

    Only thresholds actually on the ROC curve count: a point interpolated between two of them is
    reachable only by randomizing decisions, so it is not reported.

    Returns:
        The sensitivity, or None when labels hold one class (the ROC curve is undefined).

    Raises:
        ValueError: specificity outside [0, 1] or invalid labels/scores.
    """
    if not 0.0 <= float(specificity) <= 1.0:
        raise ValueError(f"specificity={specificity!r}: must be in [0, 1]")
    y, s = _as_arrays(labels, scores)
    if not _both_classes(y):
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ok = (1.0 - fpr) >= float(specificity) - _TOL  # the +inf threshold (FPR 0) always qualifies
    return float(tpr[ok].max())


def _bin_index(s: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-width bins on [0, 1]: bin b holds edges[b] <= s < edges[b+1]; the last is closed."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    return idx, edges


def expected_calibration_error(labels: Iterable[int], scores: Iterable[float], *, n_bins: int = 10) -> float:
    """ECE with ``n_bins`` equal-width bins (Guo et al. 2017, "On Calibration of Modern Neural
    Networks"): sum over bins of (bin count / n) * |mean score - fraction malignant|.

    scikit-learn has no ECE. This is the binary, positive-class form (calibration of P(malignant),
    the same bins as ``reliability_curve``), not Guo's top-label-confidence form.

    Raises:
        ValueError: n_bins < 1 or invalid labels/scores.
    """
    n_bins = _check_n_bins(n_bins)
    y, s = _as_arrays(labels, scores)
    idx, _ = _bin_index(s, n_bins)
    # (n_b / n) * |sum_b(s)/n_b - sum_b(y)/n_b| == |sum_b(s - y)| / n, with no empty-bin division.
    gap = np.bincount(idx, weights=s - y, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))


def reliability_curve(labels: Iterable[int], scores: Iterable[float], *, n_bins: int = 10) -> dict[str, list]:
    """Reliability-diagram bins (the bins of ``expected_calibration_error``).

    Returns:
        {"bin_lower", "bin_upper", "mean_score", "fraction_positive", "count"}: lists of n_bins
        python numbers; empty bins have count 0 and None means.

    Raises:
        ValueError: n_bins < 1 or invalid labels/scores.
    """
    n_bins = _check_n_bins(n_bins)
    y, s = _as_arrays(labels, scores)
    idx, edges = _bin_index(s, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    s_sum = np.bincount(idx, weights=s, minlength=n_bins)
    y_sum = np.bincount(idx, weights=y, minlength=n_bins)
    return {
        "bin_lower": [float(e) for e in edges[:-1]],
        "bin_upper": [float(e) for e in edges[1:]],
        "mean_score": [float(a / c) if c else None for a, c in zip(s_sum, count, strict=True)],
        "fraction_positive": [float(a / c) if c else None for a, c in zip(y_sum, count, strict=True)],
        "count": [int(c) for c in count],
    }


def binary_metrics(labels: Iterable[int], scores: Iterable[float], *, threshold: float) -> dict[str, Any]:
    """Every METRIC_NAMES entry for one set; threshold-dependent ones at ``threshold``
    (predicted malignant when score >= threshold).

    Returns:
        {metric: float | None for METRIC_NAMES, "undefined": {metric: reason}, "n", "n_pos",
        "n_neg", "threshold", "confusion": {"tp", "fp", "tn", "fn"}}. ece uses 10 equal-width
        bins; brier comes from scikit-learn.

    Raises:
        ValueError: invalid labels/scores or a non-finite threshold.
    """
    y, s = _as_arrays(labels, scores)
    t = _check_threshold(threshold)
    pred = (s >= t).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    n, n_pos, n_neg = len(y), tp + fn, tn + fp
    out: dict[str, Any] = dict.fromkeys(METRIC_NAMES)
    undefined: dict[str, str] = {}
    out["accuracy"] = (tp + tn) / n
    # Undefined ratios are None, not scikit-learn's zero_division=0: a 0 would read as a real
    # (terrible) result in the report and drag bootstrap intervals down.
    if tp + fp:
        out["precision"] = tp / (tp + fp)
    else:
        undefined["precision"] = _UNDEFINED_CAUSE["precision"]
    if n_pos:
        out["recall"] = tp / n_pos
    else:
        undefined["recall"] = _UNDEFINED_CAUSE["recall"]
    if n_neg:
        out["specificity"] = tn / n_neg
    else:
        undefined["specificity"] = _UNDEFINED_CAUSE["specificity"]
    # F1 = 2TP / (2TP + FP + FN): equals the harmonic mean of precision and recall where both are
    # defined, and is still defined (0) when nothing is predicted positive but malignant cases exist.
    if 2 * tp + fp + fn:
        out["f1"] = 2 * tp / (2 * tp + fp + fn)
    else:
        undefined["f1"] = _UNDEFINED_CAUSE["f1"]
    if n_pos and n_neg:
        out["roc_auc"] = float(roc_auc_score(y, s))
        out["pr_auc"] = float(average_precision_score(y, s))
        out["sensitivity_at_90_specificity"] = sensitivity_at_specificity(y, s, specificity=0.9)
    else:
        for m in _RANKING:
            undefined[m] = _one_class_reason(y)
    out["brier"] = float(brier_score_loss(y, s, pos_label=1))
    out["ece"] = expected_calibration_error(y, s, n_bins=10)
    out.update({"undefined": undefined, "n": n, "n_pos": n_pos, "n_neg": n_neg, "threshold": t,
                "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn}})
    return out


#: fewer positives or negatives than this and a set's AUC and its interval are reported as
#: unreliable: 8 images with 2 positives gave "AUC 1.000 [1.000, 1.000]", an interval that
#: only says the bootstrap cannot vary what two positives rank
MIN_PER_CLASS = 10


def small_sample_reason(n_pos: int, n_neg: int) -> str | None:
    """Why a set is too small for its AUC and intervals to mean much, or None."""
    if n_pos >= MIN_PER_CLASS and n_neg >= MIN_PER_CLASS:
        return None
    return (f"unreliable: {n_pos} positive(s) and {n_neg} negative(s), fewer than {MIN_PER_CLASS} in a class; "
            "the AUC and its interval rank only these few")


def delong_auc_ci(labels: Iterable[int], scores: Iterable[float], *, level: float = 0.95) -> dict[str, float] | None:
    """ROC AUC with DeLong's variance (DeLong et al. 1988, midrank form of Sun & Xu 2014) and
    a normal-approximation interval clipped to [0, 1]; None with one class.

    Written here because scikit-learn has no AUC variance. Training uses it for the validation
    AUC of every epoch (a bootstrap per epoch would cost seconds); it treats images as
    independent, so with several images per patient the interval is optimistic: evaluation's
    patient bootstrap is the interval to report.
    """
    y, s = _as_arrays(labels, scores)
    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    if not m or not n:
        return None
    both = rankdata(np.r_[pos, neg])  # midranks: ties count one half
    v10 = (both[:m] - rankdata(pos)) / n  # per positive: share of negatives ranked below it
    v01 = 1.0 - (both[m:] - rankdata(neg)) / m  # per negative: share of positives ranked above it
    auc = float(v10.mean())
    var = (v10.var(ddof=1) / m if m > 1 else 0.0) + (v01.var(ddof=1) / n if n > 1 else 0.0)
    half = float(norm.ppf(0.5 + level / 2)) * math.sqrt(max(var, 0.0))
    return {"auc": auc, "se": math.sqrt(max(var, 0.0)), "low": max(0.0, auc - half), "high": min(1.0, auc + half)}


# --------------------------------------------------------------------------- aggregation

def aggregate(labels: Iterable[int] | None, scores: Iterable[float], keys: Iterable[Any], *,
              how: str = "max") -> tuple[np.ndarray | None, np.ndarray, list]:
    """Breast- or exam-level aggregation of image rows.

    Rows are grouped by key (e.g. (patient_key, laterality) for breast level, patient_key for
    exam level); a group's score is the max or mean of its scores and its label the max of its
    labels (a breast is malignant if any view is). Rows whose key is None (or NaN) are left out.

    ``labels`` None (an unlabeled archive, as the score job meets): the scores only.

    Returns:
        (labels int64 or None, scores float64, group_keys) in order of first appearance; empty
        when every key is None.

    Raises:
        ValueError: how not in ("max", "mean"), mismatched lengths, unhashable keys or invalid
            labels/scores.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"how={how!r}: use one of {', '.join(AGGREGATIONS)}")
    unlabeled = labels is None
    scores = list(scores) if unlabeled else scores
    y, s = _as_arrays(np.zeros(len(scores), np.int64) if unlabeled else labels, scores)
    keys = list(keys)
    if len(keys) != len(y):
        raise ValueError(f"keys has {len(keys)} entries but labels has {len(y)}: lengths must match")
    all_codes, group_keys = group_codes(keys, missing="drop")
    rows = np.flatnonzero(all_codes >= 0)
    codes = all_codes[rows]
    g = len(group_keys)
    if not g:
        return None if unlabeled else np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64), []
    r, c = rows, codes
    lab = np.zeros(g, dtype=np.int64)
    np.maximum.at(lab, c, y[r])
    if how == "max":
        sc = np.full(g, -np.inf)
        np.maximum.at(sc, c, s[r])
    else:
        sc = np.bincount(c, weights=s[r], minlength=g) / np.bincount(c, minlength=g)
    return None if unlabeled else lab, sc, group_keys
