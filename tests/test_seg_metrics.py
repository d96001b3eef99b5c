"""Segmentation metrics against hand-computed cases and brute-force references
(scipy's directed Hausdorff on surface point sets, Mann-Whitney U for the AUC)."""

import json

import numpy as np
import pytest
from scipy import ndimage, stats
from scipy.spatial.distance import cdist, directed_hausdorff

from lungjax.evaluation.segmentation import (SegmentationPool, dice, hausdorff_distance, iou,
                                             pixel_roc_auc, precision, recall,
                                             segmentation_metrics, segmentation_record,
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


def test_iou_hand_computed():
    t = np.zeros((3, 4), bool)
    t[0, :] = t[1, :2] = True                       # 6 voxels
    p = np.zeros((3, 4), bool)
    p[0, 1:] = p[2, 0] = True                       # 4 voxels, 3 shared, union 7
    assert iou(p, t) == pytest.approx(3 / 7)
    assert iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert segmentation_metrics(p, t)["iou"] == pytest.approx(3 / 7)


def test_hd95_of_two_offset_cubes_in_mm():
    # Two 6-voxel cubes, the second one voxel further along z (2 mm) and x (0.5 mm).
    a = np.zeros((9, 9, 9), bool)
    b = np.zeros((9, 9, 9), bool)
    a[1:7, 1:7, 1:7] = True
    b[2:8, 1:7, 2:8] = True
    spacing = (2.0, 1.0, 0.5)
    # 152 surface voxels each way. The worst: the 6 voxels on the bottom face's low-x
    # edge, whose nearest surface voxel of the other cube is one step diagonally in
    # (z, x): sqrt(2^2 + 0.5^2). The other 30 of the bottom face are 2 mm below it.
    # 6 < 5% of 152, so the 95th percentile (position 0.95 * 151 = 143.45 in the sorted
    # 152 distances; 146 are <= 2 mm) is 2 mm.
    d_ab, d_ba = surface_distances(a, b, spacing)
    assert d_ab.size == d_ba.size == 6 ** 3 - 4 ** 3
    assert np.count_nonzero(np.isclose(d_ab, np.sqrt(4.25))) == 6
    assert np.count_nonzero(d_ab <= 2.0) == 146
    assert hausdorff_distance(a, b, spacing) == pytest.approx(np.sqrt(4.25))
    assert hausdorff_distance(a, b, spacing, percentile=95) == pytest.approx(2.0)
    m = segmentation_metrics(a, b, spacing)
    assert m["hd_mm"] == pytest.approx(np.sqrt(4.25)) and m["hd95_mm"] == pytest.approx(2.0)


def test_segmentation_record_per_scan_and_pooled():
    t1 = np.zeros((4, 6, 6), bool)
    t1[1:3, 1:4, 1:4] = True                        # 18 voxels
    p1 = np.where(t1, 0.9, 0.1)
    p1[1, 1, 1] = 0.3                               # one missed voxel
    t2 = np.zeros((4, 6, 6), bool)
    t2[0, 0, :2] = True                             # 2 voxels
    p2 = np.full(t2.shape, 0.2)
    p2[0, 0, 0] = p2[3, 5, 5] = 0.7                 # one hit, one false positive
    p3, t3 = np.full((4, 6, 6), 0.1), np.zeros((4, 6, 6), bool)     # both empty
    p4 = np.full((4, 6, 6), 0.1)                    # a nodule missed entirely
    rec = segmentation_record({"a": (p1, t1, (2.0, 1.0, 1.0)), "b": (p2, t2, (1, 1, 1)),
                               "c": (p3, t3, (1, 1, 1)), "d": (p4, t2, (1, 1, 1))})
    assert rec["n_scans"] == 4 and list(rec["per_scan"]) == ["a", "b", "c", "d"]
    assert rec["per_scan"]["a"]["dice"] == pytest.approx(34 / 35)
    assert rec["per_scan"]["b"]["dice"] == pytest.approx(0.5)
    assert rec["per_scan"]["c"]["dice"] == 1.0 and rec["per_scan"]["d"]["hd_mm"] == np.inf
    pooled = rec["pooled"]
    # Counts: TP 17 + 1, FP 0 + 1, FN 1 + 1 + 2.
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (18, 1, 4)
    assert pooled["dice"] == pytest.approx(36 / 41) and pooled["iou"] == pytest.approx(18 / 23)
    assert pooled["precision"] == pytest.approx(18 / 19)
    assert pooled["recall"] == pytest.approx(18 / 22)
    assert pooled["n_hd_undefined"] == 1 and pooled["n_cases"] == 4
    assert pooled["hd_mm"] == max(rec["per_scan"][k]["hd_mm"] for k in "abc")
    assert rec["mean"]["dice"] == pytest.approx((34 / 35 + 0.5 + 1 + 0) / 4)
    assert rec["mean"]["hd_mm"] == pytest.approx(
        np.mean([rec["per_scan"][k]["hd_mm"] for k in "abc"]))
    # Probabilities far apart in log-odds: the pooled histogram AUC is the exact one.
    probs = np.concatenate([p.reshape(-1) for p in (p1, p2, p3, p4)])
    truth = np.concatenate([t.reshape(-1) for t in (t1, t2, t3, t2)])
    assert pooled["pixel_auc"] == pytest.approx(pixel_roc_auc(probs, truth), rel=1e-12)
    json.loads(json.dumps(rec))                     # JSON-able (inf written as Infinity)


def test_pool_hd95_pools_surface_distances():
    a = np.zeros((9, 9, 9), bool)
    b = np.zeros((9, 9, 9), bool)
    a[1:7, 1:7, 1:7] = True
    b[2:8, 1:7, 2:8] = True
    pool = SegmentationPool()
    pool.add(a, b, (2.0, 1.0, 0.5))
    pool.add(a, a, (2.0, 1.0, 0.5))                 # 152 more zero distances each way
    d = np.concatenate([surface_distances(a, b, (2.0, 1.0, 0.5))[0], np.zeros(152)])
    assert pool.pooled()["hd95_mm"] == pytest.approx(np.percentile(d, 95))
    assert pool.pooled()["hd_mm"] == pytest.approx(np.sqrt(4.25))
    assert np.isnan(pool.pooled()["pixel_auc"])       # hard masks: no AUC
