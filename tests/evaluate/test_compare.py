"""Paired AUC comparison of two models on the same images (DeLong and a paired cluster bootstrap)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mammo_ray.evaluate.compare import compare_to_chosen, delong_paired, paired_auc_difference


def _two_models(n=400, seed=0, gap=0.5, shared=1.0):
    """Labels and two correlated score vectors: a common case difficulty plus model noise; model a
    separates the classes by ``gap`` more than b."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    case = rng.normal(size=n) * shared
    a = case + y * (1.0 + gap) + rng.normal(scale=0.7, size=n)
    b = case + y * 1.0 + rng.normal(scale=0.7, size=n)
    return y, 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))  # probabilities, as models give


def test_delong_paired_matches_the_pairwise_definition():
    y, a, b = _two_models(150, seed=1)
    a, b = np.round(a, 2), np.round(b, 2)  # ties count 1/2

    def components(s):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)

    (a10, a01), (b10, b01) = components(a), components(b)
    m, n = len(a10), len(a01)
    var = (np.var(a10 - b10, ddof=1) / m) + (np.var(a01 - b01, ddof=1) / n)
    res = delong_paired(y, a, b)
    assert res["delta"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert res["se"] == pytest.approx(np.sqrt(var))
    from scipy.stats import norm

    assert res["p"] == pytest.approx(2 * norm.sf(abs(res["delta"]) / res["se"]))


def test_pairing_narrows_the_interval_of_a_difference():
    """Correlated models: the paired interval of the difference is far narrower than what the two
    separate intervals imply, and still covers the difference."""
    y, a, b = _two_models(500, seed=2, gap=0.3, shared=1.5)
    res = paired_auc_difference(y, a, b, n_boot=600, seed=0)
    assert res["low"] <= res["delta"] <= res["high"]
    assert res["resampled"] == "images" and res["n_boot"] == 600
    from mammo_ray.metrics import delong_auc_ci

    unpaired_se = np.hypot(delong_auc_ci(y, a)["se"], delong_auc_ci(y, b)["se"])
    assert res["high"] - res["low"] < 0.6 * 2 * 1.96 * unpaired_se
    # the bootstrap and DeLong agree on the width of the image-level interval
    assert (res["high"] - res["low"]) == pytest.approx(2 * 1.96 * res["delong_se"], rel=0.25)


def test_a_real_difference_is_detected_and_none_is_not():
    y, a, b = _two_models(600, seed=3, gap=0.6)
    res = paired_auc_difference(y, a, b, n_boot=400)
    assert res["delta"] > 0 and res["low"] > 0 and res["delong_p"] < 0.01
    same = paired_auc_difference(y, a, a, n_boot=200)
    assert same["delta"] == 0 and same["low"] == same["high"] == 0 and same["delong_p"] == 1.0
    swapped = paired_auc_difference(y, b, a, n_boot=400)
    assert swapped["delta"] == pytest.approx(-res["delta"]) and swapped["high"] < 0


def test_patients_resampled_widen_the_interval_of_repeated_images():
    """Every case imaged 4 times (same scores): resampling images pretends 4x the evidence;
    resampling patients does not."""
    y, a, b = _two_models(150, seed=4, gap=0.3)
    y4, a4, b4 = (np.repeat(v, 4) for v in (y, a, b))
    groups = np.repeat(np.arange(150), 4).tolist()
    img = paired_auc_difference(y4, a4, b4, n_boot=500, seed=1)
    pat = paired_auc_difference(y4, a4, b4, groups=groups, n_boot=500, seed=1)
    assert pat["resampled"] == "patients"
    assert (pat["high"] - pat["low"]) > 1.6 * (img["high"] - img["low"])


def test_bad_input_and_one_class():
    y, a, b = _two_models(50)
    with pytest.raises(ValueError, match="scores_b has 49 entries"):
        paired_auc_difference(y, a, b[:-1])
    with pytest.raises(ValueError, match="n_boot=0"):
        paired_auc_difference(y, a, b, n_boot=0)
    assert paired_auc_difference(np.zeros(50, int), a, b) is None


def test_compare_to_chosen_pairs_images_by_id_and_skips_unlabelled():
    y, a, b = _two_models(300, seed=5, gap=0.5)
    ids = [f"i{k}" for k in range(300)]
    order = np.random.default_rng(0).permutation(300)  # the other checkpoint scored in another order
    y_u = np.where(np.arange(300) < 20, -1, y)  # 20 unlabelled images
    results = [{"tag": "r0.5"}, {"tag": "random"}]
    scored = [{"test": (ids, y_u, a, [None] * 300)},
              {"test": ([ids[k] for k in order], y_u[order], b[order], [None] * 300), "film": ([], [], [], [])}]
    rows = compare_to_chosen(results, scored, "r0.5", n_boot=300, seed=0)
    assert len(rows) == 1 and rows[0]["other"] == "random" and rows[0]["n"] == 280
    direct = paired_auc_difference(y[20:], a[20:], b[20:], n_boot=300, seed=0)
    assert rows[0]["delta"] == pytest.approx(direct["delta"])
    assert compare_to_chosen(results, scored, None, n_boot=300, seed=0) == []


def test_clustered_delong_counts_a_patients_images_once():
    """Obuchowski's clustered variance: one image per patient gives DeLong's exactly; every case
    imaged 4 times gives the standard error of the cases imaged once (independent images would
    halve it)."""
    y, a, b = _two_models(200, seed=6, gap=0.3)
    plain = delong_paired(y, a, b)
    single = delong_paired(y, a, b, groups=list(range(200)))
    assert single["se"] == pytest.approx(plain["se"], rel=1e-12) and single["clustered"] and not plain["clustered"]
    y4, a4, b4 = (np.repeat(v, 4) for v in (y, a, b))
    clustered = delong_paired(y4, a4, b4, groups=np.repeat(np.arange(200), 4).tolist())
    assert clustered["delta"] == pytest.approx(plain["delta"])
    assert clustered["se"] == pytest.approx(plain["se"], rel=1e-9)
    assert delong_paired(y4, a4, b4)["se"] == pytest.approx(plain["se"] / 2, rel=0.05)


def test_clustered_delong_agrees_with_the_patient_bootstrap():
    """Patients with images of both classes (the cross term): the clustered standard error is
    close to the spread of the paired patient bootstrap."""
    rng = np.random.default_rng(7)
    patients = 250
    groups = np.repeat(np.arange(patients), 4)
    y = np.tile([1, 0, 0, 0], patients)
    y[rng.random(len(y)) < 0.15] = 1
    patient_effect = np.repeat(rng.normal(size=patients), 4)  # images of a patient move together
    a = 1 / (1 + np.exp(-(patient_effect + 1.2 * y + rng.normal(scale=0.8, size=len(y)))))
    b = 1 / (1 + np.exp(-(patient_effect + 0.9 * y + rng.normal(scale=0.8, size=len(y)))))
    res = paired_auc_difference(y, a, b, groups=groups.tolist(), n_boot=2000, seed=3)
    assert res["delong_clustered"]
    assert (res["high"] - res["low"]) / (2 * 1.96) == pytest.approx(res["delong_se"], rel=0.2)


def test_a_difference_without_enough_patients_for_its_variance():
    """One patient holds every positive image: the difference is defined, its DeLong variance is
    not (clustered by patient), and the image-level one is."""
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.75, 0.3, 0.4])
    b = np.array([0.6, 0.5, 0.7, 0.1, 0.8, 0.2, 0.3, 0.4])
    groups = ["p1", "p1", "p1", "p2", "p3", "p4", "p5", "p6"]
    res = paired_auc_difference(y, a, b, groups=groups, n_boot=200)
    assert res["delta"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert res["delong_se"] is None and res["delong_p"] is None and res["delong_clustered"]
    assert delong_paired(y, a, b)["se"] > 0
    one = delong_paired(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2]), np.array([0.5, 0.6, 0.1]))
    assert one["delta"] == pytest.approx(1.0 - 0.5) and one["se"] is None
    from mammo_ray.evaluate.report import comparison_rows

    row = comparison_rows([{"chosen": "a", "other": "b", "set": "test", "n": 8, **res}])[0]
    assert row[-1] == "n/a"
