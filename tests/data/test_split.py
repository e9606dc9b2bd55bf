"""Split: deterministic, stratified, grouped by patient, honours ratios."""
from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from mammo_ray.data.split import assign_splits


def corpus(n=1200, seed=0, per_patient=(1, 4)):
    r = random.Random(seed)
    labels, groups, pid = [], [], 0
    while len(labels) < n:
        k = r.randint(*per_patient)
        lab = r.random() < 0.35
        for _ in range(k):
            # a few patients have images of both classes (as in the real RSNA-derived set)
            labels.append(int(lab if r.random() > 0.05 else not lab))
            groups.append(f"p{pid}")
        pid += 1
    return labels[:n], groups[:n]


def test_deterministic_and_seed_dependent():
    labels, groups = corpus()
    a = assign_splits(labels, groups, seed=7)
    assert a == assign_splits(labels, groups, seed=7)
    assert a != assign_splits(labels, groups, seed=8)


def test_no_patient_in_two_splits():
    labels, groups = corpus()
    where = defaultdict(set)
    for g, s in zip(groups, assign_splits(labels, groups)):
        where[g].add(s)
    assert all(len(s) == 1 for s in where.values())


@pytest.mark.parametrize("ratios", [(0.8, 0.15, 0.05), (0.6, 0.2, 0.2), (0.9, 0.1, 0.0)])
def test_ratios_and_stratification(ratios):
    labels, groups = corpus()
    splits = assign_splits(labels, groups, ratios=ratios)
    n = len(labels)
    counts = Counter(splits)
    for name, r in zip(("train", "val", "test"), ratios):
        assert abs(counts[name] / n - r) < 0.02
    pos = sum(labels) / n
    for name, r in zip(("train", "val", "test"), ratios):
        if r == 0:
            assert counts[name] == 0
            continue
        frac = sum(y for y, s in zip(labels, splits) if s == name) / counts[name]
        assert abs(frac - pos) < 0.05


def test_input_order_does_not_change_assignment():
    labels, groups = corpus(300)
    base = dict(zip(range(300), assign_splits(labels, groups)))
    order = list(range(300))
    random.Random(3).shuffle(order)
    shuffled = assign_splits([labels[i] for i in order], [groups[i] for i in order])
    assert all(base[i] == s for i, s in zip(order, shuffled))


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="3 labels but 2 groups"):
        assign_splits([0, 1, 0], ["a", "b"])
