"""Classification metrics against hand-computed values, brute force, Mann-Whitney U
(scipy) and, when installed, scikit-learn."""

import json

import numpy as np
import pytest
from scipy import stats

import sklearn.metrics as skm  # the independent reference (test extras)

from lungjax.evaluation.classification import (FIGURES, best_accuracy_threshold,
                                               binary_metrics, bootstrap_intervals,
                                               classification_record, confusion_counts,
                                               confusion_matrix, macro_metrics,
                                               multiclass_metrics, roc_auc, roc_curve,
                                               threshold_counts)


def test_binary_metrics_hand_computed():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    s = [0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.5, 0.5]
    m = binary_metrics(y, s, threshold=0.5)
    # >= 0.5 positive: TP = {.9, .6, .5}, FN = {.2}, FP = {.7, .5}, TN = {.1, .3}.
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert (m["n"], m["n_positive"]) == (8, 4)
    # Pairs (pos, neg) with pos > neg: .9:4, .6:3, .2:1, .5:2.5(tie with .5) -> 10.5/16.
    assert m["roc_auc"] == pytest.approx(10.5 / 16)


def test_undefined_ratios_are_nan_and_labels_checked():
    m = binary_metrics([1, 1], [0.2, 0.9])
    assert np.isnan(m["specificity"]) and np.isnan(m["roc_auc"])
    assert m["sensitivity"] == 0.5 and m["precision"] == 1.0
    m = binary_metrics([0, 0], [0.2, 0.1])
    assert np.isnan(m["precision"]) and np.isnan(m["sensitivity"]) and m["f1"] != m["f1"]
    with pytest.raises(ValueError, match="labels must be 0/1"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="y_score: 1 values for 2 labels"):
        binary_metrics([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])
    assert confusion_counts([True, False], [True, True]) == {"tp": 1, "fp": 1, "tn": 0, "fn": 0}


def test_roc_curve_documented_example():
    # scikit-learn's documented example.
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_threshold_counts_brute_force_and_drop_intermediate():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.4
    s = rng.integers(0, 25, 200) / 25
    tps, fps, thr = threshold_counts(y, s)
    for k, t in enumerate(thr):
        assert tps[k] == np.sum(y & (s >= t)) and fps[k] == np.sum(~y & (s >= t))
    full = roc_curve(y, s, drop_intermediate=False)
    red = roc_curve(y, s)
    assert red.fpr.size <= full.fpr.size
    grid = np.linspace(0, 1, 101)
    np.testing.assert_allclose(np.interp(grid, red.fpr, red.tpr),
                               np.interp(grid, full.fpr, full.tpr), atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_auc_is_mann_whitney_and_pairwise(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(y * 0.8, 1.0), 1)       # ties
    u = stats.mannwhitneyu(s[y], s[~y]).statistic
    assert roc_auc(y, s) == pytest.approx(u / (y.sum() * (~y).sum()), rel=1e-12)
    diff = s[y][:, None] - s[~y][None, :]
    assert roc_auc(y, s) == pytest.approx(((diff > 0) + 0.5 * (diff == 0)).mean(), rel=1e-12)


@pytest.mark.parametrize("drop", [True, False])
def test_against_sklearn(drop):
    rng = np.random.default_rng(4)
    y = rng.random(500) < 0.35
    s = np.round(rng.normal(y * 0.7, 1.0), 2)
    ours = roc_curve(y, s, drop_intermediate=drop)
    theirs = skm.roc_curve(y, s, drop_intermediate=drop)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), rel=1e-12)
    m = binary_metrics(y, s, threshold=0.3)
    pred = s >= 0.3
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(~y, ~pred))


CM = np.array([[5, 1, 0],
               [2, 3, 1],
               [0, 1, 4]])


def test_macro_metrics_of_a_literal_confusion_matrix():
    m = macro_metrics(CM)
    # Per class (one against the rest), N = 17:
    #   class 0: TP 5, FN 1, FP 2, TN 9;  class 1: TP 3, FN 3, FP 2, TN 9;
    #   class 2: TP 4, FN 1, FP 1, TN 11.
    assert m["accuracy"] == pytest.approx(12 / 17)
    assert m["f1"] == pytest.approx((10 / 13 + 6 / 11 + 8 / 10) / 3)
    assert m["sensitivity"] == pytest.approx((5 / 6 + 3 / 6 + 4 / 5) / 3)
    assert m["precision"] == pytest.approx((5 / 7 + 3 / 5 + 4 / 5) / 3)
    assert m["specificity"] == pytest.approx((9 / 11 + 9 / 11 + 11 / 12) / 3)
    np.testing.assert_allclose(m["per_class"]["f1"], [10 / 13, 6 / 11, 0.8])
    # A class that never occurs is left out of the macro average; one never predicted
    # has precision 0.
    m4 = macro_metrics(np.pad(CM, (0, 1)))
    assert m4["f1"] == pytest.approx(m["f1"]) and np.isnan(m4["per_class"]["f1"][3])
    assert macro_metrics([[2, 0], [1, 0]])["precision"] == pytest.approx((2 / 3 + 0) / 2)


def _labels_for(cm):
    y, p = [], []
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            y += [i] * int(cm[i, j])
            p += [j] * int(cm[i, j])
    return np.array(y), np.array(p)


def test_multiclass_metrics_from_probabilities():
    y, pred = _labels_for(CM)
    rng = np.random.default_rng(0)
    prob = rng.random((y.size, 3)) * 0.3
    prob[np.arange(y.size), pred] += 1.0              # argmax = pred
    prob /= prob.sum(1, keepdims=True)
    np.testing.assert_array_equal(confusion_matrix(y, pred, 3), CM)
    m = multiclass_metrics(y, prob)
    assert m["confusion"] == CM.tolist() and m["n_classes"] == 3
    assert m["f1"] == pytest.approx(macro_metrics(CM)["f1"])
    ovr = [roc_auc(y == k, prob[:, k]) for k in range(3)]
    assert m["roc_auc"] == pytest.approx(np.mean(ovr))
    with pytest.raises(ValueError, match="labels must be in"):
        confusion_matrix([0, 3], [0, 1], 3)


def _binary_case(n=120, seed=3):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return y.astype(int), s


def test_bootstrap_intervals_seeded_and_containing_the_estimate():
    y, s = _binary_case()
    r1 = classification_record(y, s, seed=7, n_bootstrap=300)
    r2 = classification_record(y, s, seed=7, n_bootstrap=300)
    r3 = classification_record(y, s, seed=8, n_bootstrap=300)
    assert r1["ci"] == r2["ci"] and r1["ci"] != r3["ci"]
    point = binary_metrics(y, s)
    for k in FIGURES:
        lo, hi = r1["ci"][k]
        assert r1[k] == pytest.approx(point[k])
        assert lo <= r1[k] <= hi and lo < hi, k
    assert r1["kind"] == "binary" and r1["counts"]["tp"] == point["tp"] and r1["n"] == 120
    json.loads(json.dumps(r1))
    # A statistic undefined in some resamples: those replicates are left out.
    ci = bootstrap_intervals(np.array([0, 0, 0, 1]), np.array([0.1, 0.2, 0.3, 0.9]),
                             lambda t, p: {"auc": roc_auc(t, p)}, n_bootstrap=50, seed=0)
    assert ci["auc"] == (1.0, 1.0)


def test_classification_record_two_columns_and_multiclass():
    y, s = _binary_case()
    two = classification_record(y, np.stack([1 - s, s], 1), seed=0, n_bootstrap=20)
    assert two == classification_record(y, s, seed=0, n_bootstrap=20)
    yk, pred = _labels_for(CM)
    prob = np.eye(3)[pred] * 0.8 + 0.1
    rec = classification_record(yk, prob, seed=0, n_bootstrap=50)
    assert rec["kind"] == "multiclass" and rec["confusion"] == CM.tolist()
    assert rec["f1"] == pytest.approx(macro_metrics(CM)["f1"])
    assert rec["ci"]["f1"][0] <= rec["f1"] <= rec["ci"]["f1"][1]
    none = classification_record(y, s, seed=0, n_bootstrap=0)
    assert all(np.isnan(v).all() for v in none["ci"].values())


def test_best_accuracy_threshold_brute_force_and_ends():
    # Hand case: diameters (mm) and labels; cutting between 6 and 8 mm is the only
    # operating point with a single error (the 12 mm benign one).
    d = [3.0, 4.0, 6.0, 8.0, 9.0, 12.0, 15.0]
    y = [0, 0, 0, 1, 1, 0, 1]
    assert best_accuracy_threshold(y, d) == 7.0
    # Every class split by a gap: calling everything one class is best at the ends.
    assert best_accuracy_threshold([1, 1, 1], [2.0, 5.0, 9.0]) < 2.0
    assert best_accuracy_threshold([0, 0, 0], [2.0, 5.0, 9.0]) > 9.0
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = np.round(rng.random(30) * 10, 1)  # ties included
        t = (rng.random(30) < 0.3 + 0.05 * s).astype(int)
        thr = best_accuracy_threshold(t, s)
        cuts = np.r_[s.min() - 1, np.unique(s), s.max() + 1]
        best = max(np.mean((s >= c) == t) for c in cuts)
        assert np.mean((s >= thr) == t) == best
        assert not np.any(s == thr)  # between scores: ties fall on one side
    with pytest.raises(ValueError, match="no samples"):
        best_accuracy_threshold([], [])
