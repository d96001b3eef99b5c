"""Augmentation on tiny literal arrays: exact flips/rotations, centre-preserving zoom,
translation bounds, and point tracking that matches the image transform."""

import numpy as np
import pytest

from lungjax.data import augment as aug


def _arange(shape):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_flip_exact():
    x = _arange((2, 2, 3))
    np.testing.assert_array_equal(aug.flip(x, (True, False, False)), x[::-1])
    np.testing.assert_array_equal(aug.flip(x, (False, True, True)), x[:, ::-1, ::-1])
    np.testing.assert_array_equal(aug.flip(x, (False, False, False)), x)


def test_rot90_yx_exact():
    x = np.array([[[1, 2],
                   [3, 4]]], np.float32)
    # One quarter turn (np.rot90 sense: first axis towards the second).
    np.testing.assert_array_equal(aug.rot90_yx(x, 1), [[[2, 4], [1, 3]]])
    np.testing.assert_array_equal(aug.rot90_yx(x, 2), [[[4, 3], [2, 1]]])
    np.testing.assert_array_equal(aug.rot90_yx(x, 3), [[[3, 1], [4, 2]]])
    np.testing.assert_array_equal(aug.rot90_yx(x, 4), x)


def test_resample_identity_is_copy():
    x = _arange((3, 4, 5))
    np.testing.assert_array_equal(aug.resample(x, (3, 4, 5), 1.0), x)


def test_resample_preserves_centre_and_is_exact_on_linear_ramp():
    # Trilinear interpolation reproduces a linear function exactly, so the zoom's
    # coordinate map can be checked to float precision: out[o] = f(R//2 + (o - S//2)/s).
    out_shape = (5, 7, 6)
    for scale in (0.9, 1.1):
        size = aug.read_size(out_shape, scale)
        zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij")
        ramp = (3 * zz + 2 * yy - xx).astype(np.float32)
        got = aug.resample(ramp, out_shape, scale)
        o = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in out_shape],
                                 indexing="ij"), -1)
        src = np.asarray(size) // 2 + (o - np.asarray(out_shape) // 2) / scale
        assert src.min() >= 0 and np.all(src <= np.asarray(size) - 1)  # read_size covers it
        want = 3 * src[..., 0] + 2 * src[..., 1] - src[..., 2]
        np.testing.assert_allclose(got, want, atol=1e-4)
        # The centre voxel samples the crop's centre voxel exactly.
        c = tuple(s // 2 for s in out_shape)
        assert got[c] == pytest.approx(ramp[tuple(s // 2 for s in size)], abs=1e-4)


def test_resample_2d_keeps_slices():
    size = aug.read_size((1, 6, 6), 1.1, is_2d=True)
    assert size[0] == 1
    x = np.random.default_rng(0).random(size, np.float32)
    assert aug.resample(x, (1, 6, 6), 1.1, is_2d=True).shape == (1, 6, 6)


def test_random_ball_offset_bounds_and_coverage():
    rng = np.random.default_rng(0)
    r = np.array([1.5, 3.0, 2.0])
    seen = set()
    for _ in range(3000):
        o = aug.random_ball_offset(rng, r)
        assert o.dtype == np.int64
        assert np.sum((o / r) ** 2) <= 1 + 1e-9
        seen.add(tuple(o))
    # All lattice points of the ellipsoid are reachable.
    grid = np.stack(np.meshgrid(*[np.arange(-int(v), int(v) + 1) for v in r], indexing="ij"), -1)
    inside = {tuple(p) for p in grid.reshape(-1, 3) if np.sum((p / r) ** 2) <= 1 + 1e-9}
    assert seen == inside
    np.testing.assert_array_equal(aug.random_ball_offset(rng, [0, 0.5, 0]), [0, 0, 0])
    with pytest.raises(ValueError):
        aug.random_ball_offset(rng, [-1, 0, 0])


def test_draw_params_translation_within_nodule_radius():
    cfg = aug.AugmentConfig(translate_nodule_fraction=1.0, translate_mm=50.0)
    rng = np.random.default_rng(1)
    spacing = (2.0, 1.0, 1.0)
    shifts = np.array([aug.draw_params(cfg, rng, spacing_zyx=spacing, diameter_mm=8.0).shift_zyx
                       for _ in range(500)])
    mm = shifts * np.asarray(spacing)
    assert np.all(np.linalg.norm(mm, axis=1) <= 4.0 + 1e-9)
    assert np.abs(shifts).max() > 0
    # Negatives (no diameter) use translate_mm; 2D patches never shift in z.
    shifts = np.array([aug.draw_params(cfg, rng, spacing_zyx=spacing, is_2d=True).shift_zyx
                       for _ in range(200)])
    assert np.all(shifts[:, 0] == 0) and np.abs(shifts).max() > 4


def test_draw_params_rotation_restricted_on_non_square():
    cfg = aug.AugmentConfig(rot90=True, flip_axes=(0, 1, 2), scale_range=(0.9, 1.1))
    rng = np.random.default_rng(2)
    ps = [aug.draw_params(cfg, rng, spacing_zyx=(1, 1, 1), square_yx=False) for _ in range(100)]
    assert {p.rot_k for p in ps} == {0, 2}
    assert all(0.9 <= p.scale <= 1.1 for p in ps)
    assert {p.flips for p in ps} >= {(False, False, False), (True, True, True)}


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="unknown field"):
        aug.AugmentConfig.from_mapping({"flip": (0,)})
    with pytest.raises(ValueError, match="flip_axes"):
        aug.AugmentConfig(flip_axes=(3,))
    with pytest.raises(ValueError, match="scale_range"):
        aug.AugmentConfig(scale_range=(1.2, 1.0))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 1.1])
def test_map_point_follows_the_image(k, scale):
    # A single bright voxel tracked through apply() lands where map_point says.
    out_shape = (4, 6, 6)
    params = aug.AugmentParams(scale=scale, rot_k=k, flips=(True, False, True))
    size = aug.read_size(aug.rotated_input_shape(out_shape, k), scale)
    crop = np.zeros(size, np.float32)
    src = np.array(size) // 2 + np.array([1, -1, 2])
    crop[tuple(src)] = 1.0
    got = aug.apply(crop, out_shape, params)
    assert got.shape == out_shape
    want = aug.map_point(src.astype(np.float64), size, out_shape, params)
    if scale == 1.0:
        np.testing.assert_allclose(want, np.argwhere(got == 1.0)[0])
    else:
        # Trilinear splat: the intensity-weighted centroid of the zoomed voxel is
        # the mapped point up to the support's asymmetry (< 1/2 voxel).
        idx = np.argwhere(got > 0)
        centroid = (idx * got[got > 0][:, None]).sum(0) / got.sum()
        assert np.all(np.abs(centroid - want) < 0.5)


def test_map_point_non_square_rotation():
    out_shape = (2, 3, 5)
    params = aug.AugmentParams(rot_k=1)
    pre = aug.rotated_input_shape(out_shape, 1)
    assert pre == (2, 5, 3)
    crop = np.zeros(pre, np.float32)
    crop[1, 4, 0] = 1.0
    got = aug.apply(crop, out_shape, params)
    np.testing.assert_allclose(aug.map_point(np.array([1.0, 4, 0]), pre, out_shape, params),
                               np.argwhere(got == 1.0)[0])


def test_relative_to_center_symmetric_under_flip():
    shape = (4, 6, 6)
    p = np.array([3.0, 1.0, 2.5])
    params = aug.AugmentParams(flips=(True, True, True))
    q = aug.map_point(p, shape, shape, params)
    np.testing.assert_allclose(aug.relative_to_center(q, shape), -aug.relative_to_center(p, shape))
