"""Index mapping, tiled whole-volume scoring, 3D NMS and candidate coordinates."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.data.coords import Geometry, world_to_voxel
from lungjax.models.layers import Conv
from lungjax.tasks.nms import nms_points, peaks_3d
from lungjax.models import fcn
from lungjax.tasks.screening import (OutputMapping, candidates_from_scores,
                                     foreground_probability, nms_radius_cells, output_mapping,
                                     output_shape, score_volume)

# ---------------------------------------------------------------------------
# Index mapping on literal layer lists.
# ---------------------------------------------------------------------------

# The dou2017 screening FCN layout (conv, pool, conv, conv, conv, 1x1x1 conv), VALID.
DOU_LAYERS = [((3, 5, 5), 1, 0), ((1, 2, 2), (1, 2, 2), 0), ((3, 5, 5), 1, 0),
              ((3, 5, 5), 1, 0), ((4, 5, 5), 1, 0), ((1, 1, 1), 1, 0)]


def test_mapping_of_dou2017_layout():
    m = output_mapping(DOU_LAYERS)
    assert m.stride_zyx == (1, 2, 2)
    assert m.receptive_field_zyx == (10, 30, 30)
    assert m.rf_start_zyx == (0, 0, 0)
    assert m.offset_zyx == (4.5, 14.5, 14.5)  # centre of an even receptive field
    p = output_mapping(DOU_LAYERS, center="patch")
    assert p.offset_zyx == (5.0, 15.0, 15.0)  # start + rf // 2: the store's patch centre
    assert p.rf_start_zyx == (0, 0, 0)
    # One training patch gives one cell; a scan-sized input gives the FCN's score grid.
    assert output_shape(DOU_LAYERS, (10, 30, 30)) == (1, 1, 1)
    assert output_shape(DOU_LAYERS, (20, 64, 65)) == (11, 18, 18)
    np.testing.assert_array_equal(p.cells_to_voxels([[0, 0, 0], [2, 3, 1]]),
                                  [[5, 15, 15], [7, 21, 17]])
    np.testing.assert_array_equal(p.voxels_to_cells([[7, 21, 17]]), [[2, 3, 1]])


def test_mapping_matches_the_fcn_module_constants():
    m = output_mapping(fcn.layer_specs(), center="patch")
    assert m.stride_zyx == tuple(fcn.STRIDE_ZYX)
    assert m.receptive_field_zyx == tuple(fcn.RECEPTIVE_FIELD_ZYX)
    assert m.offset_zyx == tuple(float(o) for o in fcn.OFFSET_ZYX)


def test_mapping_same_padding_dilation_and_explicit_pads():
    # Two SAME 3x3x3 convolutions, stride 1: cells sit on voxels, RF 5, starts at -2.
    m = output_mapping([((3, 3, 3), 1, "SAME"), ((3, 3, 3), 1, "SAME")])
    assert (m.stride_zyx, m.offset_zyx, m.receptive_field_zyx, m.rf_start_zyx) == \
        ((1, 1, 1), (0.0, 0.0, 0.0), (5, 5, 5), (-2, -2, -2))
    # Dilation 2 on a 3-kernel spans 5 voxels.
    d = output_mapping([(3, 1, "VALID", 2)], ndim=1)
    assert (d.receptive_field_zyx, d.offset_zyx) == ((5,), (2.0,))
    # Explicit (lo, hi) pads, per axis, then a stride-2 pool: start moves by -lo.
    e = output_mapping([{"kernel": (3, 3), "padding": [(1, 1), (2, 0)]},
                        {"kernel": 2, "stride": 2}])
    assert e.rf_start_zyx == (-1, -2) and e.receptive_field_zyx == (4, 4)
    assert e.stride_zyx == (2, 2) and e.offset_zyx == (0.5, -0.5)


def test_same_stride_two_needs_the_input_size_when_it_matters():
    # SAME, kernel 3, stride 2: XLA pads 0 low on even sizes and 1 low on odd sizes.
    with pytest.raises(ValueError, match="input_shape"):
        output_mapping([(3, 2, "SAME")], ndim=1)
    assert output_mapping([(3, 2, "SAME")], input_shape=(8,)).rf_start_zyx == (0,)
    assert output_mapping([(3, 2, "SAME")], input_shape=(9,)).rf_start_zyx == (-1,)
    # Kernel 2 stride 2 pads nothing low whatever the size: no input size needed.
    assert output_mapping([(2, 2, "SAME")], ndim=1).rf_start_zyx == (0,)
    # Checked against XLA itself: the mapping's padding agrees with jax's reduce_window.
    for n in (8, 9):
        x = jnp.arange(n, dtype=jnp.float32)[None, :, None]
        y = nn.max_pool(x, (3,), strides=(2,), padding="SAME")[0, :, 0]
        start = output_mapping([(3, 2, "SAME")], input_shape=(n,)).rf_start_zyx[0]
        want = [max(v for v in range(start + 2 * j, start + 2 * j + 3) if 0 <= v < n)
                for j in range(len(y))]
        np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("layers, match", [
    ([((3, 3), 1, "FULL")], "padding"),
    ([((3, 3, 3), 0, 0)], ">= 1"),
    ([((3, 3), 1, 0), ((3, 3, 3), 1, 0)], "kernel"),
    ([(3,)], "expected"),
])
def test_bad_layer_lists_are_rejected(layers, match):
    with pytest.raises(ValueError, match=match):
        output_mapping(layers)


def test_mapping_json_round_trip_and_shift():
    m = output_mapping(DOU_LAYERS, center="patch")
    assert OutputMapping.from_json(m.to_json()) == m
    s = m.shifted((-5, -15, -15))
    assert s.offset_zyx == (0.0, 0.0, 0.0) and s.rf_start_zyx == (-5, -15, -15)
    # The default rf_start fits both centre conventions.
    assert OutputMapping((1, 2, 2), (5, 15, 15), (10, 30, 30)).rf_start_zyx == (0, 0, 0)
    assert OutputMapping((1, 2, 2), (4.5, 14.5, 14.5), (10, 30, 30)).rf_start_zyx == (0, 0, 0)
    with pytest.raises(ValueError, match="lacks"):
        OutputMapping.from_json({"stride_zyx": [1, 1, 1]})


# ---------------------------------------------------------------------------
# Real flax networks: impulse response == computed mapping.
# ---------------------------------------------------------------------------


class SmallNet(nn.Module):
    """conv (3,3,3) -> max-pool (1,2,2)/2 -> conv (2,3,3) -> 1x1x1 conv, all via layers.Conv."""

    padding: str = "VALID"
    channels: int = 1
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        h = nn.relu(Conv(3, (3, 3, 3), padding=self.padding, impl=self.impl)(x))
        h = nn.max_pool(h, (1, 2, 2), strides=(1, 2, 2), padding=self.padding)
        h = nn.relu(Conv(3, (2, 3, 3), padding=self.padding, impl=self.impl)(h))
        h = Conv(self.channels, (1, 1, 1), impl=self.impl)(h)
        return h[..., 0] if self.channels == 1 else h


def small_layers(padding):
    return [((3, 3, 3), 1, padding), ((1, 2, 2), (1, 2, 2), padding), ((2, 3, 3), 1, padding)]


def _params(net, seed=None):
    """Parameters drawn in numpy from the shapes ``init`` gives (compiling ``init`` costs
    ~10 s on this CPU, far more than the tests themselves). ``seed=None``: all-ones
    kernels and zero biases, so an impulse reaches exactly the cells whose receptive field
    holds it (sums of non-negative terms; max-pool passes the positive value)."""
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 4, 8, 8, 1)))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if seed is None:
            return np.zeros(s.shape, s.dtype) if "bias" in str(path[-1]) else np.ones(s.shape,
                                                                                      s.dtype)
        return (0.4 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_impulse_response_matches_mapping(padding):
    shape = (5, 11, 10)
    net = SmallNet(padding, impl="xla")
    params = _params(net)
    mapping = output_mapping(small_layers(padding), input_shape=shape)
    impulses = np.eye(int(np.prod(shape)), dtype=np.float32).reshape(-1, *shape, 1)
    out = np.asarray(jax.jit(net.apply)(params, impulses))  # (n_voxels, D', H', W')
    assert out.shape[1:] == output_shape(small_layers(padding), shape)
    start = np.asarray(mapping.rf_start_zyx)
    rf = np.asarray(mapping.receptive_field_zyx)
    stride = np.asarray(mapping.stride_zyx)
    cells = np.stack(np.meshgrid(*[np.arange(s) for s in out.shape[1:]], indexing="ij"), -1)
    lo = start + stride * cells  # (D', H', W', 3) first voxel of each receptive field
    for v, voxel in enumerate(np.ndindex(*shape)):
        want = np.all((lo <= voxel) & (np.asarray(voxel) < lo + rf), axis=-1)
        np.testing.assert_array_equal(out[v] > 0, want, err_msg=f"impulse at {voxel}")


# ---------------------------------------------------------------------------
# Whole-volume scoring.
# ---------------------------------------------------------------------------


def _net_fn(padding, channels=1, seed=0, impl="xla"):
    net = SmallNet(padding, channels, impl)
    return net.apply, _params(net, seed)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_tiled_scoring_equals_untiled_exactly(padding):
    # One fixed convolution formulation: "auto" may pick another one per input shape,
    # which changes float summation order (tiles then agree to rounding, not bits).
    apply, params = _net_fn(padding, impl="xla")
    mapping = output_mapping(small_layers(padding))
    vol = np.random.default_rng(1).random((9, 23, 26)).astype(np.float32)
    full, m_full = score_volume(apply, vol, mapping, variables=params)
    # Tile sizes that divide the grid unevenly on every axis; batch 2 with a short batch.
    tiled, m_tiled = score_volume(apply, vol, mapping, tile_zyx=(4, 10, 12), batch=2,
                                  variables=params)
    assert m_full == m_tiled
    np.testing.assert_array_equal(tiled, full)
    if padding == "VALID":
        # A VALID net's tiles all have one shape (one compilation), border tiles included.
        assert full.shape == (9, 12, 14)
        # A function that accepts one input shape only (an exported tile-sized predictor).
        fixed, m_fixed = score_volume(apply, vol, mapping, input_zyx=(5, 14, 17),
                                      variables=params)
        assert m_fixed == m_full
        np.testing.assert_array_equal(fixed, full)
        # Several per-cell axes (anchor outputs: (B, D', H', W', anchors, values)).
        def anchors(v, x):
            return jnp.stack([apply(v, x), -apply(v, x)], -1)[..., None]

        multi, _ = score_volume(anchors, vol, mapping, tile_zyx=(4, 10, 12), variables=params)
        np.testing.assert_array_equal(multi, np.stack([full, -full], -1)[..., None])
        # A function that cannot be traced (returns numpy, like a loaded export), run as is.
        jitted = jax.jit(apply)

        def as_numpy(x):
            return np.asarray(jitted(params, x))

        for tile in (None, (4, 10, 12)):
            plain, _ = score_volume(as_numpy, vol, mapping, tile_zyx=tile, jit=False)
            np.testing.assert_array_equal(plain, full)
        unpadded, m_unpadded = score_volume(as_numpy, vol, mapping, pad=False, jit=False)
        np.testing.assert_array_equal(unpadded, np.asarray(jitted(params, vol[None, ..., None]))[0])
        assert m_unpadded == mapping
        with pytest.raises(ValueError, match="cannot be traced"):
            score_volume(as_numpy, vol, mapping, tile_zyx=4, pad=False, jit=False)
    else:
        with pytest.raises(ValueError, match="without padding"):
            score_volume(apply, vol, mapping, input_zyx=(5, 14, 17), variables=params)


def test_padding_covers_every_voxel_and_equals_patchwise_scoring():
    """Fully-convolutional scores == the network applied to the patch of its receptive
    field centred on the mapped voxel (the store's read_patch convention, zero outside)."""
    apply, params = _net_fn("VALID", channels=2, seed=3, impl="auto")  # the default path
    mapping = output_mapping(small_layers("VALID"), center="patch")  # rf (4, 8, 8)
    vol = np.random.default_rng(2).random((7, 15, 12)).astype(np.float32)
    scores, m = score_volume(apply, vol, mapping, variables=params)
    assert scores.shape[-1] == 2  # channels kept
    # Cell 0 at voxel 0, last cells within half a stride of the last voxel.
    np.testing.assert_array_equal(m.cells_to_voxels([0, 0, 0]), [0, 0, 0])
    last = m.cells_to_voxels(np.asarray(scores.shape[:3]) - 1)
    assert np.all(last >= np.asarray(vol.shape) - 1 - np.asarray(m.stride_zyx) / 2)
    assert np.all(last <= np.asarray(vol.shape) - 1 + np.asarray(m.stride_zyx) / 2)
    rf = np.asarray(m.receptive_field_zyx)
    padded = np.pad(vol, [(int(r), int(r)) for r in rf])
    picks = [(0, 0, 0), (6, 7, 5), (3, 2, 4), tuple(np.asarray(scores.shape[:3]) - 1)]
    patches = []
    for cell in picks:
        centre = m.cells_to_voxels(cell).astype(int)
        start = centre - rf // 2 + rf
        patches.append(padded[tuple(slice(a, a + r) for a, r in zip(start, rf))])
    direct = np.asarray(apply(params, np.stack(patches)[..., None]))[:, 0, 0, 0]
    np.testing.assert_allclose(np.stack([scores[c] for c in picks]), direct, rtol=1e-5,
                               atol=1e-6)


def test_score_volume_small_volume_and_errors():
    apply, params = _net_fn("VALID")
    # A volume smaller than the receptive field still gets cells covering every voxel.
    tiny, m = score_volume(apply, np.ones((1, 2, 3), np.float32), output_mapping(
        small_layers("VALID")), variables=params)
    assert tiny.shape == (1, 2, 2)
    centres = m.cells_to_voxels(np.argwhere(np.ones(tiny.shape)))
    for voxel in np.ndindex(1, 2, 3):
        assert np.all(np.abs(centres - voxel) <= np.asarray(m.stride_zyx) / 2, axis=1).any()
    vol = np.zeros((6, 12, 12), np.float32)
    with pytest.raises(ValueError, match="receptive_field"):
        score_volume(apply, vol, OutputMapping((1, 2, 2), (0, 0, 0)), tile_zyx=4,
                     variables=params)
    with pytest.raises(ValueError, match="axes"):
        score_volume(apply, vol[0], output_mapping(small_layers("VALID")), variables=params)
    # A mapping claiming stride 1 where the network has stride 2: caught, not mis-stitched.
    wrong = OutputMapping((1, 1, 1), (1.5, 3.5, 3.5), (4, 8, 8))
    with pytest.raises(ValueError, match="does not match|expects"):
        score_volume(apply, vol, wrong, tile_zyx=(3, 6, 6), variables=params)


def test_foreground_probability_is_softmax_channel():
    fn = foreground_probability(lambda x: jnp.concatenate([x, 2 * x], axis=-1))
    x = jnp.asarray([[[[[0.5]]]]])
    np.testing.assert_allclose(fn(x), jax.nn.softmax(jnp.asarray([0.5, 1.0]))[1][None, None,
                                                                                  None, None])


# ---------------------------------------------------------------------------
# 3D NMS.
# ---------------------------------------------------------------------------


def _blob(shape, centre, amplitude, sigma=1.5):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return amplitude * np.exp(-((grid - centre) ** 2).sum(-1) / (2 * sigma ** 2))


def test_peaks_found_at_known_centres_in_score_order():
    shape = (12, 20, 20)
    centres = [(3, 4, 5), (8, 15, 12), (6, 5, 16)]
    amps = [0.9, 0.95, 0.7]
    scores = sum(_blob(shape, c, a) for c, a in zip(centres, amps))
    scores += 0.02 * np.random.default_rng(0).random(shape)  # texture below the threshold
    cells, vals = peaks_3d(scores.astype(np.float32), 0.5, 3)
    np.testing.assert_array_equal(cells, [centres[1], centres[0], centres[2]])
    assert vals.dtype == np.float32 and np.all(np.diff(vals) <= 0)
    # The threshold is inclusive; a higher one drops the weakest peak; max_peaks caps.
    assert len(peaks_3d(scores, float(vals[2]), 3)[0]) == 3
    assert len(peaks_3d(scores, float(vals[2]) + 1e-6, 3)[0]) == 2
    np.testing.assert_array_equal(peaks_3d(scores, 0.5, 3, max_peaks=1)[0], [centres[1]])
    assert peaks_3d(scores, 2.0, 3)[0].shape == (0, 3)


def test_plateau_is_one_peak_at_its_centre():
    s = np.zeros((9, 9, 9), np.float32)
    s[2:5, 3:6, 4:7] = 1.0  # saturated 3x3x3 plateau
    s[7, 1, 1] = 0.8
    cells, vals = peaks_3d(s, 0.5, 1.5)
    np.testing.assert_array_equal(cells, [[3, 4, 5], [7, 1, 1]])
    np.testing.assert_allclose(vals, [1.0, 0.8], rtol=1e-6)
    # An even plateau: the member nearest the centroid, lowest index on ties.
    e = np.zeros((6, 6, 6), np.float32)
    e[1:3, 2:4, 2:4] = 0.9
    np.testing.assert_array_equal(peaks_3d(e, 0.5, 2)[0], [[1, 2, 2]])


def test_ties_and_border_peaks():
    s = np.zeros((6, 10, 10), np.float32)
    s[0, 0, 0] = 0.9          # corner
    s[5, 9, 9] = 0.9          # opposite corner, equal score
    s[5, 9, 6] = 0.9          # equal score, 3 cells from the corner: a tie within radius
    s[2, 5, 5] = 0.6
    cells, _ = peaks_3d(s, 0.5, 3)
    # Ties go to the lower flat index; (5, 9, 9) lies exactly at the radius -> suppressed.
    np.testing.assert_array_equal(cells, [[0, 0, 0], [5, 9, 6], [2, 5, 5]])
    cells, _ = peaks_3d(s, 0.5, 2.9)  # radius below 3: both survive
    assert len(cells) == 4


def test_anisotropic_radius_and_zero_radius():
    s = np.zeros((8, 8, 8), np.float32)
    s[2, 4, 4] = 1.0
    s[4, 4, 4] = 0.9  # 2 cells away in z
    s[2, 4, 7] = 0.8  # 3 cells away in x
    cells, _ = peaks_3d(s, 0.5, (1, 3, 3))
    np.testing.assert_array_equal(cells, [[2, 4, 4], [4, 4, 4]])
    cells, _ = peaks_3d(s, 0.5, (2, 2, 2))
    np.testing.assert_array_equal(cells, [[2, 4, 4], [2, 4, 7]])
    # Radius 0: every cell at or above the threshold.
    assert len(peaks_3d(s, 0.5, 0)[0]) == 3
    # Adjacent maxima along an axis with radius < 1 are separate peaks, not a plateau.
    t = np.zeros((4, 5, 5), np.float32)
    t[1, 2, 2] = t[2, 2, 2] = 1.0
    np.testing.assert_array_equal(peaks_3d(t, 0.5, (0.5, 2, 2))[0], [[1, 2, 2], [2, 2, 2]])
    np.testing.assert_array_equal(peaks_3d(t, 0.5, (1, 2, 2))[0], [[1, 2, 2]])


def test_peaks_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        peaks_3d(np.full((3, 3, 3), np.nan), 0.5, 1)
    with pytest.raises(ValueError, match="min_distance"):
        peaks_3d(np.zeros((3, 3, 3)), 0.5, (1, 1))
    with pytest.raises(ValueError, match=">= 0"):
        peaks_3d(np.zeros((3, 3, 3)), 0.5, -1)


def test_nms_points_greedy():
    pts = np.array([[0, 0, 0], [3, 0, 0], [6, 0, 0], [0, 10, 0.0]])
    keep = nms_points(pts, [0.9, 1.0, 0.8, 0.5], radius=4)
    # 1.0 at x=3 suppresses both neighbours; the far point survives.
    np.testing.assert_array_equal(keep, [1, 3])
    np.testing.assert_array_equal(nms_points(pts, [0.9, 1.0, 0.8, 0.5], radius=(2, 2, 2)),
                                  [1, 0, 2, 3])


# ---------------------------------------------------------------------------
# Candidates: cells -> voxels -> world mm.
# ---------------------------------------------------------------------------


def test_candidates_world_coordinates_with_rotated_geometry():
    # A geometry with anisotropic spacing and a non-identity direction (x, y swapped and
    # z flipped), so any axis-order slip shows.
    direction = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]], np.float64)
    geom = Geometry(np.array([0.7, 0.8, 2.0]), np.array([-100.0, 20.0, 300.0]), direction)
    mapping = OutputMapping((1, 2, 2), (5, 15, 15), (10, 30, 30)).shifted((-5, -15, -15))
    scores = np.zeros((20, 30, 30), np.float32)
    scores[4, 10, 7] = 0.95
    scores[15, 25, 3] = 0.9
    scores[15, 25, 4] = 0.88  # 1.4 mm from the peak above: suppressed by a 3 mm radius
    c = candidates_from_scores(scores, mapping, geom, threshold=0.85, nms_radius_mm=3.0)
    np.testing.assert_array_equal(c.cells, [[4, 10, 7], [15, 25, 3]])
    np.testing.assert_array_equal(c.voxel_zyx, [[4, 20, 14], [15, 50, 6]])
    np.testing.assert_allclose(world_to_voxel(c.world_xyz, geom), c.voxel_zyx, atol=1e-9)
    # Voxel (z=4, y=20, x=14): index (14, 20, 4) * spacing = (9.8, 16, 8) -> direction.
    np.testing.assert_allclose(c.world_xyz[0], [-100 + 16, 20 + 9.8, 300 - 8])
    np.testing.assert_allclose(c.score, [0.95, 0.9], rtol=1e-6)
    np.testing.assert_allclose(nms_radius_cells(3.0, mapping, geom.spacing_zyx),
                               3.0 / np.array([2.0, 1.6, 1.4]))
    clipped = candidates_from_scores(scores, mapping, geom, threshold=0.85, nms_radius_mm=3.0,
                                     shape_zyx=(10, 40, 40))
    np.testing.assert_array_equal(clipped.voxel_zyx[1], [9, 39, 6])
    with pytest.raises(ValueError, match="channel"):
        candidates_from_scores(scores[..., None], mapping, geom, threshold=0.5, nms_radius_mm=1)


def test_dou2017_fcn_score_cells_equal_patch_classification():
    """On the dou2017 screening FCN (narrow, random weights): each score cell equals the
    network's output on the 10x30x30 training patch the store would cut around the cell's
    mapped voxel (start = centre - size // 2, zeros outside), tiled or not."""
    net = fcn.Dou2017FCN(features=(3, 3, 4, 4), init_std=0.3, conv_impl="xla")
    variables = _params(net, seed=5)

    def fn(v, x):  # (variables, image) -> nodule probability, as the engine's predict
        return foreground_probability(functools.partial(net.apply, v))(x)

    mapping = output_mapping(fcn.layer_specs(), center="patch")
    vol = np.random.default_rng(4).random((11, 33, 31)).astype(np.float32)
    scores, m = score_volume(fn, vol, mapping, variables=variables)
    tiled, _ = score_volume(fn, vol, mapping, tile_zyx=(6, 20, 40), variables=variables)
    np.testing.assert_allclose(tiled, scores, rtol=1e-5, atol=1e-6)
    size = np.asarray(fcn.PATCH_SIZE_ZYX)
    padded = np.pad(vol, [(int(s), int(s)) for s in size])
    picks = [(0, 0, 0), (10, 16, 15), (5, 7, 3), (10, 0, 15)]
    patches = []
    for cell in picks:
        centre = m.cells_to_voxels(cell)
        assert np.all(centre == np.round(centre))  # the patch convention: integer voxels
        start = centre.astype(int) - size // 2 + size
        patches.append(padded[tuple(slice(a, a + s) for a, s in zip(start, size))])
    direct = np.asarray(fn(variables, np.stack(patches)[..., None]))[:, 0, 0, 0]
    np.testing.assert_allclose([scores[c] for c in picks], direct, rtol=1e-5, atol=1e-6)
    assert scores.shape == (11, 17, 16)


def test_refine_peaks_moves_a_rim_peak_to_the_plateau_centre():
    from lungjax.tasks.screening import refine_peaks

    w = np.zeros((9, 9, 9))
    w[3:6, 3:6, 3:6] = 1.0  # a plateau centred at (4, 4, 4)
    w[5, 5, 5] = 1.01       # whose maximum sits on its rim
    out = refine_peaks(w, np.array([[5, 5, 5]]), 4.0)  # the window holds the plateau
    np.testing.assert_allclose(out[0], [4.0, 4.0, 4.0], atol=0.02)
    part = refine_peaks(w, np.array([[5, 5, 5]]), 2.0)[0]  # part of it: pulled inwards
    assert np.all((part > 4.0) & (part < 4.8))
    # Radius 0 on an axis leaves that axis alone; an empty neighbourhood leaves the peak.
    np.testing.assert_allclose(refine_peaks(w, np.array([[5, 5, 5]]), (0, 2, 2))[0][0], 5.0)
    np.testing.assert_allclose(refine_peaks(np.zeros((5, 5, 5)), np.array([[1, 2, 3]]), 1.0),
                               [[1, 2, 3]])
