"""shrey2020 pieces, small and exact: the disc nodule masks against the sphere ones, the
benign oversampling, the suspicious-slice rule, the networks' sizes and the frozen U-Net,
the configs and their stage sharing, and the tables from hand-made fold records."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax import stages
from lungjax.data import dense_sampling as ds
from lungjax.data import sampler as smp
from lungjax.data.preprocess import disc_labels, sphere_labels
from lungjax.data.prepare import prepare_dataset
from lungjax.data.store import PatchStore
from lungjax.methods import shrey2020 as method
from lungjax.models import classifiers2d, shrey2020 as models
from conftest import load_config  # noqa: E402  (tests/ is on sys.path under pytest)
from test_dense_targets import config as sampler_config
from test_dense_targets import make_dense_store
from test_prepare import make_luna_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- masks


def test_disc_is_the_ball_on_the_central_slice_and_wider_elsewhere():
    shape, c, d = (11, 15, 15), np.array([[5.0, 7.0, 7.0]]), np.array([8.0])
    ball = sphere_labels(shape, (1, 1, 1), c, d)
    disc = disc_labels(shape, (1, 1, 1), c, d)
    z_ball = np.flatnonzero(ball.reshape(11, -1).any(1))
    z_disc = np.flatnonzero(disc.reshape(11, -1).any(1))
    np.testing.assert_array_equal(z_ball, z_disc)  # the slices the nodule spans: 1..9
    assert z_disc.tolist() == list(range(1, 10))
    np.testing.assert_array_equal(ball[5], disc[5])
    for z in z_disc:  # every spanned slice holds the full-diameter disc
        np.testing.assert_array_equal(disc[z], disc[5])
    assert ball[1].sum() == 1 < disc[1].sum() == 49  # the ball's pole vs the disc
    assert (disc >= ball).all() and disc.sum() > ball.sum()


def test_disc_respects_anisotropic_spacing_and_labels():
    # 2.5 mm slices: a 6 mm nodule spans the slices within 3 mm of its centre (3 slices).
    m = disc_labels((9, 12, 12), (2.5, 1.0, 1.0), np.array([[4.0, 6.0, 6.0]]), [6.0], [7])
    assert np.flatnonzero(m.reshape(9, -1).any(1)).tolist() == [3, 4, 5]
    assert set(np.unique(m)) == {0, 7} and (m[4] == 7).sum() == 29  # r = 3 px disc
    with pytest.raises(ValueError, match="1..255"):
        disc_labels((3, 3, 3), (1, 1, 1), np.zeros((1, 3)), [2.0], [0])


def test_prepare_draws_discs_when_asked(tmp_path):
    root = make_luna_folder(tmp_path / "luna", with_bad=False)
    prepare_dataset(root, tmp_path / "st", spacing_zyx=None, margin_mm=5.0, progress=False,
                    subsets=[0], nodule_mask="disc")
    st = PatchStore.open(tmp_path / "st")
    for uid in st.uids():
        rec = st.scan(uid)
        assert rec.nodule_mask_source == "disc" and st.manifest["nodule_mask"] == "disc"
        want = disc_labels(rec.shape_zyx, rec.spacing_zyx, rec.nodules_zyx,
                           rec.nodule_diameter_mm, rec.nodule_mask_label)
        np.testing.assert_array_equal(st.read_volume(uid, array="nodules"), want)


def test_default_store_path_keeps_mask_rules_apart():
    from lungjax.train_data import default_store_path

    c = load_config("configs/shrey2020.py", "tiny")
    disc = default_store_path(c)
    c.data.nodule_mask = "consensus"
    assert disc == default_store_path(c) + "_disc"


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_dense_store(str(tmp_path_factory.mktemp("dense")))


def test_benign_rois_repeat_three_times_per_pass(store):
    cfg = sampler_config(patch=(8, 8), batch=2, name="nodule_roi", samples_per_round=0,
                         roi_balance=False)
    s = ds.roi_sampler(store, store.uids(), smp.SamplerConfig.from_config(cfg), 2,
                       balance=False, class_repeat=(3, 1))
    assert sorted(s.pool["label"].tolist()) == [0, 0, 1, 1]
    idx = s.freeze_index(seed=0)
    ids = idx.samples["sample_id"]
    benign = s.pool["sample_id"][s.pool["label"] == 0]
    assert len(idx) == 2 * 3 + 2
    assert all((ids == b).sum() == 3 for b in benign)
    assert all((ids == m).sum() == 1 for m in s.pool["sample_id"][s.pool["label"] == 1])
    with pytest.raises(ValueError, match="roi_class_repeat"):
        ds.roi_sampler(store, store.uids(), smp.SamplerConfig.from_config(cfg), 2,
                       balance=False, class_repeat=(0, 1))


# ----------------------------------------------------------------------------- the rule


def test_slice_rule_counts_strictly_above_the_threshold():
    p = np.array([0.9, 0.35, 0.36, 0.1, 0.5, 0.2])
    y = np.array([1, 1, 0, 0, 1, 0])
    r = method.slice_rule(p, y, 0.35)
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 2, 1)  # 0.35 is not > 0.35
    assert r["sensitivity"] == pytest.approx(2 / 3) and r["specificity"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx(2 / 3) and r["suspicious_fraction"] == 0.5
    assert np.isnan(method.slice_rule(p, np.zeros(6), 0.35)["sensitivity"])


# ----------------------------------------------------------------------------- networks


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_paper_sizes():
    x = jnp.zeros((1, 64, 64, 2))
    v = jax.eval_shape(models.Shrey2020Classifier().init, jax.random.key(0), x)
    # conv 2->8, 8->16, 16->32 (3x3 + bias), FC 8*8*32 -> 128, FC 128 -> 2.
    want = (9 * 2 * 8 + 8) + (9 * 8 * 16 + 16) + (9 * 16 * 32 + 32) \
        + (8 * 8 * 32 * 128 + 128) + (128 * 2 + 2)
    assert _count(v["params"]) == want
    u = models.Shrey2020UNet()
    v = jax.eval_shape(u.init, jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
    assert _count(v["params"]) == 31_030_658  # the original U-Net with 2 output classes
    assert list(v["params"]) == ["unet"]
    assert jax.eval_shape(lambda v: u.apply(v, jnp.zeros((1, 64, 64, 1))), v).shape == \
        (1, 64, 64, 2)
    r = jax.eval_shape(classifiers2d.ResNet50_2D().init, jax.random.key(0), x)
    assert _count(r["params"]) == 23_508_994  # ResNet50's 23.5 M without its 1000-way head
    with pytest.raises(ValueError, match="multiples of 16"):
        u.init(jax.random.key(0), jnp.zeros((1, 40, 64, 1)))


def _cascade(name):
    cfg = load_config("configs/shrey2020.py", "tiny")
    margs = dict(cfg.stages.classify.sections.model)
    if name != "proposed":
        margs.update(cfg.cv.variants[name].stages.classify.sections.model)
    margs.pop("name")
    # XLA's own convolutions: the property does not depend on the formulation, and the
    # CPU-fast ones would compile for most of a minute.
    margs["conv_impl"] = "xla"
    return models.Shrey2020Cascade(**margs)


def _cascade_grads(model, x, evaluate):
    """Gradients of a squared-output loss w.r.t. every parameter; ``evaluate(f, *args)``
    runs ``f`` (jit and call) or only traces it (``jax.eval_shape``)."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(2)}
    v = (jax.eval_shape(model.init, rngs, x) if evaluate is jax.eval_shape
         else jax.jit(model.init)(rngs, x))
    state = {k: w for k, w in v.items() if k != "params"}

    def loss(params, state):
        out = model.apply({"params": params, **state}, x, train=True,
                          rngs={"dropout": jax.random.key(3)}, mutable=list(state))
        return jnp.sum(out[0] ** 2)

    return evaluate(jax.grad(loss), v["params"], state)


# Two classifiers run for real (the frozen U-Net is the cascade's, whatever classifier it
# feeds); the large ones are traced only, so the suite does not compile ResNet50 and
# DenseNet121 for a property they share.
@pytest.mark.parametrize("name", ["proposed", "fc_net"])
def test_cascade_classifiers_take_image_and_mask_and_leave_the_unet_alone(name):
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
    g = _cascade_grads(_cascade(name), x, lambda f, *a: jax.jit(f)(*a))
    assert _count(g["unet"]) > 0
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree_util.tree_leaves(g["unet"]))
    assert any(float(jnp.abs(a).max()) > 0.0 for a in jax.tree_util.tree_leaves(g["classifier"]))


@pytest.mark.parametrize("name", sorted(set(method.LABELS) - {"proposed", "fc_net"}))
def test_every_baseline_cascade_traces_with_gradients_for_each_parameter(name):
    x = jnp.zeros((2, 32, 32, 1), jnp.float32)
    g = _cascade_grads(_cascade(name), x, jax.eval_shape)
    assert _count(g["classifier"]) > 0 and _count(g["unet"]) > 0


# ----------------------------------------------------------------------------- configs


BASELINE_FILES = sorted((ROOT / "configs" / "baselines").glob("shrey2020_*.py"))


@pytest.mark.parametrize("arg", ["tiny", None, "paper", "tiny,fold=3,steps=2,steps2=1"])
def test_configs_build_and_variants_share_the_unet(arg):
    c = load_config("configs/shrey2020.py", arg)
    specs = dict(stages.stage_specs(c))
    assert list(specs) == ["unet", "screen", "classify", "find"]
    assert c.data.nodule_mask == "disc" and c.sampler.slice_context == 5
    # The find stage applies the classifier stage's network: its crop and mask threshold.
    find = stages.stage_config(c, "find", specs["find"])
    assert method.find_settings(find).crop == int(find.data.patch_size_zyx[-1])
    # The classifier's ROIs sit on their nodules whatever the U-Net's crops do.
    assert stages.stage_config(c, "classify", specs["classify"]).augment.positive \
        .translate_mm == 0.0
    cls = stages.stage_config(c, "classify", specs["classify"])
    assert cls.sampler.name == "nodule_roi" and tuple(cls.sampler.roi_class_repeat) == (3, 1)
    assert tuple(cls.model.unet_features) == tuple(c.model.features)
    assert set(c.cv.variants) == set(method.LABELS) - {"proposed"}
    for vname in c.cv.variants:
        v = stages.variant_config(c, vname)
        vs = dict(stages.stage_specs(v))
        for s in ("unet", "screen"):
            assert stages.fingerprint(v, s, vs) == stages.fingerprint(c, s, specs)
        assert stages.fingerprint(v, "classify", vs) != stages.fingerprint(c, "classify", specs)
    with pytest.raises(ValueError, match="unknown config arg"):
        load_config("configs/shrey2020.py", "tiny,bogus=1")


def test_score_arg_changes_the_find_stage_alone():
    """``:score=mean`` rescoring a finished run with --restart reruns `find` only."""
    c = load_config("configs/shrey2020.py", "tiny")
    m = load_config("configs/shrey2020.py", "tiny,score=mean")
    cs, ms = dict(stages.stage_specs(c)), dict(stages.stage_specs(m))
    for s in ("unet", "screen", "classify"):
        assert stages.fingerprint(m, s, ms) == stages.fingerprint(c, s, cs)
    assert stages.fingerprint(m, "find", ms) != stages.fingerprint(c, "find", cs)
    assert method.find_settings(stages.stage_config(m, "find", ms["find"])).score == "mean"
    with pytest.raises(ValueError, match=r"score='max': one of peak \| mean \| volume"):
        load_config("configs/shrey2020.py", "tiny,score=max")


@pytest.mark.parametrize("path", BASELINE_FILES, ids=lambda p: p.stem)
def test_baseline_configs_replace_only_the_classifier(path):
    c = load_config(path.relative_to(ROOT), "tiny")
    m = load_config("configs/shrey2020.py", "tiny")
    name = path.stem.removeprefix("shrey2020_")
    assert c.stages.classify.sections.model.classifier == \
        m.cv.variants[name].stages.classify.sections.model.classifier
    assert not c.cv.variants and c.name == f"shrey2020_{name}_tiny"
    specs, mspecs = dict(stages.stage_specs(c)), dict(stages.stage_specs(m))
    assert stages.fingerprint(c, "unet", specs) == stages.fingerprint(m, "unet", mspecs)


# ----------------------------------------------------------------------------- tables


def test_tables_put_the_paper_beside_ours(tmp_path):
    c = load_config("configs/shrey2020.py", "tiny")
    ev = {"precision": 0.5, "precision_lo": 0.25, "precision_hi": 0.75, "sensitivity": 1.0,
          "f1": 2 / 3, "accuracy": 0.6, "roc_auc": 0.7}
    rec = {"fold": 0, "stages": {
        "unet": {"eval/seg": {"dice": 0.4}},
        "screen": {"rule": {"sensitivity": 0.9, "specificity": 0.8, "precision": 0.3},
                   "slice_roc_auc": 0.85, "dice_pooled": 0.35},
        "classify": {"eval/cls": ev, "eval/size": {**ev, "accuracy": 0.8}}},
        "variants": {"resnet50": {"stages": {"classify": {"eval/cls": {**ev, "f1": 0.25}}}}}}
    out = method.write_tables(c, str(tmp_path), [rec], {"files": {}})
    md = (tmp_path / "cv" / "shrey2020_tables.md").read_text(encoding="utf-8")
    assert "| proposed (3 conv + FC) | paper | 98.00 | 98.00 | 98.00 | 97.96 | 95.67 |" in md
    assert "| proposed (3 conv + FC) | ours (1 fold) | 50.00 [25.00-75.00] | 100.00" in md
    assert "| ResNet50 | paper | 71.25 | 71.93 | 71.57 | 77.14 | – |" in md
    assert "| ResNet50 | ours (1 fold) | 50.00 [25.00-75.00] | 100.00 [–-–] | 25.00" in md
    assert "| DenseNet121 | paper |" in md and "| DenseNet121 | ours" not in md
    # The yardstick: no paper row, ours from the classify stage's "size" evaluator.
    assert "| diameter alone (yardstick) | ours (1 fold) | 50.00 [25.00-75.00]" in md
    assert "| 80.00 [–-–] | 70.00 [–-–] |" in md
    assert "| sensitivity | 0.9000 |" in md and "| slice dice | 0.4000 |" in md
    data = json.loads((tmp_path / "cv" / "shrey2020_tables.json").read_text(encoding="utf-8"))
    assert data["classifiers"]["resnet50"]["f1"] == 0.25
    assert (tmp_path / "cv" / "shrey2020_tables.png").stat().st_size > 0
    assert out["files"]["tables_md"].endswith("shrey2020_tables.md")


def test_nodule_components_keep_big_enough_blobs_by_peak():
    from lungjax.tasks.screening import nodule_components

    prob = np.zeros((6, 40, 40), np.float32)
    zz, yy, xx = np.mgrid[:6, :40, :40]
    disc = (yy - 10) ** 2 + (xx - 10) ** 2 <= 5 ** 2  # radius 5 px on slices 1-3
    prob[1:4][disc[1:4]] = 0.8
    prob[2, 10, 10] = 0.95
    prob[4, 30:32, 30:32] = 0.99  # 4 voxels, the highest peak
    prob[0, 35, 5] = 0.9  # one voxel: below min_voxels
    s = dict(threshold=0.5, min_voxels=3)
    mask, centres, score, diam = nodule_components(prob, (2.0, 0.5, 0.5), **s)
    np.testing.assert_allclose(score, [0.99, 0.95], rtol=1e-6)
    np.testing.assert_allclose(centres, [[4, 30.5, 30.5], [2, 10, 10]], atol=1e-6)
    # The disc's area (81 pixels of 0.25 mm^2) as a diameter: 2 sqrt(A / pi).
    assert diam[1] == pytest.approx(2 * np.sqrt(81 * 0.25 / np.pi))
    assert mask.sum() == 4 + 3 * 81 and mask[0, 35, 5] == 0
    _, centres, _, _ = nodule_components(prob, (2.0, 0.5, 0.5), min_voxels=3,
                                         max_nodules=1)
    assert len(centres) == 1
    none = nodule_components(np.zeros((2, 8, 8), np.float32), (1, 1, 1), **s)
    assert none[1].shape == (0, 3) and not none[0].any()
    # The other scores: the disc's mean (242 voxels at 0.8, one at 0.95) is below the
    # small blob's 0.99; its expected volume (197.75 mm^3 against 1.98) is far above.
    _, centres, score, _ = nodule_components(prob, (2.0, 0.5, 0.5), score="mean", **s)
    np.testing.assert_allclose(score, [0.99, (242 * 0.8 + 0.95) / 243], rtol=1e-6)
    _, centres, score, _ = nodule_components(prob, (2.0, 0.5, 0.5), score="volume", **s)
    volume = np.array([242 * 0.8 + 0.95, 4 * 0.99]) * 0.5
    np.testing.assert_allclose(score, volume / (volume + np.pi / 6 * 125), rtol=1e-6)
    np.testing.assert_allclose(centres[0], [2, 10, 10], atol=1e-6)
    with pytest.raises(ValueError, match="nodule score 'max'"):
        nodule_components(prob, (2.0, 0.5, 0.5), score="max")
