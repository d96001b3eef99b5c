"""Binary classification metrics as pure numpy functions.

Accuracy, sensitivity (recall), specificity, precision, F1, the ROC curve and its
area. The ROC points follow scikit-learn's ``roc_curve`` exactly (same thresholds,
same ``drop_intermediate`` rule), so numbers can be compared one to one with code
that uses it; scikit-learn itself is not a dependency.

Conventions:
  * ``y_true`` is (N,) of {0, 1} or bool, 1 = positive (nodule, malignant, ...).
  * ``y_score`` is (N,) float, higher = more likely positive.
  * A metric whose denominator is zero (e.g. specificity with no negatives) is
    ``nan``; no warning is raised, so callers can aggregate with ``np.nanmean``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "RocCurve",
    "binary_metrics",
    "confusion_counts",
    "drop_collinear",
    "roc_auc",
    "roc_curve",
    "threshold_counts",
]


def _as_labels(y_true, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.dtype == bool:
        return y.reshape(-1)
    y = y.reshape(-1)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"{name}: labels must be 0/1 or bool, found {bad.tolist()}")
    return y.astype(bool)


def _as_scores(y_score, n: int, name: str = "y_score") -> np.ndarray:
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if s.size != n:
        raise ValueError(f"{name}: {s.size} values for {n} labels")
    if np.isnan(s).any():
        raise ValueError(f"{name}: contains NaN at index {int(np.flatnonzero(np.isnan(s))[0])}")
    return s


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def confusion_counts(y_true, y_pred) -> dict[str, int]:
    """Counts of a binary decision.

    Args:
      y_true: (N,) {0,1} or bool reference labels.
      y_pred: (N,) {0,1} or bool predicted labels.

    Returns:
      dict with int ``tp``, ``fp``, ``tn``, ``fn``.
    """
    t = _as_labels(y_true)
    p = _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_pred: {p.size} values for {t.size} labels")
    tp = int(np.count_nonzero(t & p))
    fp = int(np.count_nonzero(~t & p))
    fn = int(np.count_nonzero(t & ~p))
    return {"tp": tp, "fp": fp, "tn": int(t.size) - tp - fp - fn, "fn": fn}


def threshold_counts(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at every distinct score threshold.

    Thresholds run from the highest score down; at threshold ``t`` every sample with
    ``score >= t`` is called positive. Equal scores form one operating point.

    Args:
      y_true: (N,) {0,1} or bool.
      y_score: (N,) float.

    Returns:
      ``(tps, fps, thresholds)``, each (T,) with T = number of distinct scores;
      ``tps``/``fps`` int64 counts, ``thresholds`` float64 decreasing.
    """
    t = _as_labels(y_true)
    s = _as_scores(y_score, t.size)
    if t.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    # Stable sort then reverse: the same order scikit-learn uses (ties are grouped below
    # so the order inside a tie never matters for the counts).
    order = np.argsort(s, kind="mergesort")[::-1]
    s = s[order]
    t = t[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(t, dtype=np.int64)[last_of_group]
    fps = 1 + last_of_group - tps
    return tps, fps, s[last_of_group]


def drop_collinear(tps: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """Indices kept by scikit-learn's ``drop_intermediate``: a point is dropped when it
    is the midpoint of two equal steps (second differences of both counts zero), so
    linear interpolation through the kept points gives the same curve."""
    if fps.size <= 2:
        return np.arange(fps.size)
    keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
    return np.flatnonzero(keep)


class RocCurve(NamedTuple):
    """ROC curve points, starting at (0, 0) with threshold +inf.

    Attributes:
      fpr: (T+1,) float64 false positive rate, non-decreasing.
      tpr: (T+1,) float64 true positive rate (sensitivity), non-decreasing.
      thresholds: (T+1,) float64, decreasing; ``score >= threshold`` is positive.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(y_true, y_score, *, drop_intermediate: bool = True) -> RocCurve:
    """ROC curve, point for point the same as ``sklearn.metrics.roc_curve``.

    Args:
      y_true: (N,) {0,1} or bool.
      y_score: (N,) float, higher = more positive.
      drop_intermediate: drop collinear points (scikit-learn's default); the curve
        drawn through the points is unchanged.

    Returns:
      RocCurve. With no negatives ``fpr`` is all nan, with no positives ``tpr`` is all
      nan (as scikit-learn, which also warns).
    """
    tps, fps, thr = threshold_counts(y_true, y_score)
    if drop_intermediate:
        keep = drop_collinear(tps, fps)
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps = np.r_[0, tps].astype(np.float64)
    fps = np.r_[0, fps].astype(np.float64)
    thr = np.r_[np.inf, thr]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return RocCurve(fpr, tpr, thr)


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve (trapezoidal rule over all operating points).

    Equal to the Mann-Whitney probability P(score_pos > score_neg) + 0.5 P(equal).

    Args:
      y_true: (N,) {0,1} or bool.
      y_score: (N,) float.

    Returns:
      float in [0, 1]; nan when only one class is present.
    """
    tps, fps, _ = threshold_counts(y_true, y_score)
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    x = np.r_[0, fps] / fps[-1]
    y = np.r_[0, tps] / tps[-1]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def binary_metrics(y_true, y_score, *, threshold: float = 0.5) -> dict[str, float]:
    """All binary classification figures for one set of predictions.

    Args:
      y_true: (N,) {0,1} or bool reference labels.
      y_score: (N,) float scores (probabilities); a sample is called positive when
        ``score >= threshold``. Pass 0/1 predictions with the default threshold to
        score hard decisions (``roc_auc`` is then the AUC of the single operating point).
      threshold: decision threshold.

    Returns:
      dict with ``accuracy``, ``sensitivity`` (= recall, TPR), ``specificity`` (TNR),
      ``precision`` (PPV), ``f1``, ``roc_auc``, ``n``, ``n_positive`` and the counts
      ``tp``, ``fp``, ``tn``, ``fn``. Undefined ratios are nan.
    """
    t = _as_labels(y_true)
    s = _as_scores(y_score, t.size)
    c = confusion_counts(t, s >= threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    # F1 = 2TP / (2TP + FP + FN): defined even when precision is 0/0 with FN > 0.
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "accuracy": _ratio(tp + tn, t.size),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": f1,
        "roc_auc": roc_auc(t, s),
        "n": int(t.size),
        "n_positive": int(np.count_nonzero(t)),
        **c,
    }
