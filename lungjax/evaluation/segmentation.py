"""Segmentation metrics as pure numpy/scipy functions, for 2D (y, x) or 3D (z, y, x)
masks of one case.

* Overlap: Dice, precision, recall (voxel counts).
* Pixel ROC AUC of a probability map against the reference mask.
* Hausdorff distance (HD) and its 95th percentile (HD95) in millimetres, with
  anisotropic spacing. Both are *surface-based*: distances are measured between the
  surface voxels of the two masks (a voxel of the mask with at least one
  face-neighbour outside it, the array border counting as outside), from each surface
  voxel centre to the nearest surface voxel centre of the other mask, as MedPy's
  ``hd``/``hd95`` do. HD = max of the two directed maxima; HD95 = max of the two
  directed 95th percentiles (linear interpolation between order statistics).

Empty masks: Dice/precision/recall of two empty masks are 1 (``empty_value``);
HD/HD95 are 0 when both are empty and ``inf`` when exactly one is.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from lungjax.evaluation.classification import roc_auc

__all__ = [
    "dice",
    "hausdorff_distance",
    "pixel_roc_auc",
    "precision",
    "recall",
    "segmentation_metrics",
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
      dict: ``dice``, ``precision``, ``recall``, ``pixel_auc`` (nan for a hard mask
      input or a one-class target), ``hd_mm``, ``hd95_mm`` (surface-based),
      ``volume_pred``, ``volume_target`` (voxels).
    """
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
    return {
        "dice": dice(p, t),
        "precision": precision(p, t),
        "recall": recall(p, t),
        "pixel_auc": float("nan") if prob.dtype == bool else pixel_roc_auc(prob, t),
        "hd_mm": hd,
        "hd95_mm": hd95,
        "volume_pred": int(np.count_nonzero(p)),
        "volume_target": int(np.count_nonzero(t)),
    }
