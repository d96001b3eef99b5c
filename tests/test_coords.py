import numpy as np
import pytest
import SimpleITK as sitk

from lungjax.data.coords import Geometry, voxel_to_world, within_sphere, world_to_voxel


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_identity_geometry_maps_index_times_spacing_plus_origin():
    g = Geometry(np.array([0.7, 0.8, 2.5]), np.array([-100.0, -50.0, -300.0]), np.eye(3))
    # voxel (z=2, y=3, x=4) -> world x = -100 + 4*0.7, y = -50 + 3*0.8, z = -300 + 2*2.5
    np.testing.assert_allclose(voxel_to_world([2, 3, 4], g), [-97.2, -47.6, -295.0])
    np.testing.assert_allclose(world_to_voxel([-97.2, -47.6, -295.0], g), [2, 3, 4])


@pytest.mark.parametrize("angles", [(0.3, -0.2, 1.1), (np.pi, 0, 0), (0, 0, np.pi / 2)])
def test_matches_simpleitk_with_non_identity_direction(angles):
    direction = _rotation(*angles)
    g = Geometry(np.array([0.6, 0.9, 1.7]), np.array([12.0, -40.0, 7.5]), direction)
    img = sitk.Image(8, 9, 10, sitk.sitkInt16)  # size given as (x, y, z)
    g.apply_to_sitk(img)
    rng = np.random.default_rng(0)
    for _ in range(5):
        zyx = rng.uniform(0, 8, size=3)
        expect = img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1]))
        np.testing.assert_allclose(voxel_to_world(zyx, g), expect, atol=1e-9)
        np.testing.assert_allclose(world_to_voxel(expect, g), zyx, atol=1e-9)
    assert Geometry.from_sitk(img).to_json() == g.to_json()


def test_round_trip_batched_and_shifted():
    g = Geometry(np.array([1.0, 1.0, 1.0]), np.array([5.0, 6.0, 7.0]), _rotation(0.1, 0.2, 0.3))
    pts = np.random.default_rng(1).uniform(-50, 50, size=(4, 7, 3))
    np.testing.assert_allclose(voxel_to_world(world_to_voxel(pts, g), g), pts, atol=1e-9)
    sub = g.shifted([2, 3, 4])
    np.testing.assert_allclose(voxel_to_world([0, 0, 0], sub), voxel_to_world([2, 3, 4], g))
    np.testing.assert_allclose(voxel_to_world([1, 1, 1], sub), voxel_to_world([3, 4, 5], g))
    assert Geometry.from_json(g.to_json()).to_json() == g.to_json()


@pytest.mark.parametrize("spacing", [(0, 1, 1), (1, -1, 1), (1, np.nan, 1)])
def test_bad_spacing_is_rejected(spacing):
    with pytest.raises(ValueError, match="spacing"):
        Geometry(np.array(spacing, float), np.zeros(3), np.eye(3))


def test_within_sphere_is_strict_and_broadcasts():
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    radii = np.array([3.0, 1.0])
    points = np.array([[3.0, 0.0, 0.0],    # exactly on sphere 0: outside (LUNA16's <)
                       [0.0, 2.9, 0.0],    # inside sphere 0
                       [10.0, 0.0, -0.5],  # inside sphere 1
                       [5.0, 5.0, 5.0]])   # inside neither
    table = within_sphere(points[:, None], centres[None], radii[None])
    np.testing.assert_array_equal(table, [[False, False], [True, False], [False, True],
                                          [False, False]])
    # Paired form: point i against sphere j.
    np.testing.assert_array_equal(within_sphere(points[[1, 2]], centres[[0, 1]], radii),
                                  [True, True])
    assert within_sphere(np.zeros((0, 1, 3)), centres[None], radii[None]).shape == (0, 2)
    # Voxel (z, y, x) points with spacing: 2 voxels of 2.5 mm along z is 5 mm.
    sp = np.array([2.5, 0.7, 0.7])
    assert not within_sphere([2.0, 0.0, 0.0], [0.0, 0.0, 0.0], 5.0, sp)
    assert within_sphere([1.9, 0.0, 0.0], [0.0, 0.0, 0.0], 5.0, sp)
