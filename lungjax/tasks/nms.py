"""Non-maximum suppression on dense score volumes and on scored point sets.

Two entry points share one greedy suppression rule:

* :func:`peaks_3d` finds the local maxima of a dense (z, y, x) score volume above a
  threshold (dou2017's screening: "3D non-maximum suppression on the score volume, then
  retrieve those high probability positions");
* :func:`nms_points` suppresses scored points in any coordinate frame (world mm, voxels),
  e.g. candidates gathered from several output scales or from overlapping tiles.

Distances are Euclidean after dividing each axis by its radius, so an anisotropic radius
(a radius in mm on a grid with unequal spacing) is an ellipsoid. Two kept points are always
*more* than one radius apart: a point at exactly the radius from a higher one is suppressed.
Ties in score are broken by the lower flat index (row-major (z, y, x)) / lower point index,
so the result never depends on hash order or sort stability.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def _radius_vector(radius, ndim: int, name: str) -> np.ndarray:
    r = np.asarray(radius, dtype=np.float64)
    if r.ndim == 0:
        r = np.full(ndim, float(r))
    if r.shape != (ndim,):
        raise ValueError(f"{name} must be a scalar or have {ndim} values (one per axis), "
                         f"got shape {r.shape}")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {r.tolist()}")
    return r


def _ellipsoid_footprint(radius: np.ndarray) -> np.ndarray:
    """Boolean footprint of the cells within (scaled) distance <= 1 of the centre."""
    half = np.floor(radius + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    d2 = np.zeros(grids[0].shape)
    for g, r in zip(grids, radius):
        if r > 0:
            d2 = d2 + (g / r) ** 2
        else:
            # A zero radius along an axis: only offset 0 is inside (half is 0 there).
            d2 = d2 + np.where(g == 0, 0.0, np.inf)
    return d2 <= 1.0 + 1e-9


def greedy_suppress(points: np.ndarray, order: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Greedy suppression: walk ``order``, keep a point unless a kept one is within radius.

    Args:
      points: (K, n) float coordinates.
      order: (K,) int, visiting order (best first).
      radius: (n,) float >= 0 per-axis radius; an axis with radius 0 only suppresses
        points at exactly the same coordinate along it.

    Returns:
      (K',) int indices into ``points`` of the kept points, in visiting order.
    """
    if len(order) == 0:
        return np.zeros((0,), np.int64)
    if np.all(radius == 0):
        # Only exact duplicates suppress each other.
        _, first = np.unique(points[order], axis=0, return_index=True)
        return order[np.sort(first)]
    # A zero-radius axis is scaled by a huge factor so any difference along it exceeds 1.
    scale = np.where(radius > 0, 1.0 / np.where(radius > 0, radius, 1.0), 1e12)
    scaled = points * scale
    tree = cKDTree(scaled)
    suppressed = np.zeros(len(points), bool)
    kept = []
    for i in order:
        if suppressed[i]:
            continue
        kept.append(i)
        # 1 + 1e-9: points at exactly one radius count as inside, robust to rounding.
        suppressed[tree.query_ball_point(scaled[i], 1.0 + 1e-9)] = True
    return np.asarray(kept, np.int64)


def peaks_3d(scores: np.ndarray, threshold: float, min_distance_vox: float | Sequence[float],
             *, max_peaks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of a score volume, above a threshold, at least a radius apart.

    1. Cells with ``score >= threshold`` that equal the maximum of the scores within the
       ellipsoid of radius ``min_distance_vox`` around them (cells outside the volume count
       as -inf, so peaks on the border are found).
    2. Plateaus: a connected (26-neighbour) group of such cells with equal score is one
       peak, placed at the member nearest the group's centroid (a saturated score of 1.0
       over a whole nodule is one candidate at its centre, not at its first corner).
    3. Greedy suppression in order of decreasing score (ties: lower flat index first) of any
       peak within ``min_distance_vox`` of a kept one. After step 1 two peaks within the
       radius have equal scores, so this step settles ties (e.g. two equal maxima 3 cells
       apart with a radius of 3: the first is kept).

    A cell with a higher cell within the radius is never a peak (step 1), even when that
    higher cell is itself dropped: on a dense score volume this keeps the flanks of one
    blob from becoming candidates of their own, which a plain greedy pass over all cells
    above the threshold would produce every radius across a large nodule.

    Args:
      scores: (D, H, W) float score volume (any number of axes works; the name says 3D
        because that is its use). NaN is an error.
      threshold: minimum score of a peak (inclusive).
      min_distance_vox: suppression radius in score-volume cells, a scalar or one value
        per axis (z, y, x); 0 keeps every cell at or above the threshold.
      max_peaks: keep at most this many (the highest); None keeps all.

    Returns:
      cells: (K, 3) int64 cell indices (z, y, x) of the peaks, highest score first.
      peak_scores: (K,) scores at those cells, same dtype as ``scores``.

    Raises:
      ValueError: bad shapes, NaN scores or a negative radius.
    """
    scores = np.asarray(scores)
    if scores.ndim < 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty array, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float32)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    radius = _radius_vector(min_distance_vox, scores.ndim, "min_distance_vox")
    above = scores >= threshold
    if not above.any():
        return np.zeros((0, scores.ndim), np.int64), np.zeros((0,), scores.dtype)

    if np.all(radius == 0):
        cells = np.argwhere(above)
    else:
        footprint = _ellipsoid_footprint(radius)
        local_max = ndimage.maximum_filter(scores, footprint=footprint, mode="constant",
                                           cval=-np.inf)
        mask = above & (scores == local_max)
        cells = _plateau_representatives(scores, mask, radius)
    values = scores[tuple(cells.T)]
    flat = np.ravel_multi_index(tuple(cells.T), scores.shape)
    order = np.lexsort((flat, -values.astype(np.float64)))
    kept = greedy_suppress(cells.astype(np.float64), order, radius)
    if max_peaks is not None:
        kept = kept[:max(0, int(max_peaks))]
    cells = cells[kept].astype(np.int64)
    return cells, scores[tuple(cells.T)]


def _plateau_representatives(scores: np.ndarray, mask: np.ndarray,
                             radius: np.ndarray) -> np.ndarray:
    """One cell per connected group of equal-valued local maxima.

    Cells are neighbours when they touch (26-connectivity in 3D) along the axes whose
    radius reaches the next cell; along an axis with a radius below one cell adjacent
    maxima are separate peaks, as the suppression would keep both. Groups are split by
    score value too, since with such an axis adjacent maxima may differ.
    """
    cells = np.argwhere(mask)
    if len(cells) <= 1:
        return cells
    structure = np.ones((3,) * scores.ndim, bool)
    for axis, r in enumerate(radius):
        if r < 1:
            keep = [slice(None)] * scores.ndim
            for off in (0, 2):
                keep[axis] = off
                structure[tuple(keep)] = False
    labels, n = ndimage.label(mask, structure=structure)
    if n == len(cells):
        return cells  # every peak is a single cell: the common case, no work
    lab = labels[tuple(cells.T)]
    val = scores[tuple(cells.T)]
    # Group key = (connected component, score value).
    _, group = np.unique(np.stack([lab.astype(np.float64), val.astype(np.float64)], 1),
                         axis=0, return_inverse=True)
    group = group.reshape(-1)
    reps = []
    for g in np.unique(group):
        members = cells[group == g]  # row-major order already (argwhere)
        if len(members) == 1:
            reps.append(members[0])
            continue
        centroid = members.mean(axis=0)
        d2 = ((members - centroid) ** 2).sum(axis=1)
        reps.append(members[int(np.argmin(d2))])  # argmin: first (lowest index) on ties
    return np.asarray(reps, np.int64)


def nms_points(points: np.ndarray, scores: np.ndarray, radius: float | Sequence[float],
               *, max_points: int | None = None) -> np.ndarray:
    """Greedy NMS of scored points.

    Args:
      points: (K, n) float coordinates (e.g. world (x, y, z) mm).
      scores: (K,) float, higher is better.
      radius: suppression radius in the points' units, scalar or one per axis.
      max_points: keep at most this many; None keeps all.

    Returns:
      (K',) int64 indices of the kept points, highest score first (ties: lower index).
    """
    points = np.asarray(points, np.float64)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if points.ndim != 2 or len(points) != len(scores):
        raise ValueError(f"points must be (K, n) with K = len(scores) = {len(scores)}, "
                         f"got shape {points.shape}")
    if np.isnan(scores).any() or np.isnan(points).any():
        raise ValueError("points or scores contain NaN")
    r = _radius_vector(radius, points.shape[1], "radius")
    order = np.lexsort((np.arange(len(scores)), -scores))
    kept = greedy_suppress(points, order, r)
    return kept if max_points is None else kept[:max(0, int(max_points))]
