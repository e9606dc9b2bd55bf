"""Paired comparison of two checkpoints' AUCs on the same images.

Two models scored on one test set are not independent samples: the same hard cases make both
look worse. Comparing their separate intervals (do they overlap?) ignores that and is far too
conservative; radiology papers report the difference with a paired test instead (DeLong et al.
1988, as in pROC's ``roc.test``). Two are given here, because scikit-learn has neither:

- the paired DeLong test: the covariance of the two AUCs' structural components gives the
  variance of their difference; with patient keys, clustered by patient (Obuchowski 1997);
- a paired cluster bootstrap: patients resampled, each replicate scoring both models on the
  same draw, so the interval of the difference keeps the pairing and the patient correlation.
  The bootstrap is the interval to report when patient keys exist (images of one patient are
  correlated), as for the single-model intervals.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from mammo_ray.evaluate.metrics import _group_codes, _replicate_ranking, check_bootstrap, replicate_weights
from mammo_ray.metrics import _as_arrays


def _components(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components (midrank form): per positive, the share of negatives
    ranked below it; per negative, the share of positives ranked above it (ties count 1/2)."""
    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    both = rankdata(np.r_[pos, neg])
    return (both[:m] - rankdata(pos)) / n, 1.0 - (both[m:] - rankdata(neg)) / m


def delong_paired(labels: Iterable[int], scores_a: Iterable[float], scores_b: Iterable[float], *,
                  groups: Iterable[Any] | None = None) -> dict[str, Any] | None:
    """AUC(a) - AUC(b) on the same images, its DeLong standard error and two-sided p-value.

    With ``groups`` (patient keys) the variance is the clustered one of Obuchowski (1997,
    Biometrics 53:567): each patient's structural components are summed, so several images of
    one patient count as one correlated unit (treating them as independent shrinks the standard
    error by up to the square root of the images per patient).

    Returns:
        None with one class; else {"auc_a", "auc_b", "delta", "se", "p", "clustered"}, where
        "se" and "p" are None when the variance cannot be estimated (fewer than two images, or
        with ``groups`` two patients, holding each class).
    """
    y, a = _as_arrays(labels, scores_a)
    _, b = _as_arrays(labels, scores_b)
    m, n = int((y == 1).sum()), int((y == 0).sum())
    if not m or not n:
        return None
    (a10, a01), (b10, b01) = _components(y, a), _components(y, b)
    d10, d01 = a10 - b10, a01 - b01  # the difference's components (DeLong's statistic is linear in them)
    delta = float(d10.mean())
    out = {"auc_a": float(a10.mean()), "auc_b": float(b10.mean()), "delta": delta, "se": None, "p": None,
           "clustered": groups is not None}
    if groups is None:
        if m < 2 or n < 2:
            return out
        var = np.var(d10, ddof=1) / m + np.var(d01, ddof=1) / n
    else:
        codes, k = _group_codes(groups, len(y))
        m_i, n_i = np.bincount(codes[y == 1], minlength=k), np.bincount(codes[y == 0], minlength=k)
        k10, k01 = int((m_i > 0).sum()), int((n_i > 0).sum())  # patients with positives / negatives
        if k10 < 2 or k01 < 2:
            return out
        # per patient: summed components minus their expectation (its images of the class x delta)
        c10 = np.bincount(codes[y == 1], weights=d10, minlength=k) - m_i * delta
        c01 = np.bincount(codes[y == 0], weights=d01, minlength=k) - n_i * delta
        var = (k10 / (k10 - 1) * (c10 @ c10) / m ** 2 + k01 / (k01 - 1) * (c01 @ c01) / n ** 2
               + 2 * k / (k - 1) * (c10 @ c01) / (m * n))
    se = math.sqrt(max(float(var), 0.0))
    out["se"], out["p"] = se, float(2 * norm.sf(abs(delta) / se)) if se > 0 else (1.0 if delta == 0 else 0.0)
    return out


def paired_auc_difference(labels: Iterable[int], scores_a: Iterable[float], scores_b: Iterable[float], *,
                          groups: Iterable[Any] | None = None, n_boot: int = 1000, alpha: float = 0.05,
                          seed: int = 0) -> dict[str, Any] | None:
    """AUC(a) - AUC(b) on the same images with a paired percentile-bootstrap interval (patients
    resampled when ``groups`` is given, else images) and the paired DeLong test.

    Returns:
        None with one class; else {"auc_a", "auc_b", "delta", "low", "high", "resampled",
        "n_boot", "delong_se", "delong_p", "delong_clustered"} ("delong_se"/"delong_p" None when a
        class has fewer than two images, or with ``groups`` two patients, to estimate the variance
        from; "low"/"high" None when fewer than half the replicates hold both classes).

    Raises:
        ValueError: mismatched lengths, invalid labels/scores, n_boot < 1 or alpha outside (0, 1).
    """
    a, b = np.asarray(list(scores_a)), np.asarray(list(scores_b))
    if len(a) != len(b):
        raise ValueError(f"scores_b has {len(b)} entries but scores_a has {len(a)}: the same images are needed")
    y, a = _as_arrays(labels, a)
    _, b = _as_arrays(labels, b)
    check_bootstrap(n_boot, alpha)
    if groups is not None:
        groups = list(groups)
    dl = delong_paired(y, a, b, groups=groups)
    if dl is None:
        return None
    deltas = np.empty(n_boot)
    yf = y.astype(np.float64)
    for start, w in replicate_weights(groups, len(y), n_boot, seed):
        n_pos = w @ yf
        n_neg = w.sum(axis=1) - n_pos
        auc_a = _replicate_ranking(yf, a, w, n_pos, n_neg, ("roc_auc",))["roc_auc"]
        auc_b = _replicate_ranking(yf, b, w, n_pos, n_neg, ("roc_auc",))["roc_auc"]
        deltas[start:start + len(w)] = auc_a - auc_b
    valid = deltas[~np.isnan(deltas)]
    low, high = (np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0]) if 2 * len(valid) >= n_boot
                 else (np.nan, np.nan))
    return {"auc_a": dl["auc_a"], "auc_b": dl["auc_b"], "delta": dl["delta"],
            "low": None if np.isnan(low) else float(low), "high": None if np.isnan(high) else float(high),
            "resampled": "images" if groups is None else "patients", "n_boot": int(n_boot),
            "delong_se": dl["se"], "delong_p": dl["p"], "delong_clustered": dl["clustered"]}


def compare_to_chosen(results: list[dict[str, Any]], scored: list[dict[str, tuple]], chosen: str | None, *,
                      n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Every checkpoint against the one chosen on val, set by set, paired on the images both scored.

    Args:
        results: evaluate's per-checkpoint results (``tag``, ``sets``).
        scored: per checkpoint, {set name: (image_ids, labels, scores, patient_keys)}.
        chosen: the tag chosen on val (``report.chosen_by_val``); None: no comparison.

    Returns:
        One row per (other checkpoint, set): {"chosen", "other", "set", "n", "delta" (chosen minus
        other), "low", "high", "resampled", "delong_p", ...}; a row with "reason" where the two
        share no labelled images of both classes.
    """
    if chosen is None or n_boot < 1:
        return []
    i = next(k for k, r in enumerate(results) if r["tag"] == chosen)
    rows = []
    for k, other in enumerate(results):
        if k == i:
            continue
        for name, (ids, labels, scores, groups) in scored[i].items():
            if name not in scored[k]:
                continue
            o_ids, _, o_scores, _ = scored[k][name]
            where = {iid: j for j, iid in enumerate(o_ids)}
            keep = [j for j, iid in enumerate(ids) if iid in where and labels[j] >= 0]
            row = {"chosen": chosen, "other": other["tag"], "set": name, "n": len(keep)}
            y = np.asarray(labels)[keep]
            res = None
            if len(keep) and len(set(y.tolist())) == 2:
                g = [groups[j] for j in keep]
                res = paired_auc_difference(y, np.asarray(scores)[keep], np.asarray(o_scores)[[where[ids[j]] for j in keep]],
                                            groups=g if any(x is not None for x in g) else None,
                                            n_boot=n_boot, seed=seed)
            rows.append({**row, **res} if res else {**row, "reason": "no labelled images of both classes in common"})
    return rows


def mean_scores(members: list[tuple], name: str) -> tuple[list[str], np.ndarray, np.ndarray, list]:
    """The mean probability per image over an ensemble's members, each ``(image_ids, labels,
    scores, patient_keys)`` of one set; aligned by image id, in the first member's order.

    Raises:
        ValueError: the members scored different images of the set.
    """
    ids, labels, _, groups = members[0]
    total = np.zeros(len(ids))
    for k, (m_ids, _, m_scores, _) in enumerate(members):
        where = {iid: j for j, iid in enumerate(m_ids)}
        if len(where) != len(ids) or any(i not in where for i in ids):
            raise ValueError(f"ensemble: member {k + 1} scored other images of {name} than member 1 "
                             f"({len(m_ids)} vs {len(ids)}); an ensemble needs the same images")
        total += np.asarray(m_scores, dtype=np.float64)[[where[i] for i in ids]]
    return list(ids), np.asarray(labels), total / len(members), list(groups)
