"""Sathish et al. 2020 on the stages engine: lung masks as batch targets, the Turing-test
pairs, the configs, and the tiny method end to end (adversarial SUMNet on lung slices,
then LeNet on lung patches; rerun skips, evaluate)."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax import stages, train
from lungjax.data import pipeline as pl
from lungjax.data import sampler as smp
from lungjax.methods.sathish2020 import turing_pairs
from test_dense_targets import config as dense_config
from test_dense_targets import make_dense_store

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def method(arg="tiny"):
    return _load(ROOT / "configs" / "sathish2020.py").get_config(arg)


# ---------------------------------------------------------------------------------
# Data: the lung mask as "mask", opt-in
# ---------------------------------------------------------------------------------


def test_lung_mask_target_is_the_stored_lung_under_the_same_crop(tmp_path):
    store = make_dense_store(str(tmp_path / "st"))
    cfg = dense_config(patch=(12, 12))
    cfg.augment = dict(positive=dict(), negative=dict())  # centres stay where sampled
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=3)

    def read(targets):
        return list(iter(pl.build_train_dataset(cfg, store, index, seed=3, targets=targets)))

    nodules = read(pl.Targets(mask=True))
    lung = read(pl.Targets(mask=True, mask_array="lung"))
    assert pl.Targets.from_config(method()).mask_array == "lung"
    assert pl.Targets().mask_array == "nodules"  # the default batches are unchanged
    n = 0
    for b_nod, b_lung, rows in zip(nodules, lung,
                                   np.split(index.samples, len(index.samples) // 4)):
        for k in b_nod:  # same draws: every other key bit-identical
            if k != "mask":
                np.testing.assert_array_equal(b_nod[k], b_lung[k], err_msg=k)
        for mask, row in zip(b_lung["mask"], rows):
            centre = np.rint(row["center_zyx"]).astype(int)
            want = store.read_patch(index.uids[row["scan"]], centre, (1, 12, 12), "lung")[0]
            np.testing.assert_array_equal(mask, (want > 0.5).astype(np.uint8))
            n += 1
    assert n and any(b["mask"].any() and not b["mask"].all() for b in lung)
    with pytest.raises(ValueError, match="batch_mask_array"):
        pl.Targets(mask=True, mask_array="heart")


# ---------------------------------------------------------------------------------
# The Turing-test pairs
# ---------------------------------------------------------------------------------


def test_turing_pairs_put_the_truth_in_the_labelled_channel():
    truth = jnp.stack([jnp.ones((2, 2)), jnp.zeros((2, 2)), jnp.ones((2, 2))])
    pred = jnp.full((3, 2, 2), 0.25)
    pairs, labels = turing_pairs(truth, pred, jax.random.PRNGKey(0))
    assert pairs.shape == (3, 2, 2, 2) and labels.shape == (3, 2)
    for i in range(3):
        k = int(np.argmax(labels[i]))
        np.testing.assert_array_equal(pairs[i, ..., k], truth[i])
        np.testing.assert_array_equal(pairs[i, ..., 1 - k], pred[i])
    np.testing.assert_array_equal(np.sum(labels, -1), 1.0)
    # the order is drawn per slice: both orders occur over a larger batch
    _, many = turing_pairs(jnp.zeros((64, 1, 1)), jnp.ones((64, 1, 1)), jax.random.PRNGKey(1))
    assert 0 < float(jnp.sum(many[:, 0])) < 64


# ---------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["tiny", "", "paper", "tiny,fold=2,steps=3,steps2=5"])
def test_variants_are_complete(arg):
    c = method(arg)
    train.validate_config(c)
    assert c.train.step == "turing_test" and c.sathish2020.alpha == 0.001
    # The paper's Adam 1e-4; the tiny plumbing run's 40 steps at 1e-3.
    assert c.optimizer.learning_rate == (1e-3 if arg.startswith("tiny") else 1e-4)
    assert c.data.batch_mask_array == "lung"
    assert c.networks.discriminator.model.name == "sathish2020_turing"
    specs = dict(stages.stage_specs(c))
    assert list(specs) == ["seg", "cls", "find"]
    assert (specs["find"]["network"], specs["find"]["segmenter_from"]) == ("cls", "seg")
    # --mode=cv: each baseline segmenter as a variant, without the adversary
    for name in ("unet", "r2unet", "sumnet"):
        v = stages.variant_config(c, name)
        seg = stages.stage_config(v, "seg", dict(stages.stage_specs(v))["seg"])
        assert seg.model.name == f"sathish2020_{name}" and seg.train.step == "supervised"
        assert not seg.networks
    assert c.cv.report == "sathish2020_tables"
    cls = stages.stage_config(c, "cls", specs["cls"])
    assert cls.model.name == "sathish2020_lenet" and not cls.networks
    assert tuple(cls.data.patch_size_zyx) == (64, 64) and cls.train.step == "supervised"
    if arg == "paper":
        assert tuple(c.data.patch_size_zyx) == (512, 512) and c.model.features == 64
    if "fold=2" in arg:
        assert (c.data.fold, c.train.num_steps, cls.train.num_steps) == (2, 3, 5)


@pytest.mark.parametrize("name,model", [("unet", "sathish2020_unet"),
                                        ("r2unet", "sathish2020_r2unet"),
                                        ("sumnet", "sathish2020_sumnet")])
def test_baselines_are_the_segmenter_alone(name, model):
    c = _load(ROOT / "configs" / "baselines" / f"sathish2020_{name}.py").get_config("tiny")
    train.validate_config(c)
    assert c.model.name == model and c.train.step == "supervised" and not c.networks
    assert c.stage_order == ("seg",) and c.name == f"sathish2020_{name}"


def test_config_rejects_unknown_args():
    with pytest.raises(ValueError, match="unknown config arg 'colour'"):
        method("tiny,colour=red")
    with pytest.raises(ValueError, match="unknown variant"):
        method("huge")


# ---------------------------------------------------------------------------------
# Whole scans: slices, the patch grid, patch labels
# ---------------------------------------------------------------------------------


def test_segment_slices_pads_to_the_multiple_and_crops_back():
    from lungjax.methods.slices import segment_slices

    vol = np.random.default_rng(0).random((5, 37, 50)).astype(np.float32)
    seen = []

    def predict(x):  # "probability" = the input; records the padded shape
        seen.append(x.shape)
        return x[..., 0]

    out = segment_slices(predict, vol, multiple=16, batch=2)
    # The last call is padded to the batch: one compiled shape per volume size.
    assert seen == [(2, 48, 64, 1)] * 3
    np.testing.assert_array_equal(out, vol)


def test_patch_grid_crops_and_nodule_cells_count_each_nodule_once_per_slice():
    from lungjax.methods.sathish2020 import nodule_cells, patch_grid
    from lungjax.methods.slices import crop_slices

    region = np.zeros((3, 64, 96), bool)
    region[1, :40, :] = True
    centres = patch_grid(region, 32)
    # stride 32, offset 16: rows 16 (48 is outside the region), columns 16, 48, 80
    np.testing.assert_array_equal(centres, [[1, 16, 16], [1, 16, 48], [1, 16, 80]])
    vol = np.arange(3 * 64 * 96, dtype=np.float32).reshape(3, 64, 96)
    p = crop_slices(vol, centres, 8)
    np.testing.assert_array_equal(p[1], vol[1, 12:20, 44:52])
    edge = crop_slices(vol, np.array([[0, 0, 0]]), 4)[0]  # zero-padded beyond the edge
    np.testing.assert_array_equal(edge[:2], 0)
    np.testing.assert_array_equal(edge[2:, 2:], vol[0, :2, :2])
    # a nodule at (1.5, 20, 60) of radius 1: on slice 1, in the cell of (16, 48) only
    hit = nodule_cells(centres, 32, np.array([[1.5, 20.0, 60.0]]), np.array([1.0]))
    np.testing.assert_array_equal(hit, [False, True, False])
    far = nodule_cells(centres, 32, np.array([[3.0, 20.0, 60.0]]), np.array([1.0]))
    assert not far.any()  # two slices away, radius 1


# ---------------------------------------------------------------------------------
# The tiny method end to end
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data_cache):
    root = tmp_path_factory.mktemp("sathish2020")
    c = method("tiny")
    c.data.cache_dir = tiny_data_cache
    record = stages.run("train", c, str(root / "run"))
    return c, root / "run", record


@pytest.mark.slow
def test_tiny_method_trains_both_stages_and_evaluates(tiny_run):
    c, run, rec = tiny_run
    assert rec["stage_order"] == ["seg", "cls", "find"]
    seg, cls = rec["stages"]["seg"], rec["stages"]["cls"]
    assert seg["step"] == c.train.num_steps
    for key in ("segmenter/loss", "segmenter/seg_loss", "segmenter/adv_loss",
                "discriminator/loss", "discriminator/accuracy"):
        assert np.isfinite(seg["train"][key]), key
    ev = seg["eval/seg"]
    assert 0.0 <= ev["dice"] <= 1.0 and 0.0 <= ev["pixel_auc"] <= 1.0 and ev["hd_mm"] >= 0
    assert ev["count"] == c.data.eval_patches
    assert cls["step"] == c.stages.cls.sections.train.num_steps
    ev = cls["eval/cls"]
    for k in ("accuracy", "specificity"):
        assert ev[f"{k}_lo"] <= ev[k] <= ev[f"{k}_hi"]
    # the segmenter and its adversary were checkpointed under their names; the
    # classifier in its own folder
    from lungjax.checkpointing import restore_params

    for net in ("segmenter", "discriminator"):
        assert restore_params(run / "seg" / "checkpoints", network=net)["network"] == net
    cfg = json.loads((run / "cls" / "config.json").read_text(encoding="utf-8"))
    assert cfg["model"]["name"] == "sathish2020_lenet" and cfg["data"]["batch_mask"] is False


@pytest.mark.slow
def test_tiny_trained_segmenter_beats_step0_on_held_out_slices(tiny_run):
    """SUMNet of the trained tiny method (trained against its adversary) against the
    same SUMNet at step 0, by the stage's own held-out evaluator (slices of the held-out
    scans): its lung Dice must rise (the untrained SUMNet already ranks the dark lung
    pixels well, pixel AUC 0.94, but predicts no lung at 0.5: Dice 0.003; 40 steps give
    0.93)."""
    from conftest import assert_beats_step0

    c, _, rec = tiny_run
    assert_beats_step0(c, "seg", "seg", rec["stages"]["seg"]["eval/seg"], "dice", 0.3)


@pytest.mark.slow
def test_tiny_method_rerun_skips_and_evaluate_reuses_the_trained_stages(tiny_run, capsys):
    c, run, rec = tiny_run
    again = stages.run("train", c, str(run))
    out = capsys.readouterr().out
    assert "seg: done" in out and "cls: done" in out and "find: done" in out
    assert again["stages"]["seg"]["eval/seg"] == rec["stages"]["seg"]["eval/seg"]
    evaluated = stages.run("evaluate", c, str(run))
    assert evaluated["stages"]["cls"]["eval/cls"] == rec["stages"]["cls"]["eval/cls"]


@pytest.mark.slow
def test_tiny_method_on_whole_scans_and_on_a_new_scan_file(tiny_run, tmp_path, capsys):
    """The find stage segments every held-out scan and classifies patches inside the
    lungs; its export, run by ``python -m lungjax.detect`` on the scan's .mhd, writes the
    lung mask on the scan's own grid, equal in volume to the stage's on the store grid
    (the same network on the same preprocessed volume), and the patches as CSV."""
    import SimpleITK as sitk
    from conftest import read_on_scan_grid, scan_of

    from lungjax import detect
    from lungjax.data.store import PatchStore
    from lungjax.data.tables import read_marks_csv
    from lungjax.train_data import prepare_data

    c, run, rec = tiny_run
    find = rec["stages"]["find"]
    ev = find["eval/find"]
    assert 0.0 <= ev["dice"] <= 1.0 and ev["n_nodules"] >= 1
    assert 0.0 <= ev["patch_specificity"] <= 1.0
    uid = rec["uids"][0]
    store = PatchStore.open(prepare_data(c))
    stage_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "find" / "masks" / f"{uid}.mha")))
    assert stage_mask.shape == store.read_volume(uid).shape
    patches = read_marks_csv(str(run / "find" / "patches.csv"))
    assert set(np.unique(patches.uid)) <= set(rec["uids"])

    sidecars = stages.run("export", c, str(run))
    assert sidecars["find"]["find"]["segmenter_multiple"] == 32
    scan = scan_of(c, uid)
    out = tmp_path / "predict"
    assert detect.main(["--model", str(run / "export"), "--scan", scan, "--out", str(out),
                        "--no-png"]) == 0
    lung = read_on_scan_grid(out / "masks" / f"{uid}_lung.mhd", scan)
    mm3 = np.prod(lung.GetSpacing())
    on_scan = float(sitk.GetArrayFromImage(lung).sum()) * mm3
    on_store = float(stage_mask.sum()) * np.prod(store.scan(uid).spacing_zyx)
    assert on_scan == pytest.approx(on_store, rel=0.1, abs=50.0)
    marks = read_marks_csv(str(out / "submission.csv"))
    own = patches.select(patches.uid == uid)
    assert len(marks) == len(own)
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert record["scans"][uid]["masks"]["lung"].endswith(f"{uid}_lung.mhd")
    # No score map in this method: --save-maps is refused before any scan runs
    assert detect.main(["--model", str(run / "export"), "--scan", scan, "--out",
                        str(tmp_path / "maps"), "--save-maps"]) == 2
    assert "--save-maps" in capsys.readouterr().err and not (tmp_path / "maps").exists()

    # RISE maps of the two most confident patches, from the same export
    from lungjax import explain

    assert explain.main(["--model", str(run / "export"), "--scan", scan, "--out",
                         str(tmp_path / "rise"), "--top", "2", "--masks", "64"]) == 0
    got = np.load(tmp_path / "rise" / f"{uid}_rise.npz")
    k = min(2, find["patches_scored"][uid])  # the top 2 of the grid the stage scored
    assert k >= 1 and len(got["probability"]) == k and got["saliency"].shape == (k, 64, 64)
    assert np.all(np.diff(got["probability"]) <= 0) and np.isfinite(got["saliency"]).all()
    assert (tmp_path / "rise" / f"{uid}_rise.png").is_file()
    assert explain.main(["--model", str(tmp_path), "--scan", scan, "--out",
                         str(tmp_path / "rise")]) == 2


@pytest.mark.slow
def test_new_scans_with_bad_lung_masks_fail_alone_and_name_the_mask(tiny_run, tmp_path,
                                                                   capsys):
    """A folder of masks for a folder of scans: a mask on another grid than its scan and
    an empty mask each cost only their own scan, with one line naming the mask file; the
    scan with a good mask is written."""
    import shutil

    import SimpleITK as sitk

    from lungjax import detect
    from lungjax.data.luna16 import Luna16Dataset
    from lungjax.data.store import read_manifest
    from lungjax.data.tables import read_marks_csv
    from lungjax.train_data import prepare_data

    c, run, _ = tiny_run
    if not (run / "export").is_dir():
        stages.run("export", c, str(run))
    data = Luna16Dataset.open(read_manifest(prepare_data(c))["source_root"])
    uids = sorted(data.uids)[:3]
    scans, masks = tmp_path / "scans", tmp_path / "masks"
    scans.mkdir()
    masks.mkdir()
    for uid in uids:
        src = pathlib.Path(data.scan_path(uid))
        for f in (src, src.with_suffix(".raw")):
            shutil.copy(f, scans / f.name)
    grid = [sitk.ReadImage(str(scans / f"{u}.mhd")) for u in uids]
    # uids[0]: a good binary mask (the scan's own LUNA16 mask, 0/1)
    good = sitk.ReadImage(data.lung_mask_path(uids[0])) > 0
    sitk.WriteImage(sitk.Cast(good, sitk.sitkUInt8), str(masks / f"{uids[0]}.mhd"))
    # uids[1]: a mask cut 4 slices short (another grid)
    short = sitk.Cast(sitk.ReadImage(data.lung_mask_path(uids[1])) > 0, sitk.sitkUInt8)
    sitk.WriteImage(short[:, :, 4:], str(masks / f"{uids[1]}.mhd"))
    # uids[2]: an empty mask on the scan's own grid
    empty = sitk.Image(grid[2].GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(grid[2])
    sitk.WriteImage(empty, str(masks / f"{uids[2]}.mhd"))
    capsys.readouterr()
    out = tmp_path / "out"
    assert detect.main(["--model", str(run / "export"), "--scan", str(scans),
                        "--lung-mask", str(masks), "--out", str(out), "--no-png"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    bad_grid = [line for line in err if f"{uids[1]}.mhd" in line]
    bad_empty = [line for line in err if f"{uids[2]}.mhd" in line]
    assert len(bad_grid) == 1 and "differs from the scan" in bad_grid[0]
    assert len(bad_empty) == 1 and "empty lung mask" in bad_empty[0]
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert {pathlib.Path(k).stem for k in record["failed"]} == set(uids[1:])
    assert record["scans"][uids[0]]["lung_mask"].endswith(f"{uids[0]}.mhd")
    assert (out / "masks" / f"{uids[0]}_lung.mhd").is_file()
    assert not (out / "masks" / f"{uids[1]}_lung.mhd").exists()
    assert set(np.unique(read_marks_csv(str(out / "submission.csv")).uid)) <= {uids[0]}


def test_cv_tables_put_the_papers_figures_beside_ours(tmp_path):
    """The CV report from two fold records (method + one segmenter variant): first fold,
    mean +- sd over folds, the paper's fold-1 row beside each; Markdown, JSON, plot."""
    from lungjax.methods.sathish2020 import PAPER_SEGMENTATION, cv_tables

    def rec(fold, dice, unet_dice, acc):
        seg = {"dice": dice, "pixel_auc": 0.9, "hd95_mm": 4.0}
        return {"fold": fold,
                "stages": {"seg": {"eval/seg": seg},
                           "cls": {"eval/cls": {"accuracy": acc, "sensitivity": 0.8,
                                                "specificity": 0.7}}},
                "variants": {"unet": {"stages": {"seg": {"eval/seg": {**seg,
                                                                      "dice": unet_dice}}}}}}

    c = method("tiny")
    out = cv_tables(c, str(tmp_path), [rec(1, 0.7, 0.5, 0.6), rec(0, 0.9, 0.6, 0.8)], {})
    seg = out["sathish2020"]["segmentation"]
    assert seg["proposed"]["dice"]["first"] == 0.9  # fold 0 comes first
    assert seg["proposed"]["dice"]["mean_sd"][0] == pytest.approx(0.8)
    assert seg["proposed"]["dice"]["mean_sd"][1] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert seg["unet"]["dice"]["mean_sd"][0] == pytest.approx(0.55)
    assert set(seg) == {"proposed", "unet"}  # variants with no record are left out
    md = (tmp_path / "cv" / "sathish2020_tables.md").read_text(encoding="utf-8")
    assert f"| unet | {PAPER_SEGMENTATION['unet'][0]:.3f} |" in md
    assert "| accuracy | 0.9800 | 0.8000 | 0.7000 +- 0.1414 |" in md
    assert (tmp_path / "cv" / "sathish2020_tables.png").is_file()
