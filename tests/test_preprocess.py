"""Preprocessing: resampling grids, lung masks, cropping, windowing and the exact
voxel -> world bookkeeping of the whole chain. ``chest_phantom`` is shared with the
store and prepare tests."""

import numpy as np
import pytest

from lungjax.data.coords import Geometry, voxel_to_world, world_to_voxel
from lungjax.data.preprocess import (LungMaskError, close_mask, crop_box, lung_mask_from_hu,
                                     lung_mask_from_luna_seg, preprocess_scan, resample,
                                     resampled_grid, uint8_to_unit, window_to_uint8)

ROTATED = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def chest_phantom(shape=(36, 60, 64), spacing_zyx=(2.0, 1.5, 1.5), nodule_radius_mm=4.0,
                  lungs=True, seed=0):
    """A small synthetic chest: air, an elliptic body, two ellipsoid lungs and one solid
    nodule in the right lung.

    Returns:
      (hu int16 (z, y, x), lung bool (z, y, x) ground truth, nodule centre voxel (3,)
      float in (z, y, x)).
    """
    spacing = np.asarray(spacing_zyx, np.float64)
    centre = (np.asarray(shape) - 1) / 2.0
    z, y, x = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)]
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    extent = np.asarray(shape) * spacing
    body = (y / (0.42 * extent[1])) ** 2 + (x / (0.45 * extent[2])) ** 2 <= 1.0
    lz, ly, lx = 0.38 * extent[0], 0.3 * extent[1], 0.17 * extent[2]
    offset = 0.24 * extent[2]
    lung = np.zeros(shape, bool)
    if lungs:
        for sign in (-1, 1):
            lung |= (z / lz) ** 2 + (y / ly) ** 2 + ((x - sign * offset) / lx) ** 2 <= 1.0
    hu = np.full(shape, -1000.0)
    hu[np.broadcast_to(body, shape)] = 40.0
    hu[lung] = -850.0
    nodule = centre + np.array([0.3, -0.4, -offset / spacing[2] + 0.25])
    nz, ny, nx = (nodule - centre) * spacing
    if lungs:
        hu[(z - nz) ** 2 + (y - ny) ** 2 + (x - nx) ** 2 <= nodule_radius_mm ** 2] = 60.0
    hu += np.random.default_rng(seed).normal(0, 15, shape)
    return np.rint(hu).astype(np.int16), lung, nodule


def phantom_geometry(spacing_zyx=(2.0, 1.5, 1.5), direction=ROTATED):
    return Geometry(np.asarray(spacing_zyx)[::-1], np.array([-150.2, 80.5, -320.0]), direction)


def test_resampled_grid_keeps_origin_and_extent():
    geom = phantom_geometry()
    target, shape = resampled_grid(geom, (36, 60, 64), (1.0, 1.0, 1.0))
    assert shape == (72, 90, 96)
    np.testing.assert_array_equal(target.origin, geom.origin)
    np.testing.assert_array_equal(target.direction, geom.direction)
    np.testing.assert_array_equal(target.spacing_zyx, (1, 1, 1))
    same, shape2 = resampled_grid(geom, (36, 60, 64), None)
    assert same is geom and shape2 == (36, 60, 64)
    with pytest.raises(ValueError, match="positive"):
        resampled_grid(geom, (3, 3, 3), (0, 1, 1))


def test_resample_samples_the_same_world_points():
    # A linear ramp along world x is reproduced exactly by linear interpolation.
    geom = phantom_geometry()
    shape = (10, 12, 14)
    vox = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    ramp = voxel_to_world(vox, geom)[..., 0].astype(np.float32)
    out, target = resample(ramp, geom, (1.0, 1.0, 1.0))
    vox2 = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1)
    expected = voxel_to_world(vox2, target)[..., 0]
    inside = np.all(world_to_voxel(voxel_to_world(vox2, target), geom) <= np.asarray(shape) - 1,
                    axis=-1)
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-3)


def test_window_to_uint8():
    hu = np.array([-2000, -1200, -300, 600, 3000], np.int16)
    np.testing.assert_array_equal(window_to_uint8(hu), [0, 0, 128, 255, 255])
    np.testing.assert_allclose(uint8_to_unit(np.array([0, 255], np.uint8)), [0.0, 1.0])
    with pytest.raises(ValueError, match="high > low"):
        window_to_uint8(hu, (10, 10))


def test_lung_mask_finds_both_lungs_and_fills_the_nodule():
    hu, truth, nodule = chest_phantom()
    spacing = (2.0, 1.5, 1.5)
    mask = lung_mask_from_hu(hu, spacing)
    # Outside air (touching the in-plane border) is gone; both lungs are kept.
    assert not mask[:, 0, :].any() and not mask[:, :, 0].any()
    from scipy import ndimage
    assert ndimage.label(mask)[1] == 2
    # The nodule (brighter than the threshold) is filled in by the morphology.
    assert mask[tuple(np.rint(nodule).astype(int))]
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9
    assert (truth & ~mask).sum() < 0.01 * truth.sum()


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("case", ["table", "apex", "past_the_end", "fov_cuts_lungs",
                                  "round_fov"])
def test_threshold_lung_mask_on_hard_real_world_layouts(case):
    """The cases where outside air reaches the lungs in 3-D: a CT table (a hollow slab
    spanning the field of view under the body), a scan that starts inside the lungs (cut
    at the apex), an air-filled slice past the end of the scan (a resampled grid one
    slice longer); and where a lung touches the border of its slice as outside air does:
    a field of view cut through both lungs, and a round field of view padded with
    -2000 HU that cuts the body."""
    hu, truth, _ = chest_phantom(shape=(40, 64, 64))
    hu = hu.astype(np.float32)
    if case == "fov_cuts_lungs":
        hu, truth = hu[:, :, 11:53], truth[:, :, 11:53]  # +-31.5 mm; lungs reach +-39 mm
        assert truth[:, :, [0, -1]].any(axis=(1, 2)).sum() > 10
    elif case == "round_fov":
        yy, xx = np.mgrid[:64, :64]
        outside = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 > 27.5 ** 2  # the body reaches past
        assert (hu[:, outside] > -400).any() and not truth[:, outside].any()
        hu[:, outside] = -2000.0
    if case == "table":
        hu[:, 56:62, :] = 300.0  # the table top and bottom, border to border
        hu[:, 58:60, 2:-2] = -1000.0  # its hollow core, closed at the ends
    elif case == "apex":
        hu, truth = hu[14:], truth[14:]  # the first slice crosses both lungs
    elif case == "past_the_end":
        hu, truth = hu[:30], truth[:30]
        hu[-1] = -1000.0  # resampling fill beyond the last slice
        truth[-1] = False
    mask = lung_mask_from_hu(hu, (2.0, 1.5, 1.5))
    # Where the field of view cuts a lung, the hull's margin costs a few columns of it.
    assert _iou(mask, truth) > (0.85 if case == "fov_cuts_lungs" else 0.9)


def test_close_mask_bridges_gaps_and_contains_input():
    mask = np.zeros((20, 30, 30), bool)
    mask[5:15, 5:25, 5:14] = True
    mask[5:15, 5:25, 16:25] = True  # 2-voxel slit between two blocks
    closed = close_mask(mask, (1.0, 1.0, 1.0), radius_mm=3.0)
    assert closed[10, 15, 14] and closed[10, 15, 15]
    assert np.all(closed[mask])
    assert not closed[0].any() and not closed[:, :, 29].any()


def test_empty_lung_mask_raises_naming_the_scan():
    hu, _, _ = chest_phantom(lungs=False)
    with pytest.raises(LungMaskError, match=r"case7: empty lung mask"):
        lung_mask_from_hu(hu, (2.0, 1.5, 1.5), name="case7")
    with pytest.raises(LungMaskError, match=r"m\.mhd: empty lung mask: no voxel labelled 3 or 4"):
        lung_mask_from_luna_seg(np.full((3, 3, 3), 5, np.uint8), name="m.mhd")


def test_luna_seg_labels():
    seg = np.array([0, 3, 4, 5, 1], np.uint8).reshape(1, 1, 5)
    np.testing.assert_array_equal(lung_mask_from_luna_seg(seg)[0, 0], [0, 1, 1, 0, 0])


def test_crop_box_margin_and_clipping():
    mask = np.zeros((10, 20, 30), bool)
    mask[2:4, 5:10, 20:29] = True
    start, stop = crop_box(mask, (2.0, 1.0, 1.0), margin_mm=3.0)
    assert start == (0, 2, 17) and stop == (6, 13, 30)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.5, 1.5), None])
def test_annotated_centre_survives_the_chain(spacing):
    """world -> stored voxel -> world is exact, and the stored voxel nearest the
    annotated centre is within half a voxel of it and shows the nodule."""
    hu, _, nodule = chest_phantom()
    geom = phantom_geometry()
    world = voxel_to_world(nodule, geom)
    pre = preprocess_scan(hu, geom, spacing_zyx=spacing, margin_mm=5.0, name="p")
    assert pre.geometry.spacing_zyx.tolist() == list(spacing or (2.0, 1.5, 1.5))
    assert pre.image.dtype == np.uint8 and pre.lung.dtype == np.uint8
    assert pre.image.shape == pre.lung.shape == tuple(
        b - a for a, b in zip(pre.crop_start_zyx, pre.crop_stop_zyx))
    v = world_to_voxel(world, pre.geometry)
    np.testing.assert_allclose(voxel_to_world(v, pre.geometry), world, atol=1e-9)
    nearest = np.rint(v).astype(int)
    error_mm = np.abs(voxel_to_world(nearest, pre.geometry) - world)
    assert np.all(error_mm <= pre.geometry.spacing / 2 + 1e-9)
    # Stored grid = resampled grid shifted by the crop start.
    np.testing.assert_allclose(
        pre.geometry.origin, voxel_to_world(np.array(pre.crop_start_zyx), pre.resampled_geometry))
    # The nodule is bright (60 HU -> ~0.7) and lies inside the stored lung mask.
    assert uint8_to_unit(pre.image[tuple(nearest)]) > 0.6
    assert pre.lung[tuple(nearest)] == 1
    t = pre.transforms()
    assert t["lung_mask_source"] == "threshold" and t["crop_start_zyx"] == list(pre.crop_start_zyx)


def test_preprocess_with_luna_mask_and_nodule_labels():
    hu, truth, nodule = chest_phantom()
    seg = np.where(truth, 3, 0).astype(np.uint8)
    labels = np.zeros(hu.shape, np.uint8)
    labels[tuple(np.rint(nodule).astype(int))] = 1
    pre = preprocess_scan(hu, phantom_geometry(), lung_seg=seg, nodule_labels=labels,
                          margin_mm=0.0)
    assert pre.lung_mask_source == "luna16"
    assert pre.nodules is not None and pre.nodules.shape == pre.image.shape
    assert pre.nodules.max() == 1
    # Zero margin: the crop is the lung bounding box, so every face touches the lung.
    for axis in range(3):
        assert pre.lung.take(0, axis).any() and pre.lung.take(-1, axis).any()
    with pytest.raises(ValueError, match="lung mask shape"):
        preprocess_scan(hu, phantom_geometry(), lung_seg=seg[:-1])
