"""Reader masks, nodule clustering and consensus for LIDC-IDRI contours.

Pure numpy/scipy re-implementations of what ``pylidc`` 0.2.3 does, so results
(voxel counts, cluster memberships) match it exactly:

* polygon fill: matplotlib's ``Path.contains_points`` crossing-number test (even-odd
  rule), with the ray cast along +row, evaluated at integer pixel centres;
* a reader's mask: fill each inclusion contour on its slice (OR), drop that
  contour's own vertices, then clear pixels inside exclusion contours and their
  vertices (``Annotation.boolean_mask``);
* clustering: two marks are linked when their contour vertices, in (k, row, col)
  index units, come within ``slice_thickness`` (the number, used as index units as
  pylidc does); connected components; shrink the tolerance by 0.9 while a cluster
  holds more than 4 marks (``Scan.cluster_annotations``);
* consensus: voxels marked by at least ``level`` of a cluster's readers
  (``pylidc.utils.consensus``).

All arrays are in the per-scan index space of :mod:`lungjax.data.lidc_db`:
(z, y, x) = (slice index k, pixel row, pixel column).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from lungjax.data.lidc_db import LidcAnnotation

MAX_READERS = 4     # LIDC had four readers; larger groups are split by shrinking tol.
TOL_FACTOR = 0.9
MIN_TOL = 0.1


def fill_polygon(vertices_rc: np.ndarray, start_rc: Sequence[int],
                 shape_rc: Sequence[int]) -> np.ndarray:
    """Pixels of a grid inside a closed polygon, exactly as matplotlib decides.

    Args:
      vertices_rc: (P, 2) int or float vertices (row, col); the polygon is closed
        back to the first vertex. Fewer than 3 path vertices (after closing) give
        an empty result, as matplotlib does.
      start_rc: (2,) row, col of grid pixel (0, 0).
      shape_rc: (H, W) grid size.

    Returns:
      (H, W) bool, True where the pixel centre is inside (crossing-number / even-odd
      rule; points on edges follow matplotlib's half-open conventions).
    """
    h, w = int(shape_rc[0]), int(shape_rc[1])
    out = np.zeros((h, w), dtype=bool)
    c = np.asarray(vertices_rc, dtype=np.float64).reshape(-1, 2)
    if len(c) == 0:
        return out
    if np.any(c[0] != c[-1]):
        c = np.vstack([c, c[:1]])
    if len(c) < 3 or h == 0 or w == 0:
        return out
    # Path vertices c[0..n-2] closed back to c[0] (the last one is the CLOSEPOLY slot).
    v = c[:-1]
    x0, y0 = v[:, 0], v[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # An edge can flip the parity only at columns ty with exactly one endpoint >= ty,
    # i.e. integer ty in (min(y0, y1), max(y0, y1)]; enumerate those (edge, column) pairs.
    lo = np.maximum(np.floor(np.minimum(y0, y1)) + 1, start_rc[1])
    hi = np.minimum(np.floor(np.maximum(y0, y1)), start_rc[1] + w - 1)
    n = np.maximum(hi - lo + 1, 0).astype(np.int64)
    if n.sum() == 0:
        return out
    e = np.repeat(np.arange(len(v)), n)
    ty = lo[e] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    tx = start_rc[0] + np.arange(h, dtype=np.float64)
    ex0, ey0, ex1, ey1 = x0[e, None], y0[e, None], x1[e, None], y1[e, None]
    tyc = ty[:, None]
    yflag1 = ey1 >= tyc
    toggles = ((ey1 - tyc) * (ex0 - ex1) >= (ex1 - tx[None, :]) * (ey0 - ey1)) == yflag1
    col = (ty - start_rc[1]).astype(np.int64)
    parity = np.zeros((w, h), dtype=np.int64)
    np.add.at(parity, col, toggles.astype(np.int64))
    return (parity.T & 1).astype(bool)


def annotation_bbox(ann: LidcAnnotation) -> np.ndarray:
    """(3, 2) int64 inclusive [min, max] of the mark's contour vertices per (z, y, x)."""
    p = ann.points_zyx
    return np.stack([p.min(axis=0), p.max(axis=0)], axis=1)


def annotation_mask(ann: LidcAnnotation, bbox: np.ndarray | None = None) -> np.ndarray:
    """One reader's 3D nodule mask in a box of the scan's index space.

    Args:
      ann: the reader mark.
      bbox: (3, 2) inclusive [start, stop] per (z, y, x); default the mark's own
        contour bounding box. It must contain all of the mark's vertices.

    Returns:
      (Z, Y, X) bool, box-shaped; voxel (0, 0, 0) is ``bbox[:, 0]``.
    """
    bb = annotation_bbox(ann) if bbox is None else np.asarray(bbox, dtype=np.int64)
    own = annotation_bbox(ann)
    if np.any(own[:, 0] < bb[:, 0]) or np.any(own[:, 1] > bb[:, 1]):
        raise ValueError(f"annotation {ann.annotation_id}: bbox {bb.tolist()} does not contain "
                         f"its contours {own.tolist()}")
    shape = bb[:, 1] - bb[:, 0] + 1
    mask = np.zeros(tuple(shape), dtype=bool)
    # Inclusions first (in contour-id order), exclusions after, as pylidc.
    for want_inclusion in (True, False):
        for c in np.flatnonzero(ann.contour_inclusion == want_inclusion):
            pts = ann.contour_points[c]
            zi = int(ann.contour_k[c] - bb[0, 0])
            inside = fill_polygon(pts, bb[1:, 0], shape[1:])
            if want_inclusion:
                mask[zi] |= inside
            else:
                mask[zi] &= ~inside
            mask[zi, pts[:, 0] - bb[1, 0], pts[:, 1] - bb[2, 0]] = False
    return mask


def _min_distances(points: list[np.ndarray], max_dist: float) -> np.ndarray:
    """(N, N) float64 min Euclidean distance between point sets; inf where above max_dist.

    Exact for integer points: the k-d tree only picks each point's nearest
    neighbour; the distance itself is recomputed from integer squared differences
    (so ``d <= tol`` comparisons match a brute-force ``cdist``).
    """
    n = len(points)
    d = np.full((n, n), np.inf)
    np.fill_diagonal(d, 0.0)
    lo = np.array([p.min(axis=0) for p in points])
    hi = np.array([p.max(axis=0) for p in points])
    trees: dict[int, cKDTree] = {}
    for i in range(n):
        for j in range(i + 1, n):
            gap = np.maximum(0, np.maximum(lo[i] - hi[j], lo[j] - hi[i]))
            if np.sqrt(float((gap ** 2).sum())) > max_dist:
                continue
            # Only points within max_dist of the other's box can realise a min <= max_dist.
            a = points[i]
            a = a[np.all((a >= lo[j] - max_dist) & (a <= hi[j] + max_dist), axis=1)]
            if len(a) == 0:
                continue
            if j not in trees:
                trees[j] = cKDTree(points[j])
            dist, idx = trees[j].query(a, k=1, distance_upper_bound=max_dist + 1e-6)
            ok = np.isfinite(dist)
            if not ok.any():
                continue
            diff = a[ok] - points[j][idx[ok]]
            d[i, j] = d[j, i] = np.sqrt(float((diff * diff).sum(axis=1).min()))
    return d


def cluster_annotations(annotations: Sequence[LidcAnnotation], slice_thickness: float
                        ) -> list[list[LidcAnnotation]]:
    """Group one scan's reader marks into nodules (pylidc's rule).

    Args:
      annotations: the scan's marks in database-id order.
      slice_thickness: the scan's slice thickness; pylidc uses this number as the
        linking tolerance in index units.

    Returns:
      Clusters (lists of marks, in input order), sorted by the mean over their marks
      of the mean contour slice index (stable, as pylidc).
    """
    n = len(annotations)
    if n == 0:
        return []
    if n == 1:
        return [[annotations[0]]]
    tol = float(slice_thickness)
    if tol < 0:
        raise ValueError(f"slice_thickness must be >= 0, got {tol}")
    points = [a.points_zyx for a in annotations]
    d = _min_distances(points, tol)
    _, labels = connected_components(d <= tol, directed=False)
    while np.bincount(labels).max() > MAX_READERS:
        tol *= TOL_FACTOR
        if tol < MIN_TOL:
            break
        _, labels = connected_components(d <= tol, directed=False)
    clusters = [[annotations[i] for i in np.flatnonzero(labels == c)]
                for c in range(labels.max() + 1)]
    mean_k = {a.annotation_id: float(p[:, 0].mean()) for a, p in zip(annotations, points)}
    return sorted(clusters, key=lambda cl: np.mean([mean_k[a.annotation_id] for a in cl]))


def consensus_mask(annotations: Sequence[LidcAnnotation], level: float = 0.5
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consensus of a cluster's reader masks.

    Args:
      annotations: the marks of one nodule (one cluster).
      level: fraction of readers that must mark a voxel (pylidc's ``clevel``).

    Returns:
      (consensus, start_zyx, votes): consensus (Z, Y, X) bool and votes (Z, Y, X)
      int16 (number of readers marking each voxel) over the union bounding box of
      the marks' contours; start_zyx (3,) int64 index of box voxel (0, 0, 0).
    """
    if not annotations:
        raise ValueError("consensus_mask needs at least one annotation")
    boxes = np.stack([annotation_bbox(a) for a in annotations])
    bb = np.stack([boxes[:, :, 0].min(axis=0), boxes[:, :, 1].max(axis=0)], axis=1)
    votes = np.zeros(tuple(bb[:, 1] - bb[:, 0] + 1), dtype=np.int16)
    for a in annotations:
        votes += annotation_mask(a, bb)
    consensus = votes / len(annotations) >= level
    return consensus, bb[:, 0].copy(), votes


def crop_to_content(mask: np.ndarray, start_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop a boolean mask to its True voxels' bounding box.

    Returns:
      (cropped mask, new start (3,) int64). An all-False mask comes back as shape
      (0, 0, 0) with the old start.
    """
    nz = np.argwhere(mask)
    start_zyx = np.asarray(start_zyx, dtype=np.int64)
    if len(nz) == 0:
        return np.zeros((0, 0, 0), dtype=bool), start_zyx.copy()
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    return mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy(), start_zyx + lo
