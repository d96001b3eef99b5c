"""Segmentation metrics as pure numpy/scipy functions, for 2D (y, x) or 3D (z, y, x)
masks of one case.

* Overlap: Dice, IoU (Jaccard), precision, recall (voxel counts).
* Pixel ROC AUC of a probability map against the reference mask.
* Hausdorff distance (HD) and its 95th percentile (HD95) in millimetres, with
  anisotropic spacing. Both are *surface-based*: distances are measured between the
  surface voxels of the two masks (a voxel of the mask with at least one
  face-neighbour outside it, the array border counting as outside), from each surface
  voxel centre to the nearest surface voxel centre of the other mask, as MedPy's
  ``hd``/``hd95`` do. HD = max of the two directed maxima; HD95 = max of the two
  directed 95th percentiles (linear interpolation between order statistics).

Empty masks: Dice/IoU/precision/recall of two empty masks are 1 (``empty_value``);
HD/HD95 are 0 when both are empty and ``inf`` when exactly one is.

Pooled figures over many cases (:class:`SegmentationPool`, :func:`segmentation_record`)
treat the cases as one large case: overlap from the summed voxel counts, HD as the
largest per-case HD and HD95 from all cases' surface distances together (a case with
exactly one empty mask has no finite distance and is counted apart), and the pixel ROC
AUC from histograms of the voxels' log-odds.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from lungjax.evaluation.classification import roc_auc

__all__ = [
    "SegmentationPool",
    "dice",
    "hausdorff_distance",
    "iou",
    "pixel_roc_auc",
    "precision",
    "recall",
    "segmentation_metrics",
    "segmentation_record",
    "surface_distances",
]


def _masks(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred).astype(bool)
    t = np.asarray(target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != target shape {t.shape}")
    return p, t


def _spacing(spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    s = np.asarray(spacing, np.float64).reshape(-1)
    if s.size != ndim or not (s > 0).all():
        raise ValueError(f"spacing must be {ndim} positive values (one per array axis, "
                         f"same order as the axes), got {s.tolist()}")
    return s


def dice(pred, target, *, empty_value: float = 1.0) -> float:
    """Dice coefficient 2|P n T| / (|P| + |T|).

    Args:
      pred: bool/0-1 mask, any shape.
      target: reference mask, same shape.
      empty_value: result when both masks are empty.
    """
    p, t = _masks(pred, target)
    den = np.count_nonzero(p) + np.count_nonzero(t)
    return 2.0 * np.count_nonzero(p & t) / den if den else float(empty_value)


def iou(pred, target, *, empty_value: float = 1.0) -> float:
    """Intersection over union (Jaccard) |P n T| / |P u T|.

    Args:
      pred: bool/0-1 mask, any shape.
      target: reference mask, same shape.
      empty_value: result when both masks are empty.
    """
    p, t = _masks(pred, target)
    union = np.count_nonzero(p | t)
    return np.count_nonzero(p & t) / union if union else float(empty_value)


def precision(pred, target, *, empty_value: float = 1.0) -> float:
    """|P n T| / |P|; ``empty_value`` when nothing is predicted and the target is empty,
    0 when nothing is predicted but the target is not."""
    p, t = _masks(pred, target)
    n = np.count_nonzero(p)
    if n == 0:
        return float(empty_value) if not t.any() else 0.0
    return np.count_nonzero(p & t) / n


def recall(pred, target, *, empty_value: float = 1.0) -> float:
    """|P n T| / |T| (sensitivity); ``empty_value`` when the target is empty and nothing
    is predicted, 0 when the target is empty but something is predicted."""
    p, t = _masks(pred, target)
    n = np.count_nonzero(t)
    if n == 0:
        return float(empty_value) if not p.any() else 0.0
    return np.count_nonzero(p & t) / n


def pixel_roc_auc(prob, target) -> float:
    """ROC AUC of voxel probabilities against the reference mask (every voxel is a
    sample); nan when the target is all foreground or all background.

    Args:
      prob: float probability map, any shape.
      target: reference mask, same shape.
    """
    prob = np.asarray(prob, np.float64)
    t = np.asarray(target).astype(bool)
    if prob.shape != t.shape:
        raise ValueError(f"probability shape {prob.shape} != target shape {t.shape}")
    return roc_auc(t.reshape(-1), prob.reshape(-1))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred, target, spacing: Sequence[float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm.

    Args:
      pred: bool mask, (y, x) or (z, y, x).
      target: reference mask, same shape.
      spacing: voxel size per array axis in mm, same order as the axes, e.g.
        (z, y, x); None = 1 mm.

    Returns:
      ``(pred_to_target, target_to_pred)``: for each surface voxel of ``pred`` the
      distance to the nearest surface voxel of ``target`` (float64, one entry per
      surface voxel, raster order), and the reverse. An entry is inf when the other
      mask is empty.
    """
    p, t = _masks(pred, target)
    s = _spacing(spacing, p.ndim)
    sp, st = _surface(p), _surface(t)

    def directed(a, b):
        if not a.any():
            return np.zeros(0)
        if not b.any():
            return np.full(int(np.count_nonzero(a)), np.inf)
        return ndimage.distance_transform_edt(~b, sampling=s)[a]

    return directed(sp, st), directed(st, sp)


def hausdorff_distance(pred, target, spacing: Sequence[float] | None = None, *,
                       percentile: float = 100.0) -> float:
    """Symmetric surface Hausdorff distance in mm (``percentile=95`` gives HD95).

    Args:
      pred: bool mask, (y, x) or (z, y, x).
      target: reference mask, same shape.
      spacing: voxel size per array axis in mm (same order as the axes); None = 1 mm.
      percentile: 100 = the maximum (HD); 95 = HD95.

    Returns:
      max(directed percentile pred->target, directed percentile target->pred);
      0 when both masks are empty, inf when exactly one is.
    """
    a, b = surface_distances(pred, target, spacing)
    if a.size == 0 and b.size == 0:
        return 0.0
    if a.size == 0 or b.size == 0:
        return float("inf")
    if percentile >= 100:
        return float(max(a.max(), b.max()))
    return float(max(np.percentile(a, percentile), np.percentile(b, percentile)))


def segmentation_metrics(prob, target, spacing: Sequence[float] | None = None, *,
                         threshold: float = 0.5) -> dict[str, float]:
    """All segmentation figures for one case.

    Args:
      prob: probability map (float) or mask (bool/0-1), (y, x) or (z, y, x);
        foreground is ``prob >= threshold`` (a bool mask is used as is).
      target: reference mask, same shape.
      spacing: voxel size per array axis in mm (same order as the axes); None = 1 mm.
      threshold: binarisation threshold.

    Returns:
      dict: ``dice``, ``iou``, ``precision``, ``recall``, ``pixel_auc`` (nan for a
      hard mask input or a one-class target), ``hd_mm``, ``hd95_mm`` (surface-based),
      ``volume_pred``, ``volume_target`` (voxels).
    """
    return _case_metrics(prob, target, spacing, threshold)[0]


def _case_metrics(prob, target, spacing, threshold):
    """``segmentation_metrics`` plus the binarised masks and the surface distances."""
    prob = np.asarray(prob)
    pred = prob if prob.dtype == bool else prob >= threshold
    p, t = _masks(pred, target)
    a, b = surface_distances(p, t, spacing)
    if a.size == 0 and b.size == 0:
        hd = hd95 = 0.0
    elif a.size == 0 or b.size == 0:
        hd = hd95 = float("inf")
    else:
        hd = float(max(a.max(), b.max()))
        hd95 = float(max(np.percentile(a, 95), np.percentile(b, 95)))
    m = {
        "dice": dice(p, t),
        "iou": iou(p, t),
        "precision": precision(p, t),
        "recall": recall(p, t),
        "pixel_auc": float("nan") if prob.dtype == bool else pixel_roc_auc(prob, t),
        "hd_mm": hd,
        "hd95_mm": hd95,
        "volume_pred": int(np.count_nonzero(p)),
        "volume_target": int(np.count_nonzero(t)),
    }
    return m, p, t, (a, b)


# ----------------------------------------------------------------------------------
# Pooled figures over many cases
# ----------------------------------------------------------------------------------

# Log-odds histogram of the pooled pixel AUC: voxels whose log-odds fall in one bin
# count as ties. Bins in log-odds rather than probability keep the confident background
# (p ~ 1e-6) apart from a missed foreground voxel (p ~ 1e-3).
AUC_LOGIT_RANGE = 30.0
AUC_LOGIT_BIN = 0.01


def _logit_bins(prob: np.ndarray) -> np.ndarray:
    p = np.asarray(prob, np.float64).reshape(-1)
    with np.errstate(divide="ignore"):
        z = np.log(p) - np.log1p(-p)
    z = np.clip(np.nan_to_num(z, nan=0.0), -AUC_LOGIT_RANGE, AUC_LOGIT_RANGE)
    return np.round((z + AUC_LOGIT_RANGE) / AUC_LOGIT_BIN).astype(np.int64)


def _histogram_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC from per-bin positive / negative counts (bins in score order)."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg)) / (n_pos * n_neg))


def _mean_finite(values) -> float:
    v = np.asarray([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


class SegmentationPool:
    """Accumulates per-case figures and their pooled version, one case at a time (the
    cases need not fit in memory together).

    Args:
      threshold: binarisation threshold of the probability maps.
    """

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)
        n_bins = int(round(2 * AUC_LOGIT_RANGE / AUC_LOGIT_BIN)) + 1
        self._pos = np.zeros(n_bins, np.int64)
        self._neg = np.zeros(n_bins, np.int64)
        self._tp = self._fp = self._fn = 0
        self._dist: list[np.ndarray] = [], []
        self._hd: list[float] = []
        self.cases: list[dict[str, float]] = []
        self.n_hd_undefined = 0
        self._has_prob = False

    def add(self, prob, target, spacing: Sequence[float] | None = None) -> dict[str, float]:
        """Adds one case and returns its :func:`segmentation_metrics`.

        Args:
          prob: (y, x) or (z, y, x) float probability map, or a bool mask.
          target: reference mask, same shape.
          spacing: voxel size per axis in mm (same order as the axes); None = 1 mm.
        """
        m, p, t, (a, b) = _case_metrics(prob, target, spacing, self.threshold)
        self._tp += int(np.count_nonzero(p & t))
        self._fp += int(np.count_nonzero(p & ~t))
        self._fn += int(np.count_nonzero(~p & t))
        prob = np.asarray(prob)
        if prob.dtype != bool:
            self._has_prob = True
            bins = _logit_bins(prob)
            flat_t = t.reshape(-1)
            self._pos += np.bincount(bins[flat_t], minlength=self._pos.size)
            self._neg += np.bincount(bins[~flat_t], minlength=self._neg.size)
        if math.isfinite(m["hd_mm"]):
            self._hd.append(m["hd_mm"])
            self._dist[0].append(a)
            self._dist[1].append(b)
        else:
            self.n_hd_undefined += 1
        self.cases.append(m)
        return m

    def mean(self) -> dict[str, float]:
        """Mean over cases of each figure; non-finite values (an HD with one empty mask,
        an AUC of a one-class target) are left out of the mean."""
        if not self.cases:
            return {}
        return {k: _mean_finite([c[k] for c in self.cases]) for k in self.cases[0]}

    def pooled(self) -> dict[str, float]:
        """Figures of all cases as one: ``dice``, ``iou``, ``precision``, ``recall``
        (summed voxel counts), ``pixel_auc`` (log-odds histogram; nan for hard masks or
        one class), ``hd_mm`` (the largest finite per-case HD), ``hd95_mm`` (95th
        percentile of all cases' directed surface distances, the larger direction),
        ``n_cases``, ``n_hd_undefined`` (cases with exactly one empty mask), ``tp``,
        ``fp``, ``fn`` (voxels)."""
        tp, fp, fn = self._tp, self._fp, self._fn

        def ratio(num, den):
            return num / den if den else 1.0

        a = np.concatenate(self._dist[0]) if self._dist[0] else np.zeros(0)
        b = np.concatenate(self._dist[1]) if self._dist[1] else np.zeros(0)
        if a.size and b.size:
            hd95 = float(max(np.percentile(a, 95), np.percentile(b, 95)))
        else:
            hd95 = 0.0 if self._hd else float("nan")
        return {
            "dice": ratio(2 * tp, 2 * tp + fp + fn),
            "iou": ratio(tp, tp + fp + fn),
            "precision": ratio(tp, tp + fp) if (tp + fp or not tp + fn) else 0.0,
            "recall": ratio(tp, tp + fn) if (tp + fn or not tp + fp) else 0.0,
            "pixel_auc": (_histogram_auc(self._pos, self._neg) if self._has_prob
                          else float("nan")),
            "hd_mm": float(max(self._hd)) if self._hd else float("nan"),
            "hd95_mm": hd95,
            "n_cases": len(self.cases),
            "n_hd_undefined": self.n_hd_undefined,
            "tp": tp, "fp": fp, "fn": fn,
        }


def segmentation_record(per_scan: Mapping[str, tuple], *, threshold: float = 0.5) -> dict:
    """Held-out segmentation figures, per scan and pooled, JSON-able.

    Args:
      per_scan: {uid: (prob, target, spacing)}: prob (z, y, x) or (y, x) float
        probability map (or bool mask), target the reference mask of the same shape,
        spacing the voxel size per axis in mm (same order as the axes).
      threshold: binarisation threshold.

    Returns:
      dict with ``per_scan`` {uid: :func:`segmentation_metrics`}, ``mean`` (over scans,
      non-finite values left out), ``pooled`` (:meth:`SegmentationPool.pooled`),
      ``n_scans`` and ``threshold``. Values are Python floats and ints; an HD with
      exactly one empty mask is inf and an undefined figure nan (``json.dumps`` writes
      Infinity / NaN).
    """
    pool = SegmentationPool(threshold)
    scans = {}
    for uid, (prob, target, spacing) in per_scan.items():
        scans[str(uid)] = pool.add(prob, target, spacing)
    return {"per_scan": scans, "mean": pool.mean(), "pooled": pool.pooled(),
            "n_scans": len(scans), "threshold": float(threshold)}
