"""dou2017 hybrid loss (lungjax.tasks.hybrid): targets, decoding, losses on hand-computed
values, weight decay, and agreement of targets with lungjax.data.augment."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lungjax.data import augment as aug
from lungjax.data.coords import Geometry
from lungjax.registry import TASKS
from lungjax.tasks import hybrid

S = (24, 60, 60)
NORM = math.sqrt(24 ** 2 + 60 ** 2 + 60 ** 2)  # |S| in mm at 1 mm spacing


# --------------------------------------------------------------------------- targets


def test_encode_targets_hand_values():
    t = hybrid.encode_targets(jnp.array([[3.0, -6.0, 15.0], [0.0, 0.0, 0.0]]),
                              jnp.array([10.0, 0.0]), S)
    np.testing.assert_allclose(t[0], [0.25, -0.2, 0.5, math.log(10 / NORM)], rtol=1e-6)
    # No diameter (a negative): T_d = 0, not -inf.
    np.testing.assert_array_equal(t[1], [0, 0, 0, 0])
    # Anisotropic grid: T_z, T_y, T_x do not depend on spacing, T_d does.
    t2 = hybrid.encode_targets(jnp.array([3.0, -6.0, 15.0]), 10.0, S, (2.0, 0.5, 0.5))
    np.testing.assert_allclose(t2, [0.25, -0.2, 0.5,
                                    math.log(10 / math.sqrt(48 ** 2 + 30 ** 2 + 30 ** 2))],
                               rtol=1e-6)
    assert hybrid.REGRESSION_ORDER == ("z", "y", "x", "log_diameter")


def test_regression_targets_from_positions_and_decode_round_trip():
    g = np.array([[14.5, 23.5, 44.5], [11.0, 30.0, 31.0]])
    p = np.array([[11.5, 29.5, 29.5], [11.5, 29.5, 29.5]])
    d = np.array([10.0, 4.0])
    t = hybrid.regression_targets(g, d, p, S)
    np.testing.assert_allclose(t[0], [0.25, -0.2, 0.5, math.log(10 / NORM)], rtol=1e-6)
    off, diam = hybrid.decode_targets(t, S)
    np.testing.assert_allclose(off, g - p, atol=1e-5)
    np.testing.assert_allclose(diam, d, rtol=1e-5)


def test_patch_geometric_center_matches_read_patch_convention():
    # A read at integer centre c starts at c - S // 2; index (S - 1) / 2 of the patch.
    vol = np.arange(40, dtype=np.float64)
    for size in (24, 25):
        c = 20
        patch = vol[c - size // 2:c - size // 2 + size]
        centre_value = np.interp((size - 1) / 2, np.arange(size), patch)
        assert centre_value == pytest.approx(
            hybrid.patch_geometric_center([c, c, c], [size] * 3)[0])


def test_decode_to_world_hand_values():
    geom = Geometry(spacing=np.array([0.5, 0.5, 2.0]), origin=np.array([10.0, 20.0, 30.0]),
                    direction=np.eye(3))
    spacing_zyx = (2.0, 0.5, 0.5)
    norm = math.sqrt(48 ** 2 + 30 ** 2 + 30 ** 2)
    t = np.array([[0.25, -0.2, 0.5, math.log(10 / norm)]])
    world, diam = hybrid.decode_to_world(t, np.array([[12, 30, 30]]), S, geom)
    # Geometric centre (11.5, 29.5, 29.5) + offset (3, -6, 15) = voxel (14.5, 23.5, 44.5).
    np.testing.assert_allclose(world, [[10 + 44.5 * 0.5, 20 + 23.5 * 0.5, 30 + 14.5 * 2.0]])
    np.testing.assert_allclose(diam, [10.0])
    np.testing.assert_allclose(
        hybrid.encode_targets(np.array([3.0, -6.0, 15.0]), 10.0, S, spacing_zyx), t[0],
        rtol=1e-6)


def _pipeline_offset(g_store, c, d_mm, params, out):
    """What lungjax.data.pipeline computes for a nodule at store voxel g_store."""
    pre = aug.rotated_input_shape(out, params.rot_k)
    size = aug.read_size(pre, params.scale)
    centre = np.asarray(c) + np.asarray(params.shift_zyx)
    target = np.asarray(g_store, np.float64) - centre + np.asarray(size) // 2
    offset = aug.relative_to_center(aug.map_point(target, size, out, params), out)
    return hybrid.encode_targets(offset, d_mm * params.scale, out)


@pytest.mark.parametrize("out", [(24, 60, 60), (7, 8, 11)])
def test_transform_targets_matches_augment_map_point(out):
    rng = np.random.default_rng(0)
    c = np.array([40, 50, 60])
    shifts = [(0, 0, 0), (2, -3, 1), (-1, 4, -5)]
    for k, flips, shift, scale in itertools.product(
            range(4), itertools.product([False, True], repeat=3), shifts, (1.0, 0.9, 1.1)):
        params = aug.AugmentParams(shift, scale, k, flips)
        g = c + rng.uniform(-3, 3, 3)
        t0 = hybrid.regression_targets(g, 8.0, hybrid.patch_geometric_center(c, out), out)
        got = hybrid.transform_targets(np.asarray(t0), params, out)
        want = _pipeline_offset(g, c, 8.0, params, out)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=str(params))


def test_transform_targets_follow_the_augmented_image():
    """A one-voxel 'nodule' lands where the transformed target says, for every rotation,
    flip and shift applied by augment.apply (unscaled, so positions stay on voxels)."""
    out = (8, 12, 12)
    vol = np.zeros((30, 40, 40), np.float32)
    c = np.array([15, 20, 20])
    g = np.array([17, 17, 23])
    vol[tuple(g)] = 1.0
    t0 = hybrid.regression_targets(g, 6.0, hybrid.patch_geometric_center(c, out), out)
    for k, flips, shift in itertools.product(range(4), itertools.product([False, True], repeat=3),
                                             [(0, 0, 0), (1, 2, -2)]):
        params = aug.AugmentParams(shift, 1.0, k, flips)
        pre = aug.rotated_input_shape(out, k)
        start = c + np.asarray(shift) - np.asarray(pre) // 2
        crop = vol[tuple(slice(s, s + n) for s, n in zip(start, pre))]
        patch = aug.apply(crop, out, params)
        found = np.array(np.unravel_index(np.argmax(patch), patch.shape), np.float64)
        t = hybrid.transform_targets(np.asarray(t0), params, out)
        off, _ = hybrid.decode_targets(t, out)
        np.testing.assert_allclose(aug.relative_to_center(found, out), off, atol=1e-5,
                                   err_msg=str(params))


# --------------------------------------------------------------------------- losses


LN3 = math.log(3.0)
LOGITS = jnp.array([[0.0, LN3], [0.0, 0.0], [LN3, 0.0], [0.0, 0.0]])
LABELS = jnp.array([1, 0, 1, 0])
TARGETS = jnp.array([[0.1, 0.2, 0.3, -2.0], [0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
# Differences pred - target: sample 0 (0.5, 0, 0, 0) -> 0.125; sample 2 (2, 0, 0, -1) -> 2.0;
# negatives are far off and must not count.
PRED = TARGETS + jnp.array([[0.5, 0, 0, 0], [9, 9, 9, 9], [2, 0, 0, -1], [-7, 0, 5, 0]])
CLS = [-math.log(0.75), math.log(2), math.log(4), math.log(2)]


def test_hybrid_loss_hand_values():
    terms = hybrid.hybrid_loss_terms(LOGITS, PRED, LABELS, TARGETS)
    np.testing.assert_allclose(terms["cls"], CLS, rtol=1e-6)
    np.testing.assert_allclose(terms["loc"], [0.125, 0, 2.0, 0], rtol=1e-6)
    want = sum(CLS) / 4 + 0.5 * (0.125 + 2.0) / 2  # N = 4, N_reg = 2 positives
    assert float(terms["loss"]) == pytest.approx(want, rel=1e-6)
    assert float(jnp.mean(terms["per_sample"])) == pytest.approx(want, rel=1e-6)
    assert float(hybrid.hybrid_loss(LOGITS, PRED, LABELS, TARGETS)) == pytest.approx(want)
    # N_reg = N.
    b = hybrid.hybrid_loss(LOGITS, PRED, LABELS, TARGETS, reg_normalizer="batch")
    assert float(b) == pytest.approx(sum(CLS) / 4 + 0.5 * (0.125 + 2.0) / 4, rel=1e-6)
    # lambda.
    l1 = hybrid.hybrid_loss(LOGITS, PRED, LABELS, TARGETS, lam=1.0)
    assert float(l1) == pytest.approx(sum(CLS) / 4 + (0.125 + 2.0) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="reg_normalizer"):
        hybrid.hybrid_loss(LOGITS, PRED, LABELS, TARGETS, reg_normalizer="all")


def test_hybrid_loss_weights_masks_and_edge_cases():
    w = jnp.array([1.0, 1.0, 0.0, 1.0])  # sample 2 dropped (padding / filtered)
    terms = hybrid.hybrid_loss_terms(LOGITS, PRED, LABELS, TARGETS, w)
    want = (CLS[0] + CLS[1] + CLS[3]) / 3 + 0.5 * 0.125 / 1
    assert float(terms["loss"]) == pytest.approx(want, rel=1e-6)
    assert float(jnp.sum(w * terms["per_sample"]) / jnp.sum(w)) == pytest.approx(want, rel=1e-6)
    assert float(terms["n_reg"]) == 1.0
    # regress_mask: sample 0 has no diameter -> only sample 2 regressed.
    m = hybrid.hybrid_loss(LOGITS, PRED, LABELS, TARGETS,
                           regress_mask=jnp.array([False, True, True, True]))
    assert float(m) == pytest.approx(sum(CLS) / 4 + 0.5 * 2.0, rel=1e-6)
    # No positive in the batch: classification only, finite.
    neg = hybrid.hybrid_loss(LOGITS, PRED, jnp.zeros(4, jnp.int32), TARGETS)
    ce0 = [math.log(4), math.log(2), -math.log(0.75), math.log(2)]
    assert float(neg) == pytest.approx(sum(ce0) / 4, rel=1e-6)
    # Classification-only networks.
    assert float(hybrid.hybrid_loss(LOGITS, None, LABELS, None)) == pytest.approx(sum(CLS) / 4)


def test_hybrid_loss_gradient():
    g = jax.jit(jax.grad(lambda r: hybrid.hybrid_loss(LOGITS, r, LABELS, TARGETS)))(PRED)
    # d/dr of lam / N_reg * smoothL1: lam / 2 * diff inside |diff| < 1, lam / 2 * sign outside.
    np.testing.assert_allclose(g, [[0.25 * 0.5, 0, 0, 0], [0, 0, 0, 0],
                                   [0.25, 0, 0, -0.25], [0, 0, 0, 0]], atol=1e-6)
    gl = jax.jit(jax.grad(lambda lg: hybrid.hybrid_loss(lg, PRED, LABELS, TARGETS)))(LOGITS)
    p = jax.nn.softmax(LOGITS)
    np.testing.assert_allclose(gl, (p - jax.nn.one_hot(LABELS, 2)) / 4, atol=1e-6)


def test_weight_decay_is_the_gradient_of_l2_penalty():
    params = {"conv": {"kernel": jnp.array([[1.0, 2.0]]), "bias": jnp.array([5.0])},
              "bn": {"scale": jnp.array([3.0]), "bias": jnp.array([1.0])}}
    mask = hybrid.decay_mask(params)
    assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False,
                                                                    "bias": False}}
    assert float(hybrid.l2_penalty(params, 1e-4)) == pytest.approx(1e-4 * 5.0)
    grad = jax.grad(lambda p: hybrid.l2_penalty(p, 1e-4))(params)
    tx = optax.add_decayed_weights(2 * 1e-4, mask=hybrid.decay_mask)
    upd, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(upd)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# --------------------------------------------------------------------------- task


def _batch():
    offs = jnp.array([[0.1, 0.2, 0.3], [0, 0, 0], [0, 0, 0], [0, 0, 0]]) * jnp.array(S) / 2
    diam = jnp.array([math.exp(-2.0) * NORM, 0.0, math.exp(-2.0) * NORM, 0.0])
    return {"label": LABELS, "offset_zyx": offs, "diameter_mm": diam,
            "weight": jnp.ones(4, jnp.float32)}


def test_task_per_sample_loss_and_metrics():
    task = TASKS.build({"name": "hybrid", "patch_size_zyx": S})
    batch = _batch()
    np.testing.assert_allclose(task.targets(batch), TARGETS, atol=1e-6)
    outputs = {"logits": LOGITS, "regression": PRED}
    per = task.per_sample_loss(outputs, batch)
    want = sum(CLS) / 4 + 0.5 * (0.125 + 2.0) / 2
    assert float(jnp.mean(per)) == pytest.approx(want, rel=1e-5)
    m = task.per_sample_metrics(outputs, batch)
    assert float(jnp.mean(m["cls_loss"])) == pytest.approx(sum(CLS) / 4, rel=1e-6)
    assert float(jnp.mean(m["loc_loss"])) == pytest.approx((0.125 + 2.0) / 2, rel=1e-5)
    assert float(jnp.mean(m["accuracy"])) == 0.75  # sample 2 is wrong
    # |exp(T_d pred) - exp(T_d true)| * |S|, averaged over the 2 positives.
    err = (0.0 + abs(math.exp(-3.0) - math.exp(-2.0)) * NORM) / 2
    assert float(jnp.mean(m["diameter_abs_err_mm"])) == pytest.approx(err, rel=1e-5)
    host = task.host_outputs(outputs, batch)
    np.testing.assert_allclose(host["score"], [0.75, 0.5, 0.25, 0.5], rtol=1e-6)
    np.testing.assert_allclose(host["pred_diameter_mm"][2], math.exp(-3.0) * NORM, rtol=1e-5)
    dec = task.decode(outputs)
    np.testing.assert_allclose(dec["offset_zyx"][0], PRED[0, :3] * jnp.array(S) / 2, rtol=1e-5)
    # Classification-only outputs: plain cross entropy, no regression metrics.
    per_c = task.per_sample_loss(LOGITS, batch)
    np.testing.assert_allclose(per_c, CLS, rtol=1e-6)
    assert "loc_loss" not in task.per_sample_metrics(LOGITS, batch)
    with pytest.raises(ValueError, match="classes"):
        task.per_sample_loss(jnp.zeros((4, 3)), batch)
    with pytest.raises(ValueError, match="logits"):
        task.per_sample_loss({"regression": PRED}, batch)


def test_task_in_engine_eval_step():
    """The engine's jitted eval step with the hybrid network and task gives the hybrid
    loss (gradients through the same network: tests/test_fp_reduction.py)."""
    from lungjax.models import fp_reduction as fpr
    from lungjax.state import TrainState
    from lungjax.steps import make_eval_step

    model = fpr.build_fpr_model("resnet_hl", trunk_features=(2, 2, 3), stage_features=(4, 4),
                                reg_features=2, fc_features=4, conv_impl="xla")
    task = hybrid.HybridTask(patch_size_zyx=(13, 34, 34))
    # Variables filled from numpy (compiling the initialisers would dominate the test).
    abstract = jax.eval_shape(model.init, jax.random.key(0, impl="rbg"),
                              jax.ShapeDtypeStruct((1, 13, 34, 34, 1), jnp.float32))
    rs = np.random.default_rng(1)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(rs.normal(0, 0.3, a.shape) if p[-1].key == "kernel" else
                                 np.ones(a.shape) if p[-1].key in ("scale", "var") else
                                 np.zeros(a.shape), a.dtype), abstract)
    params = variables.pop("params")
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                       opt_state=(), rng=jnp.zeros((4,), jnp.uint32))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(size=(4, 13, 34, 34, 1)), jnp.float32),
             "label": LABELS, "offset_zyx": jnp.asarray(rng.uniform(-3, 3, (4, 3)), jnp.float32),
             "diameter_mm": jnp.array([6.0, 0.0, 12.0, 0.0]), "weight": jnp.ones(4)}
    _, metrics, host = make_eval_step(model, task)(state, batch)

    def direct(variables, batch):
        out = model.apply(variables, batch["image"])
        return hybrid.hybrid_loss(out["logits"], out["regression"], batch["label"],
                                  task.targets(batch), regress_mask=batch["diameter_mm"] > 0)

    want = jax.jit(direct)(state.variables(), batch)
    assert float(metrics["loss"] / metrics["weight"]) == pytest.approx(float(want), rel=1e-5)
    assert "pred_diameter_mm" in host and host["pred_diameter_mm"].shape == (4,)


def test_classify_scans_places_marks_at_the_regressed_centre():
    """Stage-2 marks sit at patch centre + regressed offset (world mm), or at the stage-1
    candidate when the position is not regressed."""
    from lungjax.data.coords import Geometry, voxel_to_world
    from lungjax.methods.candidates import classify_scans

    geom = Geometry(spacing=np.array([0.5, 1.0, 2.0]), origin=np.array([10.0, 20.0, 30.0]),
                    direction=np.eye(3))

    class _Store:
        def scan(self, uid):
            return type("Rec", (), {"geometry": geom})()

        def read_volume(self, uid):
            return np.zeros((30, 30, 30), np.float32)

    class _Classifier:
        size = (24, 60, 60)

        def __call__(self, volume, voxel_zyx):
            n = len(voxel_zyx)
            return {"score": np.linspace(0.9, 0.1, n), "diameter_mm": np.full(n, 6.0),
                    "offset_zyx": np.tile([1.5, -2.0, 0.25], (n, 1))}

    vox = np.array([[10.0, 12.0, 14.0], [20.0, 5.0, 7.0]])
    cands = {"a": {"voxel_zyx": vox, "world_xyz": voxel_to_world(vox, geom),
                   "score": np.array([0.99, 0.98])}}
    marks, diam, _ = classify_scans(_Classifier(), _Store(), cands, ["a"],
                                    regressed_position=True)
    # Geometric centre of a patch read at c: c - S // 2 + (S - 1) / 2 = c - 0.5.
    expect = voxel_to_world(vox - 0.5 + np.array([1.5, -2.0, 0.25]), geom)
    np.testing.assert_allclose(marks.xyz, expect)
    np.testing.assert_allclose(marks.probability, [0.9, 0.1])
    np.testing.assert_allclose(diam, [6.0, 6.0])
    plain, _, _ = classify_scans(_Classifier(), _Store(), cands, ["a"])
    np.testing.assert_allclose(plain.xyz, cands["a"]["world_xyz"])


def test_mirror_averaged_maps_offsets_back_through_each_flip():
    """Over the 8 mirror images a classifier that points at a patch's bright voxel
    points at the same voxel every time once each flip is undone; probabilities are the
    plain mean of the 8 views; without mirrors the classifier is called once."""
    from lungjax.methods.candidates import MIRRORS, mirror_averaged

    size = np.array([6, 8, 10])
    x = np.zeros((2, *size, 1), np.float32)
    x[0, 1, 2, 7, 0] = 1.0
    x[1, 4, 6, 0, 0] = 1.0
    centre = (size - 1) / 2.0
    calls = []

    def predict(p):
        calls.append(p.shape)
        at = np.array([np.unravel_index(np.argmax(q[..., 0]), q.shape[:3]) for q in p])
        # A score that depends on where the voxel lies: each view gives another value.
        return {"score": at[:, 2] / 10.0, "diameter_mm": np.full(len(p), 5.0),
                "offset_zyx": at - centre}

    out = mirror_averaged(predict, x, True)
    assert len(calls) == 8 and len(MIRRORS) == 8 and len(set(MIRRORS)) == 8
    np.testing.assert_allclose(out["offset_zyx"], [[1, 2, 7] - centre, [4, 6, 0] - centre])
    # x index 7 and, flipped, 10 - 1 - 7 = 2, each in 4 of the 8 views.
    np.testing.assert_allclose(out["score"], [(0.7 + 0.2) / 2, (0.0 + 0.9) / 2])
    np.testing.assert_allclose(out["diameter_mm"], 5.0)
    calls.clear()
    once = mirror_averaged(predict, x, False)
    assert len(calls) == 1
    np.testing.assert_allclose(once["score"], [0.7, 0.0])


def test_score_candidates_spends_the_mirror_views_on_the_top_candidates_only():
    """``mirror_top=k``: the k best candidates by their one-view score get exactly the
    outputs of all eight views, the others their one-view outputs; the calls are one view
    of every candidate plus seven of the k. ``mirror_top`` 0 or >= n: every candidate
    averaged, as ``mirror_averaged`` alone."""
    from lungjax.methods.candidates import mirror_averaged, padded_to, score_candidates

    rng = np.random.default_rng(0)
    n, batch, k = 11, 4, 3
    patches = rng.random((n, 4, 6, 6, 1)).astype(np.float32)
    seen = []

    def outputs(p):  # the score depends on the view (not flip invariant)
        return {"score": p[:, 0, 0, :3, 0].sum(axis=1) / 3.0 + p[:, 1, 2, 3, 0],
                "offset_zyx": np.stack([p[:, 0, 0, 0, 0]] * 3, axis=1)}

    def predict(p):  # what score_candidates calls: at most a batch at a time
        assert len(p) <= batch
        seen.append(len(p))
        return outputs(p)

    def patches_of(idx):
        return patches[np.asarray(idx)]

    full = mirror_averaged(outputs, patches, True)
    one = mirror_averaged(outputs, patches, False)
    out = score_candidates(predict, patches_of, n, batch, True, mirror_top=k)
    top = np.argsort(-one["score"])[:k]
    rest = np.setdiff1d(np.arange(n), top)
    np.testing.assert_allclose(out["score"][top], full["score"][top])
    np.testing.assert_allclose(out["offset_zyx"][top], full["offset_zyx"][top])
    np.testing.assert_allclose(out["score"][rest], one["score"][rest])
    assert sum(seen) == n + 7 * k
    for m in (0, n, n + 5):
        np.testing.assert_allclose(
            score_candidates(predict, patches_of, n, batch, True, mirror_top=m)["score"],
            full["score"])
    np.testing.assert_allclose(score_candidates(predict, patches_of, n, batch, False,
                                                mirror_top=k)["score"], one["score"])
    assert score_candidates(predict, patches_of, 0, batch, True, mirror_top=k) == {}
    # Padded to the batch (the predict command's classifier): the network sees one shape
    # only, and the outputs are the same.
    seen.clear()
    padded = score_candidates(padded_to(batch, predict), patches_of, n, batch, True,
                              mirror_top=k)
    assert set(seen) == {batch}
    for key in out:
        np.testing.assert_allclose(padded[key], out[key])
    with pytest.raises(ValueError, match="5 patches in a call of at most 4"):
        padded_to(batch, predict)(patches[:5])


def test_merge_within_diameter_joins_rim_marks_and_keeps_neighbours():
    """Rim marks of a 20 mm nodule (one radius from its best mark, which a radius rule
    would keep) join that mark, which moves to the members' score-weighted mean; a
    separate small nodule 25 mm away stays its own mark; a mark inside the small
    diameter of a higher-scoring one joins it, one just outside does not."""
    from lungjax.data.tables import Marks
    from lungjax.methods.candidates import merge_marks, merge_within_diameter

    xyz = np.array([[0.0, 0.0, 0.0], [11.0, 0.0, 0.0], [-11.0, 0.0, 0.0], [25.0, 0.0, 0.0],
                    [25.0, 3.9, 0.0], [25.0, -4.1, 0.0]])
    score = np.array([0.9, 0.6, 0.6, 0.8, 0.5, 0.4])
    diam = np.array([20.0, 8.0, 8.0, 4.0, 4.0, 4.0])
    out, s, d = merge_within_diameter(xyz, score, diam)
    # Kept, highest score first: the big nodule, the small one, the mark 4.1 mm from it.
    np.testing.assert_allclose(s, [0.9, 0.8, 0.4])
    np.testing.assert_allclose(d, [20.0, 4.0, 4.0])
    np.testing.assert_allclose(out[0], [0.0, 0.0, 0.0])  # symmetric rim: the centre
    np.testing.assert_allclose(out[1], [25.0, 3.9 * 0.5 / 1.3, 0.0])
    np.testing.assert_allclose(out[2], [25.0, -4.1, 0.0])
    # One-sided rim: the merged mark moves towards the rim mark by its weight.
    one, _, _ = merge_within_diameter(xyz[:2], score[:2], diam[:2])
    np.testing.assert_allclose(one, [[11.0 * 0.6 / 1.5, 0.0, 0.0]])
    # Per scan: marks of two scans never merge, whatever their distance.
    marks = Marks(np.array(["a", "b"]), np.zeros((2, 3)), np.array([0.9, 0.8]))
    merged, md = merge_marks(marks, np.array([10.0, 10.0]))
    assert merged.uid.tolist() == ["a", "b"] and md.tolist() == [10.0, 10.0]
    with pytest.raises(ValueError, match="2 positions, 2 scores, 1 diameters"):
        merge_within_diameter(xyz[:2], score[:2], diam[:1])
