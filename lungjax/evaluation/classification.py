"""Binary and multi-class classification metrics as pure numpy functions.

Accuracy, sensitivity (recall), specificity, precision, F1, the ROC curve and its
area; their multi-class macro averages (one class against the rest); seeded bootstrap
intervals; and :func:`classification_record`, the JSON-able record of a held-out
evaluation. The ROC points follow scikit-learn's ``roc_curve`` exactly (same thresholds,
same ``drop_intermediate`` rule), so numbers can be compared one to one with code
that uses it; scikit-learn itself is not a dependency.

Conventions:
  * ``y_true`` is (N,) of {0, 1} or bool, 1 = positive (nodule, malignant, ...).
  * ``y_score`` is (N,) float, higher = more likely positive.
  * A metric whose denominator is zero (e.g. specificity with no negatives) is
    ``nan``; no warning is raised, so callers can aggregate with ``np.nanmean``.
  * Multi-class: ``y_true`` (N,) int in [0, K), ``y_prob`` (N, K) float class
    probabilities, prediction = argmax; confusion matrices are (K, K) with rows = true
    class, columns = predicted class.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "FIGURES",
    "RocCurve",
    "binary_metrics",
    "bootstrap_intervals",
    "classification_record",
    "best_accuracy_threshold",
    "confusion_counts",
    "confusion_matrix",
    "drop_collinear",
    "macro_metrics",
    "multiclass_metrics",
    "roc_auc",
    "roc_curve",
    "threshold_counts",
]

# The figures reported (and bootstrapped) for every classifier, in report order.
FIGURES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


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


def best_accuracy_threshold(y_true, y_score) -> float:
    """The threshold at which "positive when ``score >= t``" is most accurate on these
    samples: halfway between the two distinct scores that bound the best operating
    point (of several equally accurate ones, the middle one), below the lowest score
    when calling everything positive is best, above the highest when nothing is.

    Args:
      y_true: (N,) {0,1} or bool, N > 0.
      y_score: (N,) float.

    Returns:
      float threshold, in the scores' units.
    """
    t = _as_labels(y_true)
    if t.size == 0:
        raise ValueError("best_accuracy_threshold: no samples")
    tps, fps, thr = threshold_counts(t, y_score)
    n_neg = t.size - int(np.count_nonzero(t))
    # Operating point 0 calls nothing positive; point i + 1 everything >= thr[i].
    correct = np.r_[n_neg, tps + (n_neg - fps)]
    best = np.flatnonzero(correct == correct.max())
    i = int(best[len(best) // 2])
    if i == 0:
        return float(thr[0] + 1.0)
    if i == len(thr):
        return float(thr[-1] - 1.0)
    return float((thr[i - 1] + thr[i]) / 2.0)


# ----------------------------------------------------------------------------------
# Multi-class (macro averages, one class against the rest)
# ----------------------------------------------------------------------------------


def _as_classes(y_true, num_classes: int, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true).reshape(-1)
    if y.size and (not np.issubdtype(y.dtype, np.integer) and y.dtype != bool):
        if not np.all(y == np.round(y)):
            raise ValueError(f"{name}: class labels must be integers")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name}: labels must be in [0, {num_classes}), found "
                         f"{np.unique(y[(y < 0) | (y >= num_classes)])[:5].tolist()}")
    return y


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: ``cm[i, j]`` = samples of true class i predicted as j.

    Args:
      y_true: (N,) int in [0, K).
      y_pred: (N,) int in [0, K).
      num_classes: K.
    """
    t = _as_classes(y_true, num_classes)
    p = _as_classes(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_pred: {p.size} values for {t.size} labels")
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes).astype(np.int64)


def _zero_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, np.float64), where=den > 0)


def macro_metrics(cm) -> dict:
    """Macro-averaged figures of a (K, K) confusion matrix (rows true, columns predicted).

    Each class is scored against the rest (its row and column) and the figures are
    averaged over the classes that occur as a true or a predicted label; a ratio with
    a zero denominator counts 0 there (scikit-learn's ``zero_division=0``).

    Returns:
      dict with ``accuracy`` (trace / N, not averaged), macro ``sensitivity``
      (recall), ``specificity``, ``precision``, ``f1`` (mean of per-class
      ``2TP / (2TP + FP + FN)``), ``n``, and ``per_class`` {figure: [K floats]}
      (classes that never occur are nan there).
    """
    cm = np.asarray(cm, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be (K, K), got shape {cm.shape}")
    n = cm.sum()
    tp = np.diag(cm)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    tn = n - tp - fn - fp
    seen = (cm.sum(1) + cm.sum(0)) > 0
    per = {
        "sensitivity": _zero_div(tp, tp + fn),
        "specificity": _zero_div(tn, tn + fp),
        "precision": _zero_div(tp, tp + fp),
        "f1": _zero_div(2 * tp, 2 * tp + fp + fn),
    }
    out: dict = {"accuracy": _ratio(tp.sum(), n)}
    for k, v in per.items():
        out[k] = float(v[seen].mean()) if seen.any() else float("nan")
    out["n"] = int(n)
    out["per_class"] = {k: np.where(seen, v, np.nan).tolist() for k, v in per.items()}
    return out


def multiclass_metrics(y_true, y_prob) -> dict:
    """Figures of a K-class classifier (prediction = argmax of the probabilities).

    Args:
      y_true: (N,) int in [0, K).
      y_prob: (N, K) float class probabilities (or any scores, higher = more likely).

    Returns:
      :func:`macro_metrics` of the confusion matrix plus ``roc_auc`` (mean over classes
      of the one-vs-rest ROC AUC, over the classes that have both positives and
      negatives in ``y_true``; nan when none has), ``confusion`` (K x K nested list)
      and ``n_classes``.
    """
    prob = np.asarray(y_prob, np.float64)
    if prob.ndim != 2:
        raise ValueError(f"y_prob must be (N, K), got shape {prob.shape}")
    k = prob.shape[1]
    t = _as_classes(y_true, k)
    if t.size != prob.shape[0]:
        raise ValueError(f"y_prob: {prob.shape[0]} rows for {t.size} labels")
    cm = confusion_matrix(t, np.argmax(prob, axis=1), k)
    out = macro_metrics(cm)
    aucs = [roc_auc(t == c, prob[:, c]) for c in range(k)]
    aucs = [a for a in aucs if np.isfinite(a)]
    out["roc_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    out["confusion"] = cm.tolist()
    out["n_classes"] = k
    return out


# ----------------------------------------------------------------------------------
# Bootstrap intervals and the evaluation record
# ----------------------------------------------------------------------------------


def bootstrap_intervals(y_true, y_score, statistic, *, n_bootstrap: int = 1000,
                        seed: int = 0, confidence: float = 0.95
                        ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every figure ``statistic`` returns.

    Samples are drawn with replacement (N of N) from a ``numpy.random.default_rng(seed)``
    stream, so the same inputs and seed give the same intervals. A replicate whose
    figure is undefined (nan, e.g. an AUC of a resample with one class) is left out of
    that figure's interval.

    Args:
      y_true: (N,) labels.
      y_score: (N,) or (N, K) scores, resampled along axis 0 with ``y_true``.
      statistic: ``f(y_true, y_score) -> {name: float}`` (non-float entries ignored).
      n_bootstrap: resamples.
      seed: resampling seed.
      confidence: interval coverage (0.95 = the 2.5th and 97.5th percentiles).

    Returns:
      {name: (lower, upper)}; (nan, nan) for a figure no replicate defines.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    t = np.asarray(y_true)
    s = np.asarray(y_score)
    n = t.shape[0]
    rng = np.random.default_rng(seed)
    reps: dict[str, list[float]] = {}
    for _ in range(int(n_bootstrap)):
        idx = rng.integers(0, n, n)
        for k, v in statistic(t[idx], s[idx]).items():
            if isinstance(v, (float, np.floating)):
                reps.setdefault(k, []).append(float(v))
    alpha = 100 * (1 - confidence) / 2
    out = {}
    for k, vals in reps.items():
        v = np.asarray(vals)
        v = v[np.isfinite(v)]
        out[k] = ((float(np.percentile(v, alpha)), float(np.percentile(v, 100 - alpha)))
                  if v.size else (float("nan"), float("nan")))
    return out


def classification_record(y_true, y_score, *, seed: int, n_bootstrap: int,
                          threshold: float = 0.5, confidence: float = 0.95) -> dict:
    """Held-out classification figures with seeded bootstrap intervals, JSON-able.

    Args:
      y_true: (N,) labels: 0/1 (binary) or int in [0, K).
      y_score: (N,) float positive-class probabilities (binary, positive when
        ``>= threshold``), or (N, K) class probabilities (K = 2: binary on column 1;
        K > 2: macro averages, prediction = argmax).
      seed: bootstrap seed.
      n_bootstrap: bootstrap resamples (0 = no intervals).
      threshold: binary decision threshold.
      confidence: interval coverage.

    Returns:
      dict with ``kind`` ("binary" | "multiclass"), each of ``FIGURES`` as a float,
      ``ci`` {figure: [lower, upper]}, ``n``, ``n_classes``, ``confidence``,
      ``n_bootstrap``, ``seed``; binary adds ``threshold`` and ``counts``
      {tp, fp, tn, fn}, multi-class adds ``confusion`` (K x K) and ``per_class``.
      Undefined figures are nan (``json.dumps`` writes NaN).
    """
    s = np.asarray(y_score, np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim == 1:
        def stat(t, p):
            m = binary_metrics(t, p, threshold=threshold)
            return {k: m[k] for k in FIGURES}

        full = binary_metrics(y_true, s, threshold=threshold)
        y = _as_labels(y_true).astype(np.int64)
        rec: dict = {"kind": "binary", "n_classes": 2, "threshold": float(threshold),
                     "counts": {k: full[k] for k in ("tp", "fp", "tn", "fn")}}
    elif s.ndim == 2:
        def stat(t, p):
            m = multiclass_metrics(t, p)
            return {k: m[k] for k in FIGURES}

        full = multiclass_metrics(y_true, s)
        y = _as_classes(y_true, s.shape[1])
        rec = {"kind": "multiclass", "n_classes": int(s.shape[1]),
               "confusion": full["confusion"], "per_class": full["per_class"]}
    else:
        raise ValueError(f"y_score must be (N,) or (N, K), got shape {s.shape}")
    for k in FIGURES:
        rec[k] = float(full[k])
    ci = (bootstrap_intervals(y, s, stat, n_bootstrap=n_bootstrap, seed=seed,
                              confidence=confidence) if n_bootstrap > 0 else {})
    nan = float("nan")
    rec["ci"] = {k: list(ci.get(k, (nan, nan))) for k in FIGURES}
    rec.update({"n": int(y.size), "confidence": float(confidence),
                "n_bootstrap": int(n_bootstrap), "seed": int(seed)})
    return rec
