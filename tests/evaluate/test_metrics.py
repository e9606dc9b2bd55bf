"""Evaluation metrics: hand-computed tables, thresholds chosen on validation, calibration,
(cluster) bootstrap intervals, aggregation and the JSON-ready per-set result."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from mammo_ray.evaluate.metrics import _replicate_metrics, bootstrap_ci, evaluate_set
from mammo_ray.metrics import aggregate
from mammo_ray.metrics import (
    METRIC_NAMES,
    binary_metrics,
    choose_threshold,
    delong_auc_ci,
    expected_calibration_error,
    reliability_curve,
    sensitivity_at_specificity,
)


def synthetic(n: int, seed: int, *, sep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced-ish labels; scores = logistic(sep * label + noise), so AUC is well inside (0.5, 1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 1.0 / (1.0 + np.exp(-(sep * (2 * y - 1) + rng.normal(0.0, 1.0, n))))
    return y, s


def trapezoid(x: list[float], y: list[float]) -> float:
    return float(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(x, x[1:], y, y[1:])))


def width(ci: dict, metric: str) -> float:
    return ci[metric]["high"] - ci[metric]["low"]


# --------------------------------------------------------------------------- point estimates

def test_confusion_table_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    scores = [0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.5, 0.55]
    # At 0.5 (score >= 0.5 is positive, so index 6 at exactly 0.5 is predicted positive):
    # TP: idx 0, 1, 7 -> 3   FN: idx 2 -> 1   FP: idx 3, 6 -> 2   TN: idx 4, 5 -> 2
    tp, fn, fp, tn = 3, 1, 2, 2
    m = binary_metrics(labels, scores, threshold=0.5)
    assert m["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert (m["n"], m["n_pos"], m["n_neg"], m["threshold"]) == (8, 4, 4, 0.5)
    precision, recall = 3 / 5, 3 / 4
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(precision)
    assert m["recall"] == pytest.approx(recall)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    # Brier: mean squared error of the probabilities.
    assert m["brier"] == pytest.approx(np.mean((np.array(scores) - np.array(labels)) ** 2))
    assert m["undefined"] == {}
    assert set(METRIC_NAMES) <= set(m)


def test_roc_auc_with_ties_by_hand():
    # pos x neg pairs: (0.5 vs 0.5) x2 are ties (0.5 each), (0.9 vs 0.5) x2 are wins -> (1 + 2) / 4.
    m = binary_metrics([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.9], threshold=0.5)
    assert m["roc_auc"] == pytest.approx(0.75)


def test_perfect_and_inverted_scores():
    labels = [0, 0, 0, 1, 1]
    perfect = binary_metrics(labels, [0.1, 0.2, 0.3, 0.8, 0.9], threshold=0.5)
    assert perfect["roc_auc"] == 1.0 and perfect["pr_auc"] == 1.0 and perfect["accuracy"] == 1.0
    assert perfect["sensitivity_at_90_specificity"] == 1.0
    inverted = binary_metrics(labels, [0.9, 0.8, 0.7, 0.2, 0.1], threshold=0.5)
    assert inverted["roc_auc"] == 0.0 and inverted["accuracy"] == 0.0


def test_one_class_ranking_metrics_are_none_with_reason():
    m = binary_metrics([0, 0, 0], [0.1, 0.6, 0.3], threshold=0.5)
    for k in ("roc_auc", "pr_auc", "sensitivity_at_90_specificity", "recall"):
        assert m[k] is None and k in m["undefined"]
    assert "one class" in m["undefined"]["roc_auc"] and "benign" in m["undefined"]["roc_auc"]
    assert m["undefined"]["recall"] == "no malignant cases"
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == 0.0  # one positive prediction, wrong: defined and 0
    assert m["brier"] is not None and m["ece"] is not None
    only_malignant = binary_metrics([1, 1], [0.2, 0.7], threshold=0.5)
    assert only_malignant["specificity"] is None
    assert only_malignant["undefined"]["specificity"] == "no benign cases"
    assert "malignant" in only_malignant["undefined"]["roc_auc"]


def test_no_positive_predictions_precision_none():
    m = binary_metrics([0, 1, 1, 0], [0.1, 0.4, 0.3, 0.2], threshold=0.5)
    assert m["confusion"] == {"tp": 0, "fp": 0, "tn": 2, "fn": 2}
    assert m["precision"] is None
    assert m["undefined"]["precision"] == "no positive predictions"
    assert m["recall"] == 0.0 and m["f1"] == 0.0  # F1 = 2TP/(2TP+FP+FN) is still defined
    none_at_all = binary_metrics([0, 0], [0.1, 0.2], threshold=0.5)
    assert none_at_all["f1"] is None and "f1" in none_at_all["undefined"]


def test_sensitivity_at_specificity_by_hand():
    neg = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.6, 0.8]
    pos = [0.9, 0.7, 0.65, 0.5, 0.12]
    labels, scores = [0] * 10 + [1] * 5, neg + pos
    # spec >= 0.9 allows 1 FP (0.8): lowest threshold with 1 FP is 0.65 -> TP 0.9, 0.7, 0.65 = 3/5.
    assert sensitivity_at_specificity(labels, scores, specificity=0.9) == pytest.approx(0.6)
    # spec >= 0.8 allows 2 FP (0.8, 0.6): threshold 0.5 -> 4/5.
    assert sensitivity_at_specificity(labels, scores, specificity=0.8) == pytest.approx(0.8)
    # spec 1.0: no FP allowed -> threshold 0.9 -> 1/5.
    assert sensitivity_at_specificity(labels, scores, specificity=1.0) == pytest.approx(0.2)
    # spec 0.2 allows 8 FP; threshold 0.12 has exactly 8 (specificity 2/10). In floating point
    # 1 - 8/10 < 0.2, so without a tolerance this point would be lost (answer 0.8).
    assert sensitivity_at_specificity(labels, scores, specificity=0.2) == pytest.approx(1.0)
    assert binary_metrics(labels, scores, threshold=0.5)["sensitivity_at_90_specificity"] == pytest.approx(0.6)
    assert sensitivity_at_specificity([1, 1], [0.2, 0.3]) is None


# --------------------------------------------------------------------------- calibration

def test_ece_calibrated_is_small():
    rng = np.random.default_rng(1)
    s = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, 20000) < s).astype(int)
    assert expected_calibration_error(y, s) < 0.03


def test_ece_overconfident_constant():
    y = np.array([0, 1] * 500)
    assert expected_calibration_error(y, np.full(1000, 0.9)) == pytest.approx(0.4)


def test_ece_and_reliability_by_hand():
    labels, scores = [0, 1, 1, 1], [0.05, 0.15, 0.95, 1.0]
    # bin [0, .1): |.05 - 0| x1; bin [.1, .2): |.15 - 1| x1; bin [.9, 1]: |.975 - 1| x2 (1.0 in the last bin)
    assert expected_calibration_error(labels, scores) == pytest.approx((0.05 + 0.85 + 2 * 0.025) / 4)
    rel = reliability_curve(labels, scores)
    assert rel["count"] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert rel["mean_score"][9] == pytest.approx(0.975) and rel["fraction_positive"][1] == 1.0
    assert rel["mean_score"][4] is None and rel["fraction_positive"][4] is None
    assert rel["bin_lower"][0] == 0.0 and rel["bin_upper"][-1] == 1.0 and len(rel["bin_lower"]) == 10
    with pytest.raises(ValueError, match="n_bins"):
        reliability_curve(labels, scores, n_bins=0)


# --------------------------------------------------------------------------- thresholds

VAL_LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
VAL_SCORES = [0.1, 0.2, 0.5, 0.6, 0.45, 0.7, 0.8, 0.9]


def test_youden_by_hand():
    # J = TPR - FPR at each threshold: 0.9: .25-0; 0.8: .5-0; 0.7: .75-0 (max); 0.6: .75-.25;
    # 0.5: .75-.5; 0.45: 1-.5.
    t = choose_threshold(VAL_LABELS, VAL_SCORES, method="youden")
    assert t == {"threshold": 0.7, "method": "youden", "reason": None}


def test_youden_tie_takes_higher_threshold():
    # 0.7: TPR 2/3, FPR 0 -> J 2/3; 0.5: TPR 1, FPR 1/3 -> J 2/3 (1 - 1/3 is one ulp above 2/3 in
    # floating point). Same J: the higher threshold, with fewer recalls, wins.
    t = choose_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.7, 0.9])
    assert t["threshold"] == 0.7


def test_sensitivity_threshold_meets_target_and_is_highest():
    y, s = synthetic(400, seed=3)
    t = choose_threshold(y, s, method="sensitivity", target_sensitivity=0.9)
    assert t["method"] == "sensitivity"
    sens = np.mean(s[y == 1] >= t["threshold"])
    assert sens >= 0.9
    # The next higher score as threshold would miss the target.
    higher = np.min(s[s > t["threshold"]])
    assert np.mean(s[y == 1] >= higher) < 0.9
    assert binary_metrics(y, s, threshold=t["threshold"])["recall"] >= 0.9


def test_threshold_one_class_falls_back_to_fixed():
    for method in ("youden", "sensitivity"):
        t = choose_threshold([0, 0, 0], [0.2, 0.4, 0.9], method=method, fixed=0.3)
        assert t["threshold"] == 0.3 and t["method"] == "fixed"
        assert "one class" in t["reason"] and method in t["reason"]
    assert choose_threshold([0, 1], [0.2, 0.9], method="fixed", fixed=0.42) == \
        {"threshold": 0.42, "method": "fixed", "reason": None}


def test_bad_threshold_method():
    with pytest.raises(ValueError, match="max_f1.*youden, sensitivity, fixed"):
        choose_threshold([0, 1], [0.1, 0.9], method="max_f1")
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold([0, 1], [0.1, 0.9], method="sensitivity", target_sensitivity=1.5)


def test_validation_threshold_applied_to_test_unchanged():
    t_val = choose_threshold(VAL_LABELS, VAL_SCORES)["threshold"]
    assert t_val == 0.7
    test_labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    test_scores = np.array([0.1, 0.3, 0.45, 0.65, 0.5, 0.6, 0.75, 0.95])
    m = binary_metrics(test_labels, test_scores, threshold=t_val)
    pred = test_scores >= t_val
    manual = {"tp": int(np.sum(pred & (test_labels == 1))), "fp": int(np.sum(pred & (test_labels == 0))),
              "tn": int(np.sum(~pred & (test_labels == 0))), "fn": int(np.sum(~pred & (test_labels == 1)))}
    assert m["threshold"] == t_val
    assert m["confusion"] == manual == {"tp": 2, "fp": 0, "tn": 4, "fn": 2}
    # The test set's own Youden threshold (0.5: TPR 1, FPR .25) would give other counts: had the
    # threshold been re-tuned on test, the reported metrics would be optimistic.
    t_test = choose_threshold(test_labels, test_scores)["threshold"]
    assert t_test == 0.5
    own = binary_metrics(test_labels, test_scores, threshold=t_test)["confusion"]
    assert own == {"tp": 4, "fp": 1, "tn": 3, "fn": 0} and own != m["confusion"]


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("labels, scores, match", [
    ([0, 1], [0.5], "lengths must match"),
    ([], [], "empty"),
    ([0, 2], [0.1, 0.2], "0 \\(benign\\) or 1"),
    ([0, 1], [0.1, float("nan")], "finite"),
    ([0, 1], [0.1, 1.5], r"\[0, 1\]"),
    ([0, 1], ["a", 0.2], "numbers"),
])
def test_input_validation(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(labels, scores, threshold=0.5)


# --------------------------------------------------------------------------- bootstrap

def test_replicate_fast_path_matches_sklearn_on_resampled_data():
    # Each weight row is a bootstrap replicate; the vectorized metrics must equal binary_metrics
    # (scikit-learn) on the explicitly repeated data, ties and undefined cases included.
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 30)
    s = np.round(rng.uniform(0, 1, 30), 1)  # many ties
    w = np.stack([np.bincount(rng.integers(0, 30, 30), minlength=30) for _ in range(20)]).astype(float)
    only_neg = np.where(y == 0, 1.0, 0.0)  # one class: ranking metrics undefined
    w = np.vstack([w, only_neg])
    vals = _replicate_metrics(y, s, w, threshold=0.45, metrics=METRIC_NAMES)
    for r in range(len(w)):
        idx = np.repeat(np.arange(30), w[r].astype(int))
        ref = binary_metrics(y[idx], s[idx], threshold=0.45)
        for m in METRIC_NAMES:
            if ref[m] is None:
                assert np.isnan(vals[m][r]), (r, m)
            else:
                assert vals[m][r] == pytest.approx(ref[m], rel=1e-9, abs=1e-12), (r, m)


def test_bootstrap_contains_point_estimate_and_is_deterministic():
    y, s = synthetic(500, seed=11)
    point = binary_metrics(y, s, threshold=0.5)
    ci = bootstrap_ci(y, s, threshold=0.5, n_boot=400, seed=5)
    assert ci["_resampled"] == "images" and ci["_n_boot"] == 400
    for m in ("roc_auc", "accuracy", "pr_auc", "brier"):
        assert ci[m]["low"] < point[m] < ci[m]["high"], m
        assert ci[m]["n_valid"] == 400 and ci[m]["reason"] is None
    assert bootstrap_ci(y, s, threshold=0.5, n_boot=400, seed=5) == ci
    assert bootstrap_ci(y, s, threshold=0.5, n_boot=400, seed=6)["roc_auc"] != ci["roc_auc"]
    sub = bootstrap_ci(y, s, threshold=0.5, n_boot=50, metrics=("roc_auc",))
    assert set(sub) == {"roc_auc", "_resampled", "_n_boot"}


def test_bootstrap_narrows_with_more_data():
    y_small, s_small = synthetic(200, seed=21)
    y_big, s_big = synthetic(2000, seed=22)
    small = bootstrap_ci(y_small, s_small, threshold=0.5, n_boot=300)
    big = bootstrap_ci(y_big, s_big, threshold=0.5, n_boot=300)
    # Widths scale ~ 1/sqrt(n): expected ratio ~ 0.32.
    for m in ("roc_auc", "accuracy"):
        assert width(big, m) / width(small, m) < 0.6, m


def test_cluster_bootstrap_is_wider_for_correlated_images():
    # 100 patients x 5 identical images: the data hold 100 independent units, not 500.
    rng = np.random.default_rng(31)
    y_p = rng.integers(0, 2, 100)
    s_p = 1.0 / (1.0 + np.exp(-((2 * y_p - 1) + rng.normal(0, 1, 100))))
    y, s = np.repeat(y_p, 5), np.repeat(s_p, 5)
    groups = np.repeat([f"patient-{i}" for i in range(100)], 5)
    images = bootstrap_ci(y, s, threshold=0.5, n_boot=400)
    patients = bootstrap_ci(y, s, threshold=0.5, groups=groups, n_boot=400)
    assert patients["_resampled"] == "patients" and images["_resampled"] == "images"
    # Expected ratio ~ sqrt(5) = 2.2.
    for m in ("roc_auc", "accuracy"):
        assert width(patients, m) > 1.5 * width(images, m), m


def test_cluster_bootstrap_none_groups_are_their_own_patient():
    y, s = synthetic(300, seed=41)
    # Every key None -> every image its own group: the same draws as the image bootstrap.
    none_groups = bootstrap_ci(y, s, threshold=0.5, groups=[None] * 300, n_boot=100)
    images = bootstrap_ci(y, s, threshold=0.5, n_boot=100)
    assert none_groups["_resampled"] == "patients"
    assert {k: v for k, v in none_groups.items() if k != "_resampled"} == \
        {k: v for k, v in images.items() if k != "_resampled"}
    with pytest.raises(ValueError, match="groups has 2 entries"):
        bootstrap_ci(y, s, threshold=0.5, groups=["a", "b"], n_boot=10)


def test_bootstrap_undefined_metric_gives_none_with_reason():
    ci = bootstrap_ci([1, 1, 1], [0.2, 0.6, 0.9], threshold=0.5, n_boot=100)
    assert ci["roc_auc"]["low"] is None and ci["roc_auc"]["high"] is None
    assert ci["roc_auc"]["n_valid"] == 0 and "one class" in ci["roc_auc"]["reason"]
    assert ci["specificity"]["low"] is None and "no benign cases" in ci["specificity"]["reason"]
    assert ci["accuracy"]["low"] is not None and ci["accuracy"]["n_valid"] == 100


def test_bootstrap_half_rule():
    # Two images, one per class: a replicate has both classes with probability 1/2, so across
    # seeds n_valid lands on both sides of n_boot / 2; the interval exists exactly when at least
    # half the replicates define the metric.
    seen = set()
    for seed in range(12):
        ci = bootstrap_ci([0, 1], [0.3, 0.8], threshold=0.5, n_boot=101, seed=seed, metrics=("roc_auc",))
        r = ci["roc_auc"]
        below = 2 * r["n_valid"] < 101
        seen.add(below)
        assert (r["low"] is None) == below
        if below:
            assert f"only {r['n_valid']} of 101" in r["reason"]
        else:
            assert r["low"] == r["high"] == 1.0 and r["reason"] is None
    assert seen == {True, False}


def test_bootstrap_bad_options():
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([0, 1], [0.1, 0.9], threshold=0.5, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([0, 1], [0.1, 0.9], threshold=0.5, alpha=1.5)
    with pytest.raises(ValueError, match="auc.*use one or more of accuracy"):
        bootstrap_ci([0, 1], [0.1, 0.9], threshold=0.5, metrics=("auc",))


def test_bootstrap_speed():
    y, s = synthetic(2000, seed=51)
    t0 = time.perf_counter()
    bootstrap_ci(y, s, threshold=0.5, n_boot=1000, groups=[f"p{i // 4}" for i in range(2000)])
    assert time.perf_counter() - t0 < 5.0  # ~0.15 s on 2 cores; the budget is ~10 s


# --------------------------------------------------------------------------- aggregation

def test_aggregate_max_mean_and_none_keys():
    keys = [("p1", "L"), ("p1", "L"), ("p1", "R"), None, ("p2", "L")]
    labels = [0, 1, 0, 1, 0]
    scores = [0.2, 0.6, 0.4, 0.99, 0.1]
    lab, sc, k = aggregate(labels, scores, keys, how="max")
    assert k == [("p1", "L"), ("p1", "R"), ("p2", "L")]  # the None row (0.99, malignant) is left out
    assert lab.tolist() == [1, 0, 0]
    assert sc.tolist() == pytest.approx([0.6, 0.4, 0.1])
    lab, sc, _ = aggregate(labels, scores, keys, how="mean")
    assert lab.tolist() == [1, 0, 0]
    assert sc.tolist() == pytest.approx([0.4, 0.4, 0.1])
    # exam level: patient key only
    lab, sc, k = aggregate(labels, scores, ["p1", "p1", "p1", None, "p2"], how="mean")
    assert k == ["p1", "p2"] and sc.tolist() == pytest.approx([0.4, 0.1])
    lab, sc, k = aggregate([0, 1], [0.1, 0.2], [None, None])
    assert len(lab) == len(sc) == 0 and k == []


def test_aggregate_bad_inputs():
    with pytest.raises(ValueError, match="how='median': use one of max, mean"):
        aggregate([0, 1], [0.1, 0.2], ["a", "b"], how="median")
    with pytest.raises(ValueError, match="keys has 1 entries"):
        aggregate([0, 1], [0.1, 0.2], ["a"])


# --------------------------------------------------------------------------- evaluate_set

def _assert_plain_json(x, path="res"):
    if isinstance(x, dict):
        for k, v in x.items():
            assert isinstance(k, str), path
            _assert_plain_json(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _assert_plain_json(v, f"{path}[{i}]")
    else:
        assert type(x) in (float, int, str, bool, type(None)), f"{path}: {type(x).__name__}"


def test_evaluate_set_json_ready_and_curves_capped():
    y, s = synthetic(3000, seed=61)
    groups = [f"p{i // 3}" for i in range(3000)]
    res = evaluate_set(y, s, threshold=0.5, groups=groups, n_boot=200, seed=1)
    _assert_plain_json(res)
    json.dumps(res, allow_nan=False)
    assert set(res["metrics"]) == set(METRIC_NAMES)
    assert res["ci"]["_resampled"] == "patients" and res["ci"]["roc_auc"]["low"] is not None
    for curve, keys in (("roc", ("fpr", "tpr", "thresholds")), ("pr", ("precision", "recall", "thresholds"))):
        lengths = {len(res[curve][k]) for k in keys}
        assert len(lengths) == 1 and 2 <= lengths.pop() <= 200
    assert res["roc"]["fpr"][0] == 0.0 and res["roc"]["fpr"][-1] == 1.0 and res["roc"]["tpr"][-1] == 1.0
    assert res["roc"]["thresholds"][0] is None  # roc_curve's +inf
    assert res["metrics"]["roc_auc"] == pytest.approx(trapezoid(res["roc"]["fpr"], res["roc"]["tpr"]), abs=0.01)
    assert sum(res["reliability"]["count"]) == 3000
    assert res["confusion"] == binary_metrics(y, s, threshold=0.5)["confusion"]


def test_evaluate_set_one_class_and_no_bootstrap():
    res = evaluate_set([0, 0, 0], [0.1, 0.7, 0.3], threshold=0.5, n_boot=0)
    _assert_plain_json(res)
    json.dumps(res, allow_nan=False)
    assert res["ci"] is None and res["roc"] is None and res["pr"] is None
    assert res["metrics"]["roc_auc"] is None and "one class" in res["undefined"]["roc_auc"]
    with pytest.raises(ValueError, match="n_boot"):
        evaluate_set([0, 1], [0.1, 0.9], threshold=0.5, n_boot=-1)


def test_small_sets_are_marked_unreliable():
    """8 images with 2 positives reported 'AUC 1.000 [1.000, 1.000]' as if it were a finding."""
    from mammo_ray.metrics import MIN_PER_CLASS
    from mammo_ray.evaluate.report import _fmt

    small = evaluate_set([0, 0, 0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.8, 0.9], threshold=0.5, n_boot=200)
    assert small["metrics"]["roc_auc"] == 1.0
    assert small["small_sample"].startswith("unreliable: 2 positive(s) and 6 negative(s)")
    assert _fmt(small, "roc_auc").endswith("(unreliable: small n)")
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(MIN_PER_CLASS), np.ones(MIN_PER_CLASS)].astype(int)
    enough = evaluate_set(y, rng.random(len(y)), threshold=0.5, n_boot=50)
    assert enough["small_sample"] is None and "unreliable" not in _fmt(enough, "roc_auc")


def test_per_image_patient_keys_are_warned_about():
    from mammo_ray.evaluate.run import per_image_groups_reason

    assert "look per-image" in per_image_groups_reason([f"P_{i:05d}_LEFT_CC" for i in range(40)])
    assert per_image_groups_reason([f"p{i // 2}" for i in range(40)]) is None  # two images per patient
    assert per_image_groups_reason(None) is None and per_image_groups_reason(["a", "b"]) is None


def test_external_sets_are_named_after_their_folder():
    from mammo_ray.evaluate.run import external_set_name

    assert external_set_name("/data/mini-mias/labels.csv") == "external-mini-mias"
    assert external_set_name("/data/mini-mias/benign-only.csv") == "external-mini-mias-benign-only"
    assert external_set_name("/data/films/") == "external-films"


def test_report_table_sorts_by_backbone_and_ratio_and_stars_the_val_choice():
    from mammo_ray.evaluate.report import table_rows

    def ck(tag, backbone, ratio, val):
        res = {"n": 10, "metrics": {"roc_auc": 0.7}, "ci": None}
        return {"tag": tag, "backbone": backbone, "freeze_ratio": ratio, "train_metrics": {"val_auc": val},
                "sets": {"test": res}}

    report = {"checkpoints": [ck("b", "vgg19", 0.0, 0.61), ck("c", "resnet50", 0.5, 0.70), ck("a", "resnet50", 0.0, 0.65)]}
    rows = table_rows(report)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("a", "resnet50", "0", "0.650"), ("c", "resnet50 *", "0.5", "0.700"),
                                                         ("b", "vgg19", "0", "0.610")]


def test_delong_interval_matches_its_definition_and_the_bootstrap():
    """DeLong's structural components computed pair by pair (ties count 1/2) give the same AUC
    and variance as the midrank form; the interval's width is close to a bootstrap's."""
    from sklearn.metrics import roc_auc_score

    y, s = synthetic(300, 3, sep=0.6)
    s = np.round(s, 2)  # ties
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    ci = delong_auc_ci(y, s)
    assert ci["auc"] == pytest.approx(roc_auc_score(y, s)) and ci["se"] == pytest.approx(np.sqrt(var))
    assert ci["low"] == pytest.approx(ci["auc"] - 1.959964 * ci["se"], abs=1e-6)
    boot = bootstrap_ci(y, s, threshold=0.5, n_boot=2000, seed=1)["roc_auc"]
    assert (ci["high"] - ci["low"]) == pytest.approx(boot["high"] - boot["low"], rel=0.2)
    assert delong_auc_ci([0, 0, 1], [0.1, 0.2, 0.9])["high"] == 1.0  # clipped to [0, 1]
    assert delong_auc_ci([1, 1], [0.2, 0.3]) is None  # one class: undefined, not a number


def test_training_reports_evaluations_values_and_undefined_cases():
    """A sweep's table and the evaluation report cannot disagree on the same scores: training's
    validation metrics are evaluation's definitions (None where undefined, never 0)."""
    from mammo_ray.train.loop import binary_metrics as val_metrics

    y, s = synthetic(120, 4)
    ev, tr = binary_metrics(y, s, threshold=0.5), val_metrics(y, s)
    for key in ("accuracy", "precision", "recall", "f1"):
        assert tr[f"val_{key}"] == pytest.approx(ev[key])
    assert tr["val_auc"] == pytest.approx(ev["roc_auc"])
    nothing_positive = val_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]))
    assert nothing_positive["val_precision"] is None and nothing_positive["val_recall"] == 0.0
    one_class = val_metrics(np.array([0, 0, 0]), np.array([0.1, 0.7, 0.3]))
    assert one_class["val_auc"] is None and one_class["val_auc_low"] is None
