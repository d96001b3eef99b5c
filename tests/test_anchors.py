"""xie2018 detector pieces: sphere IoU, anchors, targets, OHEM loss, decoding, NMS."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.data.coords import Geometry
from lungjax.registry import TASKS
from lungjax.tasks.anchors import (AnchorConfig, AnchorDetectionTask, anchor_table,
                                   assign_targets, cube_iou, decode, detection_loss, encode,
                                   flatten_outputs, ohem_mask, sphere_intersection, sphere_iou)
from lungjax.tasks.anchors_decode import (Detections, decode_dense, detect_store, detect_volume,
                                          select_candidates, soft_nms, sphere_nms, to_marks)

PI = math.pi


# ---------------------------------------------------------------- overlap
def test_sphere_intersection_closed_forms():
    o = np.zeros(3)
    # Equal radii 1 at distance 1: lens = pi (2 - 1)^2 (1 + 4 - 0) / 12 = 5 pi / 12.
    assert sphere_intersection(o, 2.0, [1.0, 0, 0], 2.0) == pytest.approx(5 * PI / 12)
    # IoU = (5/12) / (8/3 - 5/12) = 5 / 27.
    assert sphere_iou(o, 2.0, [0, 1.0, 0], 2.0) == pytest.approx(5 / 27)
    # r = 3 and 2 at distance 4: pi (5 - 4)^2 (16 + 40 - 3) / 48 = 53 pi / 48.
    assert sphere_intersection(o, 6.0, [0, 0, 4.0], 4.0) == pytest.approx(53 * PI / 48)
    # Contained (radius 1 inside radius 2, off-centre): the small ball; IoU = (1/2)^3.
    assert sphere_intersection(o, 4.0, [0.5, 0, 0], 2.0) == pytest.approx(4 * PI / 3)
    assert sphere_iou(o, 4.0, [0.5, 0, 0], 2.0) == pytest.approx(1 / 8)
    # Identical, touching, apart.
    assert sphere_iou([1.0, 2, 3], 5.0, [1.0, 2, 3], 5.0) == pytest.approx(1.0)
    assert sphere_iou(o, 2.0, [2.0, 0, 0], 2.0) == 0.0
    assert sphere_iou(o, 2.0, [0, 0, 7.0], 3.0) == 0.0


def test_sphere_intersection_is_continuous_and_matches_a_voxel_count():
    r1, r2 = 3.0, 2.0
    # The lens formula meets the contained case at t = r1 - r2 and 0 at t = r1 + r2.
    eps = 1e-7
    assert sphere_intersection(np.zeros(3), 2 * r1, [1 + eps, 0, 0], 2 * r2) == \
        pytest.approx(4 / 3 * PI * r2 ** 3, rel=1e-5)
    assert sphere_intersection(np.zeros(3), 2 * r1, [5 - eps, 0, 0], 2 * r2) == \
        pytest.approx(0.0, abs=1e-5)
    # Independent check: count points of a fine grid inside both balls.
    h = 0.04
    g = np.arange(-3.0, 6.0, h) + h / 2
    x, y, z = np.meshgrid(g, np.arange(-3.0, 3.0, h) + h / 2, np.arange(-3.0, 3.0, h) + h / 2,
                          indexing="ij")
    both = (x ** 2 + y ** 2 + z ** 2 <= r1 ** 2) & ((x - 2.5) ** 2 + y ** 2 + z ** 2 <= r2 ** 2)
    counted = both.sum() * h ** 3
    assert sphere_intersection(np.zeros(3), 2 * r1, [2.5, 0, 0], 2 * r2) == \
        pytest.approx(counted, rel=0.01)


def test_iou_broadcasts_and_jax_agrees_with_numpy():
    c1 = np.array([[0.0, 0, 0], [1, 1, 1]])
    c2 = np.array([[0.5, 0, 0], [1, 1, 4]])
    d1, d2 = np.array([4.0, 6.0]), np.array([3.0, 5.0])
    np_iou = sphere_iou(c1, d1, c2, d2)
    j_iou = sphere_iou(jnp.asarray(c1), jnp.asarray(d1), jnp.asarray(c2), jnp.asarray(d2))
    assert isinstance(np_iou, np.ndarray) and isinstance(j_iou, jax.Array)
    np.testing.assert_allclose(np.asarray(j_iou), np_iou, rtol=1e-5)
    assert sphere_iou(c1[:, None], d1[:, None], c2[None], d2[None]).shape == (2, 2)


def test_cube_iou_hand_values():
    # Cubes of side 2 shifted by 1 along x: 1*2*2 / (8 + 8 - 4) = 1/3.
    assert cube_iou(np.zeros(3), 2.0, [1.0, 0, 0], 2.0) == pytest.approx(1 / 3)
    # Side 2 inside side 4: 8 / 64.
    assert cube_iou(np.zeros(3), 4.0, [0.5, 0.5, 0], 2.0) == pytest.approx(1 / 8)
    assert cube_iou(np.zeros(3), 2.0, [2.0, 0, 0], 2.0) == 0.0


# ---------------------------------------------------------------- coding
def test_encode_decode_hand_values_and_round_trip():
    a, ad = np.array([10.0, 10, 10]), 5.0
    t = np.asarray(encode(jnp.asarray(a), ad, jnp.asarray([11.0, 9, 10]), 10.0))
    np.testing.assert_allclose(t, [0.2, -0.2, 0.0, math.log(2)], rtol=1e-6)
    c, d = decode(jnp.asarray(a), ad, jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(c), [11, 9, 10], rtol=1e-6)
    assert float(d) == pytest.approx(10.0, rel=1e-6)


def test_anchor_table_order_and_centres():
    cfg = AnchorConfig(heads=((2, (3.0, 5.0)), (4, (7.0,))))
    c, d = anchor_table(cfg, (8, 8, 8))
    assert c.shape == (4 ** 3 * 2 + 2 ** 3, 3) and d.shape == (136,)
    # Head 0: cell (0, 0, 0) at (s - 1) / 2 = 0.5 with both diameters, then cell (0, 0, 1).
    np.testing.assert_array_equal(c[:3], [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 2.5]])
    np.testing.assert_array_equal(d[:3], [3, 5, 3])
    # Head 1 starts at 128: cell (0, 0, 0) at 1.5; last cell (1, 1, 1) at 5.5.
    np.testing.assert_array_equal(c[128], [1.5, 1.5, 1.5])
    np.testing.assert_array_equal(c[-1], [5.5, 5.5, 5.5])
    assert d[128] == 7
    cj, dj = anchor_table(cfg, (8, 8, 8), xp=jnp)
    np.testing.assert_array_equal(np.asarray(cj), c)
    np.testing.assert_array_equal(np.asarray(dj), d)
    # Same as the screening module's index mapping.
    np.testing.assert_array_equal(cfg.head_mapping(1).cells_to_voxels([1, 0, 1]), [5.5, 1.5, 5.5])
    # A 0.5 mm grid: a 3 mm anchor spans 6 voxels.
    assert anchor_table(AnchorConfig(heads=cfg.heads, voxel_mm=0.5), (8, 8, 8))[1][0] == 6
    with pytest.raises(ValueError, match="multiple of head stride 4"):
        anchor_table(cfg, (8, 8, 6))


# ---------------------------------------------------------------- targets
CFG = AnchorConfig(heads=((2, (3.0, 5.0)), (4, (10.0,))))
ANC_C, ANC_D = anchor_table(CFG, (16, 16, 16))
# One compiled program per (nodule count, config) instead of hundreds of eager ops.
_assign = jax.jit(assign_targets, static_argnums=(4,))


def _idx(centre, diam):
    """Row of the anchor with this centre and diameter."""
    hit = np.flatnonzero(np.all(ANC_C == np.asarray(centre, np.float32), 1) & (ANC_D == diam))
    assert len(hit) == 1
    return int(hit[0])


def test_no_nodule_gives_all_negatives():
    for nod_c, nod_d in ((np.zeros((0, 3)), np.zeros((0,))),
                         (np.zeros((2, 3)), np.zeros((2,)))):  # two padding rows
        lab, tgt, matched, mx = _assign(ANC_C, ANC_D, nod_c, nod_d, CFG)
        assert np.all(np.asarray(lab) == 0) and np.all(np.asarray(tgt) == 0)
        assert np.all(np.asarray(matched) == -1) and np.all(np.asarray(mx) == 0)


def test_single_nodule_positive_ignored_and_negative():
    # A 5 mm nodule exactly on the stride-2 anchor at (6.5, 6.5, 6.5).
    lab, tgt, matched, mx = (np.asarray(v) for v in _assign(
        ANC_C, ANC_D, np.array([[6.5, 6.5, 6.5]]), np.array([5.0]), CFG))
    i = _idx([6.5, 6.5, 6.5], 5.0)
    assert lab[i] == 1 and matched[i] == 0 and mx[i] == pytest.approx(1.0)
    np.testing.assert_allclose(tgt[i], 0.0, atol=1e-6)
    # The 5 mm anchor of the next cell (2 mm away): lens pi 3^2 (4 + 20) / 24 = 9 pi,
    # IoU = 9 / (2 * 125 / 6 - 9) = 0.2755: between 0.001 and 0.3 -> ignored.
    j = _idx([6.5, 6.5, 8.5], 5.0)
    assert mx[j] == pytest.approx(9 / (250 / 6 - 9), rel=1e-5) and lab[j] == -1
    # Far away: negative.
    assert lab[_idx([0.5, 0.5, 0.5], 5.0)] == 0
    # Every positive decodes onto the nodule.
    pos = np.flatnonzero(lab == 1)
    c, d = decode(jnp.asarray(ANC_C[pos]), jnp.asarray(ANC_D[pos]), jnp.asarray(tgt[pos]))
    np.testing.assert_allclose(np.asarray(c), np.tile([6.5, 6.5, 6.5], (len(pos), 1)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(d), 5.0, rtol=1e-5)
    assert np.all(mx[pos] > 0.3)
    assert np.all((lab == -1) == ((mx >= 0.001) & (mx <= 0.3)))


def test_force_best_gives_small_off_grid_nodules_one_positive():
    # A 3 mm nodule at a cell corner: the eight nearest cells are sqrt(3) mm away; their
    # 3 mm anchors have IoU 0.130 and their 5 mm anchors 0.157 (< 0.3). force_best labels
    # exactly one: the 5 mm anchor of the first of the eight tied cells.
    nod = [[7.5, 7.5, 7.5]]
    assert sphere_iou(np.zeros(3), 3.0, np.ones(3), 3.0) == pytest.approx(0.1301, abs=1e-4)
    assert sphere_iou(np.zeros(3), 5.0, np.ones(3), 3.0) == pytest.approx(0.1565, abs=1e-4)
    lab = np.asarray(_assign(ANC_C, ANC_D, np.array(nod), np.array([3.0]), CFG)[0])
    np.testing.assert_array_equal(np.flatnonzero(lab == 1), [_idx([6.5, 6.5, 6.5], 5.0)])
    cfg = AnchorConfig(heads=CFG.heads, force_best=False)
    lab = np.asarray(_assign(ANC_C, ANC_D, np.array(nod), np.array([3.0]), cfg)[0])
    assert np.sum(lab == 1) == 0


def test_nodule_at_the_border_and_outside():
    # Centre half a voxel outside the patch: anchors inside still overlap it.
    lab, tgt, _, mx = (np.asarray(v) for v in _assign(
        ANC_C, ANC_D, np.array([[-0.5, 8.5, 8.5]]), np.array([5.0]), CFG))
    pos = np.flatnonzero(lab == 1)
    assert len(pos) >= 1 and np.all(ANC_C[pos, 0] < 3)
    c, _ = decode(jnp.asarray(ANC_C[pos]), jnp.asarray(ANC_D[pos]), jnp.asarray(tgt[pos]))
    np.testing.assert_allclose(np.asarray(c), np.tile([-0.5, 8.5, 8.5], (len(pos), 1)), atol=1e-5)
    # Entirely outside (no overlap with any anchor): nothing positive, all negative.
    lab = np.asarray(_assign(ANC_C, ANC_D, np.array([[-30.0, 8, 8]]), np.array([5.0]), CFG)[0])
    assert np.all(lab == 0)


def test_two_nodules_match_their_own_anchors():
    nod_c = np.array([[4.5, 4.5, 4.5], [11.5, 11.5, 9.5]])
    nod_d = np.array([3.0, 10.0])
    lab, tgt, matched, _ = (np.asarray(v) for v in _assign(ANC_C, ANC_D, nod_c, nod_d, CFG))
    for m in range(2):
        pos = np.flatnonzero((lab == 1) & (matched == m))
        assert len(pos) >= 1
        c, d = decode(jnp.asarray(ANC_C[pos]), jnp.asarray(ANC_D[pos]), jnp.asarray(tgt[pos]))
        np.testing.assert_allclose(np.asarray(c), np.tile(nod_c[m], (len(pos), 1)), atol=1e-5)
        np.testing.assert_allclose(np.asarray(d), nod_d[m], rtol=1e-5)
    # The 10 mm nodule's exact 10 mm anchor (stride 4, cell (2, 2, 2) at 9.5) is one.
    assert lab[_idx([9.5, 9.5, 9.5], 10.0)] in (1, -1)
    # Padding rows change nothing.
    padded = _assign(ANC_C, ANC_D, np.vstack([nod_c, np.zeros((2, 3))]), np.r_[nod_d, 0, 0],
                     CFG)
    np.testing.assert_array_equal(np.asarray(padded[0]), lab)
    np.testing.assert_allclose(np.asarray(padded[1]), tgt, atol=1e-6)


def test_excluded_findings_turn_negatives_into_ignored():
    lab0 = np.asarray(_assign(ANC_C, ANC_D, np.array([[4.5, 4.5, 4.5]]), np.array([5.0]), CFG)[0])
    lab = np.asarray(_assign(ANC_C, ANC_D, np.array([[4.5, 4.5, 4.5]]), np.array([5.0]), CFG,
                             np.array([[12.5, 12.5, 12.5]]), np.array([4.0]))[0])
    assert lab[_idx([12.5, 12.5, 12.5], 5.0)] == -1 and lab0[_idx([12.5, 12.5, 12.5], 5.0)] == 0
    np.testing.assert_array_equal(lab == 1, lab0 == 1)  # positives untouched


# ---------------------------------------------------------------- loss
def test_ohem_keeps_the_k_highest_scoring_negatives():
    ohem = jax.jit(ohem_mask, static_argnums=2)
    labels = jnp.array([[0, 0, 1, 0, -1, 0, 0]])
    logits = jnp.array([[5.0, 1, 9, 3, 10, 2, 4]])
    np.testing.assert_array_equal(np.asarray(ohem(logits, labels, 2))[0],
                                  [1, 0, 0, 0, 0, 0, 1])
    # k above the number of negatives: all of them; ties: lower index first.
    np.testing.assert_array_equal(np.asarray(ohem(logits, labels, 50))[0],
                                  [1, 1, 0, 1, 0, 1, 1])
    tied = ohem(jnp.zeros((1, 4)), jnp.zeros((1, 4), jnp.int32), 2)
    np.testing.assert_array_equal(np.asarray(tied)[0], [1, 1, 0, 0])


def test_detection_loss_hand_value_and_gradient_support():
    cfg = AnchorConfig(heads=((2, (5.0,)),), ohem_k=1)
    out = jnp.zeros((1, 4, 5)).at[0, 0, 1:].set(jnp.array([0.5, 0.0, 0.0, 2.0]))
    labels = jnp.array([[1, 0, 0, -1]])
    targets = jnp.zeros((1, 4, 4))
    loss, parts = jax.jit(detection_loss, static_argnums=3)(out, labels, targets, cfg)
    # cls: BCE(0 | 1) and the one hard negative (tie -> index 1) BCE(0 | 0): mean log 2.
    # reg: 0.125 + 0 + 0 + 1.5 on the single positive.
    assert float(loss[0]) == pytest.approx(math.log(2) + 1.625, rel=1e-6)
    assert float(parts["num_pos"][0]) == 1 and float(parts["num_hard_neg"][0]) == 1
    g = jax.jit(jax.grad(lambda o: detection_loss(o, labels, targets, cfg)[0].sum()))(out)
    g = np.asarray(g)[0]
    assert g[0, 0] != 0 and g[1, 0] != 0  # positive and the selected negative
    assert np.all(g[2:] == 0)  # unselected negative and ignored anchor: no gradient
    assert np.all(g[1:, 1:] == 0)  # regression only on positives


# ---------------------------------------------------------------- task
def test_task_is_registered_and_both_batch_layouts_agree():
    assert TASKS.get("xie2018_detection") is AnchorDetectionTask
    task = AnchorDetectionTask(heads=CFG.heads, ohem_k=3)
    rng = np.random.default_rng(0)
    outputs = (jnp.asarray(rng.normal(size=(2, 8, 8, 8, 2, 5)), jnp.float32),
               jnp.asarray(rng.normal(size=(2, 4, 4, 4, 1, 5)), jnp.float32))
    assert task.input_shape(outputs) == (16, 16, 16)
    one = {"offset_zyx": jnp.array([[1.0, -2.0, 0.5], [0, 0, 0]]),
           "diameter_mm": jnp.array([6.0, 0.0])}
    many = {"nodules_zyx": jnp.array([[[8.5, 5.5, 8.0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]]),
            "nodules_diameter_mm": jnp.array([[6.0, 0.0], [0.0, 0.0]])}

    @jax.jit
    def run(outputs, one, many):
        lab, tgt = assign_targets(ANC_C, ANC_D, jnp.array([[8.5, 5.5, 8.0]]), jnp.array([6.0]),
                                  task.cfg)[:2]
        ref = detection_loss(flatten_outputs(outputs)[:1], lab[None], tgt[None], task.cfg)[0]
        excl = {**one, "excluded_zyx": jnp.array([[[12.5, 12.5, 12.5]], [[0.5, 0.5, 0.5]]]),
                "excluded_diameter_mm": jnp.array([[4.0], [0.0]])}
        return (task.per_sample_loss(outputs, one), task.per_sample_loss(outputs, many), ref,
                task.per_sample_metrics(outputs, one), task.host_outputs(outputs, one),
                task.probabilities(outputs), task.targets(outputs, excl)[0])

    l1, l2, ref, m, host, prob, lab_ex = run(outputs, one, many)
    # The excluded finding of patch 0 turns its anchors to "ignored"; patch 1's is padding.
    lab_ex = np.asarray(lab_ex)
    assert lab_ex[0, _idx([12.5, 12.5, 12.5], 5.0)] == -1
    assert np.all(lab_ex[1] == 0)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), rtol=1e-6)
    assert float(l1[0]) == pytest.approx(float(ref[0]), rel=1e-6)
    assert float(m["num_pos"][1]) == 0 and float(m["num_pos"][0]) >= 1
    np.testing.assert_array_equal(np.asarray(host["label"]), [1, 0])
    assert prob.shape == (2, 8 ** 3 * 2 + 4 ** 3, 5)
    with pytest.raises(KeyError, match="nodules_zyx"):
        task.per_sample_loss(outputs, {"label": jnp.zeros(2)})
    with pytest.raises(ValueError, match="heads"):
        AnchorDetectionTask(heads=((4, (5.0,)),)).input_shape(outputs)


# ---------------------------------------------------------------- decoding, NMS
def _planted_outputs():
    """Outputs of a (16, 16, 16) input with one confident anchor: head 1 (stride 4),
    cell (1, 0, 3), anchor 0 (10 mm), deltas (0.1, -0.2, 0, log 1.5)."""
    h0 = jnp.full((1, 8, 8, 8, 2, 5), 0.0).at[..., 0].set(-10.0)
    h1 = jnp.full((1, 4, 4, 4, 1, 5), 0.0).at[..., 0].set(-10.0)
    h1 = h1.at[0, 1, 0, 3, 0].set(jnp.array([5.0, 0.1, -0.2, 0.0, math.log(1.5)]))
    return h0, h1


def test_decode_dense_puts_a_planted_detection_where_the_anchor_is():
    scores, centres, diam = (np.asarray(v)[0] for v in
                             jax.jit(decode_dense, static_argnums=1)(_planted_outputs(), CFG))
    best = int(np.argmax(scores))
    assert best == 8 ** 3 * 2 + (1 * 16 + 0 * 4 + 3)
    # Anchor centre (s - 1) / 2 + s * c = (5.5, 1.5, 13.5), d = 10.
    np.testing.assert_allclose(centres[best], [5.5 + 1.0, 1.5 - 2.0, 13.5], rtol=1e-6)
    assert diam[best] == pytest.approx(15.0, rel=1e-6)
    det = select_candidates(scores, centres, diam, threshold=0.5)
    assert len(det) == 1 and det.score[0] == pytest.approx(1 / (1 + math.exp(-5)))


def test_sphere_nms_and_soft_nms_hand_cases():
    c = np.array([[0.0, 0, 0], [1.0, 0, 0], [20.0, 0, 0]])
    d = np.array([10.0, 10.0, 10.0])
    s = np.array([0.9, 0.8, 0.7])
    # IoU(A, B): r = 5, t = 1: lens 81 * 21 pi / 12, sphere 500 pi / 3 -> 0.7399.
    iou_ab = (81 * 21 / 12) / (1000 / 3 - 81 * 21 / 12)
    assert sphere_iou(c[0], 10.0, c[1], 10.0) == pytest.approx(iou_ab)
    np.testing.assert_array_equal(sphere_nms(c, d, s, 0.5), [0, 2])
    np.testing.assert_array_equal(sphere_nms(c, d, s, 0.8), [0, 1, 2])  # below threshold
    np.testing.assert_array_equal(sphere_nms(c, d, s, 0.5, max_keep=1), [0])
    idx, new = soft_nms(c, d, s, sigma=0.5)
    np.testing.assert_array_equal(idx, [0, 2, 1])
    np.testing.assert_allclose(new, [0.9, 0.7, 0.8 * math.exp(-iou_ab ** 2 / 0.5)], rtol=1e-9)
    det = select_candidates(s, c, d, threshold=0.75, method="iou", iou_threshold=0.5)
    np.testing.assert_array_equal(det.score, [0.9])
    det = select_candidates(s, c, d, threshold=0.0, method="distance", radius=2.0)
    np.testing.assert_array_equal(det.centre_zyx[:, 0], [0, 20])
    with pytest.raises(ValueError, match="method"):
        select_candidates(s, c, d, method="box")


def test_sphere_nms_at_zero_drops_every_overlapping_sphere_and_keeps_disjoint_ones():
    """xie2018's default (nms_iou 0): a small offset mark on a large nodule's rim (IoU
    below 0.1) is dropped; spheres that do not meet are all kept, touching ones too."""
    c = np.array([[0.0, 0, 0], [11.0, 0, 0], [30.0, 0, 0], [40.0, 0, 0]])
    d = np.array([20.0, 6.0, 8.0, 12.0])  # sphere 1 pokes 2 mm into sphere 0; 2 and 3 touch
    s = np.array([0.9, 0.8, 0.7, 0.6])
    assert 0.0 < sphere_iou(c[0], d[0], c[1], d[1]) < 0.1
    assert sphere_iou(c[2], d[2], c[3], d[3]) == 0.0
    np.testing.assert_array_equal(sphere_nms(c, d, s, 0.1), [0, 1, 2, 3])
    np.testing.assert_array_equal(sphere_nms(c, d, s, 0.0), [0, 2, 3])


def _pool_detector(x):
    """A local stand-in network: per head, logit = 20 * (mean of the cell's voxels - 0.5)
    for every anchor, zero deltas."""
    outs = []
    for s, diam in CFG.heads:
        b, dd, hh, ww, _ = x.shape
        m = x.reshape(b, dd // s, s, hh // s, s, ww // s, s).mean(axis=(2, 4, 6))
        logit = jnp.broadcast_to(20.0 * (m - 0.5)[..., None, None],
                                 m.shape + (len(diam), 1))
        outs.append(jnp.concatenate([logit, jnp.zeros(m.shape + (len(diam), 4))], -1))
    return tuple(outs)


def test_detect_volume_tiled_equals_one_pass():
    vol = np.zeros((20, 36, 30), np.float32)
    vol[4:8, 20:24, 12:16] = 1.0  # a bright 4^3 cube: stride-4 cell (1, 5, 3)
    kw = dict(threshold=0.5, method="iou", iou_threshold=0.99)
    one = detect_volume(_pool_detector, vol, CFG, **kw)
    tiled = detect_volume(_pool_detector, vol, CFG, tile_zyx=(16, 16, 16), halo=16, **kw)
    assert len(one) == len(tiled) > 0
    order = lambda det: np.lexsort(np.c_[det.centre_zyx, det.diameter].T)  # noqa: E731
    np.testing.assert_allclose(one.centre_zyx[order(one)], tiled.centre_zyx[order(tiled)])
    np.testing.assert_allclose(one.diameter[order(one)], tiled.diameter[order(tiled)])
    # All detections lie in the cube; the stride-4 10 mm anchor of cell (1, 5, 3) is one.
    assert np.all((one.centre_zyx >= [4, 20, 12]) & (one.centre_zyx <= [8, 24, 16]))
    assert np.any(np.all(one.centre_zyx == [5.5, 21.5, 13.5], 1) & (one.diameter == 10))


def test_to_marks_maps_voxels_to_world_mm():
    det = Detections(np.array([[1.0, 2.0, 3.0]]), np.array([6.0]), np.array([0.9]))
    geom = Geometry.identity(spacing=(1.0, 1.0, 1.0), origin=(10.0, 20.0, 30.0))
    marks, diam = to_marks("1.2.3", det, geom)
    np.testing.assert_allclose(marks.xyz, [[13.0, 22.0, 31.0]])  # world is (x, y, z)
    assert list(marks.uid) == ["1.2.3"] and marks.probability[0] == 0.9 and diam[0] == 6.0


def test_detect_store_gives_world_marks_per_scan():
    class _Rec:
        def __init__(self, origin):
            self.geometry = Geometry.identity(origin=origin)

    class _Store:
        vols = {"a": np.zeros((20, 36, 30), np.float32), "b": np.zeros((20, 36, 30), np.float32)}
        vols["a"][4:8, 20:24, 12:16] = 1.0

        def scan(self, uid):
            return _Rec((100.0, 0.0, 0.0) if uid == "a" else (0.0, 0.0, 0.0))

        def read_volume(self, uid):
            return self.vols[uid]

    marks, seconds = detect_store(_pool_detector, _Store(), ["a", "b"], CFG, threshold=0.5,
                                  iou_threshold=0.01, max_candidates=1)
    assert set(seconds) == {"a", "b"} and list(marks.uid) == ["a"]  # "b" is empty
    # One mark inside the cube (voxels z 4-7, y 20-23, x 12-15), world (x + 100, y, z).
    x, y, z = marks.xyz[0]
    assert 112 <= x <= 115 and 20 <= y <= 23 and 4 <= z <= 7


def test_detect_volume_lung_mask_drops_anchors_before_suppression():
    vol = np.zeros((20, 36, 30), np.float32)
    vol[4:8, 20:24, 12:16] = 1.0
    vol[12:16, 4:8, 4:8] = 1.0
    kw = dict(threshold=0.5, method="iou", iou_threshold=0.01)
    both = detect_volume(_pool_detector, vol, CFG, **kw)
    assert np.any(both.centre_zyx[:, 0] < 10) and np.any(both.centre_zyx[:, 0] > 10)
    lung = np.zeros(vol.shape, np.uint8)
    lung[:, 16:, :] = 1  # only the first cube lies in the "lung"
    inside = detect_volume(_pool_detector, vol, CFG, lung_mask=lung, **kw)
    assert len(inside) > 0 and np.all(inside.centre_zyx[:, 1] >= 16)
    with pytest.raises(ValueError, match="lung_mask shape"):
        detect_volume(_pool_detector, vol, CFG, lung_mask=lung[:-1], **kw)
