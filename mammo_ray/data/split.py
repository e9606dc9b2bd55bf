"""Deterministic, label-stratified, patient-grouped train/val/test split.

scikit-learn's ``StratifiedGroupKFold`` gives k equal folds, not 80:15:5 ratios, so the
assignment is written here: groups (patients) are visited in a seeded random order, larger
first, and each goes to the split with the largest relative deficit for the labels it
carries. Every image of a patient lands in one split by construction.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from mammo_ray.config import TEST, TRAIN, VAL

SPLITS = (TRAIN, VAL, TEST)


def _order_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}\x00{group}".encode()).hexdigest()


def assign_splits(labels: Sequence[int], groups: Sequence[str], *,
                  ratios: Sequence[float] = (0.8, 0.15, 0.05), seed: int = 0) -> list[str]:
    """Assign each item to ``train``/``val``/``test``.

    Args:
        labels: one label per item (any hashable ints; -1 for unlabeled is a stratum too).
        groups: one group per item (patient key, or the image id when unknown).
        ratios: target fractions for train, val, test.
        seed: the same seed, labels and groups always give the same split.

    Returns:
        The split name of each item, in input order.
    """
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    classes = sorted(set(labels))
    cidx = {c: k for k, c in enumerate(classes)}
    totals = np.zeros(len(classes))
    for lab in labels:
        totals[cidx[lab]] += 1
    target = np.outer(np.asarray(ratios, float), totals)  # split x class
    current = np.zeros_like(target)
    order = sorted(members, key=lambda g: (-len(members[g]), _order_key(seed, g)))
    out = [""] * len(labels)
    for g in order:
        counts = np.zeros(len(classes))
        for i in members[g]:
            counts[cidx[labels[i]]] += 1
        # relative deficit of each split for this group's labels; empty targets never win
        deficit = np.where(target > 0, (target - current) / np.maximum(target, 1e-9), -np.inf)
        with np.errstate(invalid="ignore"):  # -inf * 0 for labels this group lacks
            score = np.where(counts > 0, deficit * counts, 0.0).sum(axis=1) / counts.sum()
        best = int(np.argmax(score))
        current[best] += counts
        for i in members[g]:
            out[i] = SPLITS[best]
    return out
