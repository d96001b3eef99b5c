"""Whole-volume tiling sized to the volume (``screening.plan_axis_tiles``), shared by the
screening stage (``score_volume``) and the xie2018 detector (``anchors_decode``): tiled
results equal one-pass results on odd-shaped random volumes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.data.coords import Geometry
from lungjax.models.fcn import Dou2017FCN
from lungjax.models.resnet_fpn import XieFPN
from lungjax.tasks.anchors import AnchorConfig
from lungjax.tasks.anchors_decode import decode_volume, detect_volume
from lungjax.tasks.screening import (candidates_from_scores, output_mapping, plan_axis_tiles,
                                     score_volume)


def _check_plan(tiles, cells, extent, stride, need_lo, need_hi):
    """Tiles partition the cells, share one aligned width inside the volume, and every
    cell's (clipped) needs lie in its tile's window."""
    assert [t[0] for t in tiles] == [0] + [t[1] for t in tiles[:-1]]
    assert tiles[-1][1] == cells
    assert len({hi - lo for _, _, lo, hi in tiles}) == 1
    lo_need = (need_lo // stride) * stride
    for c0, c1, lo, hi in tiles:
        assert c0 < c1 and 0 <= lo < hi <= extent and lo % stride == 0
        for c in range(c0, c1):
            assert lo <= max(0, stride * c + lo_need)
            assert min(extent, stride * c + need_hi) <= hi


def test_plan_axis_tiles_sizes_tiles_to_the_volume():
    # A 300-voxel axis padded to 304 (19 blocks of 16), cap 128, halo 32: 3 tiles, the
    # smallest window that covers the axis with 3 (not 128 + 2 * 32 = 192).
    tiles = plan_axis_tiles(19, 304, 16, -32, 48, 128)
    assert tiles == [(0, 7, 0, 144), (7, 12, 80, 224), (12, 19, 160, 304)]
    _check_plan(tiles, 19, 304, 16, -32, 48)
    # One window less wide cannot cover the axis with 3 tiles: the edge tiles use their
    # whole window (no context needed beyond the volume), the middle one 2 halos less.
    assert 3 * 128 - 2 * 2 * 32 < 304
    # No cap, or a cap past the extent: one window over the whole axis.
    assert plan_axis_tiles(19, 304, 16, -32, 48, None) == [(0, 19, 0, 304)]
    assert plan_axis_tiles(19, 304, 16, -32, 48, 400) == [(0, 19, 0, 304)]
    # A receptive field wider than a third of the axis: fewer windows than the count.
    assert plan_axis_tiles(10, 40, 4, -40, 44, 4) == [(0, 10, 0, 40)]
    with pytest.raises(ValueError, match="cells"):
        plan_axis_tiles(0, 10, 1, 0, 1, 4)
    with pytest.raises(ValueError, match="tile size"):
        plan_axis_tiles(5, 10, 1, 0, 1, 0)


def test_plan_axis_tiles_random_cases_are_valid_and_within_the_count():
    rng = np.random.default_rng(0)
    for _ in range(300):
        stride = int(rng.choice([1, 2, 4, 16]))
        cells = int(rng.integers(1, 60))
        need_lo = int(rng.integers(-40, 10))
        need_hi = max(need_lo + 1, int(rng.integers(1, 50)))
        extent = stride * max(cells, -(-(stride * (cells - 1) + need_hi) // stride))
        cap = int(rng.integers(1, 200))
        tiles = plan_axis_tiles(cells, extent, stride, need_lo, need_hi, cap)
        _check_plan(tiles, cells, extent, stride, need_lo, need_hi)
        assert len(tiles) <= -(-cells // max(1, cap // stride))
        # Cores are at most the cap (rounded to whole cells), bar a single whole-axis tile.
        if len(tiles) > 1:
            per = -(-cells // len(tiles))
            assert max(c1 - c0 for c0, c1, _, _ in tiles) <= per + (
                2 * (need_hi - need_lo) // stride + 2)


def _numpy_params(model, shape, seed, scale=0.3):
    """Random parameters from the shapes ``init`` gives (cheaper than compiling init)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape, 1)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def test_screening_tiled_equals_one_pass_on_odd_volume():
    # Fixed formulation: "auto" may pick another per shape (results then agree to rounding).
    fcn = Dou2017FCN(features=(4, 4, 8, 8), conv_impl="xla")
    variables = _numpy_params(fcn, (10, 30, 30), 1)

    def prob(v, x):
        return jax.nn.softmax(fcn.apply(v, x), axis=-1)[..., 1]

    mapping = output_mapping(fcn.layer_specs(), center="patch")
    vol = np.random.default_rng(2).random((23, 71, 57), dtype=np.float32)
    full, m_full = score_volume(prob, vol, mapping, variables=variables)
    tiled, m_tiled = score_volume(prob, vol, mapping, tile_zyx=(8, 24, 20), batch=2,
                                  variables=variables)
    assert m_full == m_tiled and full.shape == (23, 36, 29)
    np.testing.assert_allclose(tiled, full, rtol=1e-6, atol=1e-7)
    geom = Geometry(np.ones(3), np.zeros(3), np.eye(3))
    kw = dict(threshold=float(np.quantile(full, 0.9)), nms_radius_mm=4.0)
    a = candidates_from_scores(full, m_full, geom, **kw)
    b = candidates_from_scores(tiled, m_tiled, geom, **kw)
    assert len(a) > 5
    np.testing.assert_array_equal(a.cells, b.cells)
    np.testing.assert_allclose(a.score, b.score, rtol=1e-6)


# A detector small enough to tile with a halo covering its receptive field: cells of a
# block [8b, 8b + 8) read voxels 8b - 31 .. 8b + 7 + 36 (measured by gradients).
XIE = XieFPN(stem_features=4, stage_features=(4, 8, 8), stage_blocks=(1, 1, 1), fpn_features=8,
             head_features=8, head_strides=(2, 4), anchors_mm=((3.0, 5.0), (10.0,)),
             norm="none", conv_impl="xla")
XIE_CFG = AnchorConfig(heads=XIE.heads())


def _xie_apply(v, x):
    return XIE.apply(v, x, train=False)


def test_xie_detector_tiled_equals_one_pass_on_odd_volume():
    variables = _numpy_params(XIE, (16, 16, 16), 3, scale=0.1)
    vol = np.random.default_rng(4).random((45, 90, 37), dtype=np.float32)
    kw = dict(multiple=8, variables=variables)
    one = decode_volume(_xie_apply, vol, XIE_CFG, **kw)
    # 45 -> 48 voxels, cap 16: 3 tiles; 90 -> 96, cap 32: 3 tiles; x one window.
    tiled = decode_volume(_xie_apply, vol, XIE_CFG, tile_zyx=(16, 32, 64), halo=40, **kw)
    assert len(one[0]) == len(tiled[0]) > 0

    def order(d):
        return np.lexsort((d[2], d[1][:, 2], d[1][:, 1], d[1][:, 0]))

    for u, t in zip(one, tiled):
        np.testing.assert_allclose(t[order(tiled)], u[order(one)], rtol=1e-5, atol=1e-5)
    # Selection on top: the same detections.
    sel = dict(threshold=float(np.quantile(one[0], 0.999)), method="iou", iou_threshold=0.1)
    a = detect_volume(_xie_apply, vol, XIE_CFG, **kw, **sel)
    b = detect_volume(_xie_apply, vol, XIE_CFG, tile_zyx=(16, 32, 64), halo=40, **kw, **sel)
    assert len(a) == len(b) > 3
    np.testing.assert_allclose(b.centre_zyx, a.centre_zyx, atol=1e-4)
    np.testing.assert_allclose(b.score, a.score, rtol=1e-5)


def test_xie_noduleness_map_is_the_finest_heads_best_anchor_tiled_or_not():
    """The score map ``--save-maps`` writes for xie2018: per cell of the finest head (stride
    2 here), the best anchor's noduleness, cut to the volume; tiling does not change it."""
    import jax

    variables = _numpy_params(XIE, (16, 16, 16), 3, scale=0.1)
    vol = np.random.default_rng(5).random((45, 90, 37), dtype=np.float32)
    kw = dict(multiple=8, variables=variables, score_map=True)
    *_, (one, head) = decode_volume(_xie_apply, vol, XIE_CFG, **kw)
    *_, (tiled, _) = decode_volume(_xie_apply, vol, XIE_CFG, tile_zyx=(16, 32, 64), halo=40,
                                   **kw)
    assert head == XIE_CFG.head_mapping(0) and head.stride_zyx == (2, 2, 2)
    assert one.shape == (23, 45, 19) == tiled.shape
    np.testing.assert_allclose(tiled, one, rtol=1e-5, atol=1e-6)
    padded = np.zeros((48, 96, 40), np.float32)
    padded[:45, :90, :37] = vol
    head = np.asarray(_xie_apply(variables, padded[None, ..., None])[0])[0]  # (24, 48, 20, 2, 5)
    want = jax.nn.sigmoid(head[..., 0]).max(axis=-1)[:23, :45, :19]
    np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-6)


def test_xie_tiles_share_one_shape_and_stay_inside_the_volume():
    # What decode_volume runs for a 300^3 scan with the paper variant's tiles.
    blocks = 19
    axes = [plan_axis_tiles(blocks, 16 * blocks, 16, -32, 48, t) for t in (128, 192, 192)]
    shapes = {tuple(t[3] - t[2] for t in tile) for tile in itertools.product(*axes)}
    # 3 x 2 x 2 windows of 144 x 192^2 (the fixed 128 x 192^2 cores of before: 192 x 256^2).
    assert shapes == {(144, 192, 192)}
    assert [len(a) for a in axes] == [3, 2, 2]
