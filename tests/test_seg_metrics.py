"""Segmentation metrics against hand-computed cases and brute-force references
(scipy's directed Hausdorff on surface point sets, Mann-Whitney U for the AUC)."""

import numpy as np
import pytest
from scipy import ndimage, stats
from scipy.spatial.distance import cdist, directed_hausdorff

from lungjax.evaluation.segmentation import (dice, hausdorff_distance, pixel_roc_auc,
                                             precision, recall, segmentation_metrics,
                                             surface_distances)


def test_overlap_hand_computed():
    t = np.zeros((3, 4), bool)
    t[0, :] = t[1, :2] = True                       # 6 voxels
    p = np.zeros((3, 4), bool)
    p[0, 1:] = p[2, 0] = True                       # 4 voxels, 3 shared
    assert dice(p, t) == pytest.approx(0.6)
    assert precision(p, t) == pytest.approx(0.75)
    assert recall(p, t) == pytest.approx(0.5)


def test_empty_masks():
    e = np.zeros((2, 3, 3), bool)
    full = np.ones((2, 3, 3), bool)
    assert dice(e, e) == 1.0 and dice(e, e, empty_value=np.nan) != dice(e, e, empty_value=0)
    assert dice(full, e) == 0.0 and precision(e, full) == 0.0 and recall(full, e) == 0.0
    assert precision(e, e) == recall(e, e) == 1.0
    assert hausdorff_distance(e, e) == 0.0
    assert hausdorff_distance(full, e) == np.inf and hausdorff_distance(e, full) == np.inf


def test_surface_of_a_cube_and_border():
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True
    a, b = surface_distances(m, m)
    assert a.size == b.size == 26                   # all but the centre voxel
    assert (a == 0).all()
    # A mask touching the array border has its surface there (border counts as outside).
    full = np.ones((3, 3, 3), bool)
    assert surface_distances(full, full)[0].size == 26


def test_hausdorff_single_voxels_anisotropic():
    p = np.zeros((3, 4, 2), bool)
    t = np.zeros((3, 4, 2), bool)
    p[0, 0, 0] = True
    t[2, 3, 1] = True
    spacing = (2.5, 1.0, 0.5)                       # (z, y, x) mm
    expected = np.sqrt((2 * 2.5) ** 2 + 3.0 ** 2 + 0.5 ** 2)
    assert hausdorff_distance(p, t, spacing) == pytest.approx(expected)
    assert hausdorff_distance(p, t, spacing, percentile=95) == pytest.approx(expected)


def test_hausdorff_shifted_box_in_mm():
    a = np.zeros((10, 8, 8), bool)
    b = np.zeros((10, 8, 8), bool)
    a[1:5, 2:6, 2:6] = True
    b[3:7, 2:6, 2:6] = True                         # shifted by 2 slices of 3 mm
    assert hausdorff_distance(a, b, (3.0, 0.7, 0.7)) == pytest.approx(6.0)
    assert hausdorff_distance(a, b, (3.0, 0.7, 0.7), percentile=95) <= 6.0


def _blob(rng, shape, thresh):
    return ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > thresh


def _surface_points(mask, spacing):
    # Independent surface definition: a voxel with a face-neighbour outside the mask.
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for ax in range(mask.ndim):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=ax)[tuple([slice(1, -1)] * mask.ndim)]
    return np.argwhere(mask & ~inner) * np.asarray(spacing)


@pytest.mark.parametrize("seed", range(4))
def test_hausdorff_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 16, 14)
    spacing = (2.5, 0.8, 0.6)
    p, t = _blob(rng, shape, 0.05), _blob(rng, shape, 0.08)
    pp, tp = _surface_points(p, spacing), _surface_points(t, spacing)
    hd = max(directed_hausdorff(pp, tp)[0], directed_hausdorff(tp, pp)[0])
    assert hausdorff_distance(p, t, spacing) == pytest.approx(hd, rel=1e-12)
    d = cdist(pp, tp)
    hd95 = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    assert hausdorff_distance(p, t, spacing, percentile=95) == pytest.approx(hd95, rel=1e-12)
    m = segmentation_metrics(p, t, spacing)
    assert m["hd_mm"] == pytest.approx(hd) and m["hd95_mm"] == pytest.approx(hd95)


def test_hausdorff_2d():
    rng = np.random.default_rng(9)
    p, t = _blob(rng, (30, 25), 0.0), _blob(rng, (30, 25), 0.1)
    pp, tp = _surface_points(p, (0.7, 0.9)), _surface_points(t, (0.7, 0.9))
    hd = max(directed_hausdorff(pp, tp)[0], directed_hausdorff(tp, pp)[0])
    assert hausdorff_distance(p, t, (0.7, 0.9)) == pytest.approx(hd)


def test_pixel_auc_is_mann_whitney():
    rng = np.random.default_rng(0)
    t = rng.random((6, 10, 10)) < 0.3
    prob = np.round(np.clip(rng.normal(0.3 + 0.3 * t, 0.2), 0, 1), 1)   # many ties
    u = stats.mannwhitneyu(prob[t], prob[~t]).statistic
    assert pixel_roc_auc(prob, t) == pytest.approx(u / (t.sum() * (~t).sum()), rel=1e-12)
    assert np.isnan(pixel_roc_auc(prob, np.zeros_like(t)))


def test_segmentation_metrics_dict_and_errors():
    t = np.zeros((4, 6, 6), bool)
    t[1:3, 1:4, 1:4] = True
    prob = np.where(t, 0.9, 0.1)
    prob[1, 1, 1] = 0.4                              # one false negative voxel
    m = segmentation_metrics(prob, t, (2.0, 1.0, 1.0))
    assert m["volume_target"] == 18 and m["volume_pred"] == 17
    assert m["dice"] == pytest.approx(34 / 35) and m["recall"] == pytest.approx(17 / 18)
    assert m["precision"] == 1.0 and m["pixel_auc"] == 1.0
    assert np.isnan(segmentation_metrics(t, t)["pixel_auc"])
    assert segmentation_metrics(t, t)["hd_mm"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="spacing must be 3 positive"):
        hausdorff_distance(t, t, (1.0, 1.0))
