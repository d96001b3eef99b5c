"""configs/shrey2020.py:tiny end to end through lungjax.stages, trained once for the
module: U-Net, slice screening, classifier and the baseline classifiers as CV variants
sharing the U-Net, the whole method on held-out scans, the paper's tables, a rerun that
skips every finished stage, and the export run on a new scan file."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from lungjax import stages

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(cache_dir):
    spec = importlib.util.spec_from_file_location("shrey_cfg", ROOT / "configs" / "shrey2020.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.data.cache_dir = cache_dir
    c.cv.folds = (0,)
    # Two baseline classifiers as cv variants: ResNet50, VGG16 and DenseNet121 go through
    # the same variant path and would only add their compilation time to the suite
    # (their construction and gradients: tests/test_shrey2020.py).
    with c.unlocked():
        c.cv.variants = {k: c.cv.variants[k].to_dict() for k in ("fc_net", "encoder_decoder_fc")}
    return c


@pytest.fixture(scope="module")
def tiny_cv(tmp_path_factory, tiny_data_cache):
    root = tmp_path_factory.mktemp("shrey2020")
    c = tiny_config(tiny_data_cache)
    report = stages.run("cv", c, str(root / "cv"))
    return c, root / "cv", report


def test_tiny_cv_runs_every_stage_and_variant(tiny_cv):
    c, cv, report = tiny_cv
    fold = json.loads((cv / "fold_0" / stages.FOLD_RECORD).read_text(encoding="utf-8"))
    assert fold["stage_order"] == ["unet", "screen", "classify", "find"]
    assert fold["stages"]["unet"]["step"] == c.train.num_steps
    assert 0.0 <= fold["stages"]["unet"]["eval/seg"]["dice"] <= 1.0
    screen = fold["stages"]["screen"]
    assert screen["slices"] > screen["nodule_slices"] > 0
    r = screen["rule"]
    assert r["threshold"] == 0.35 and r["tp"] + r["fp"] + r["tn"] + r["fn"] == screen["slices"]
    assert len(screen["sweep"]) == 19 and 0.0 <= screen["dice_pooled"] <= 1.0
    assert (cv / "fold_0" / "screen" / "threshold_sweep.png").stat().st_size > 0
    assert json.loads((cv / "fold_0" / "screen" / "screening.json").read_text(
        encoding="utf-8"))["rule"] == r
    assert fold["stages"]["classify"]["step"] == c.stages.classify.sections.train.num_steps
    assert "eval/cls" in fold["stages"]["classify"]
    # The diameter-alone yardstick on the same held-out ROIs, fitted on the training ones.
    size = fold["stages"]["classify"]["eval/size"]
    assert size["count"] == fold["stages"]["classify"]["eval/cls"]["count"]
    assert size["threshold_mm"] > 0 and 0.0 <= size["accuracy"] <= 1.0
    # every baseline trained its own classify stage and shared the U-Net and screening
    for vname in c.cv.variants:
        v = fold["variants"][vname]
        assert v["dirs"]["unet"] == fold["dirs"]["unet"]
        assert v["dirs"]["screen"] == fold["dirs"]["screen"]
        assert v["dirs"]["classify"] == str(cv / "fold_0" / vname / "classify")
        assert v["stages"]["classify"]["step"] == c.stages.classify.sections.train.num_steps
        assert "find" not in v["stages"]  # the classifier comparison stops at "classify"
    md = (cv / "cv" / "shrey2020_tables.md").read_text(encoding="utf-8")
    assert "97.96" in md and "| fully connected | ours (1 fold)" in md
    assert (cv / "cv" / "shrey2020_tables.png").stat().st_size > 0
    assert (cv / "cv" / "cv_report.md").is_file()
    assert set(report["classifiers"]) == {"proposed", "size_rule", *c.cv.variants}
    assert "| diameter alone (yardstick) | ours (1 fold)" in md


def test_tiny_trained_unet_beats_step0_on_held_out_crops(tiny_cv):
    """The U-Net of the trained tiny method against the same U-Net at step 0, by the
    stage's own held-out evaluator (crops of the held-out scans, never trained on):
    its pixel AUC must rise. A network that learns nothing keeps its step-0 ranking."""
    from conftest import assert_beats_step0

    c, cv, _ = tiny_cv
    fold = json.loads((cv / "fold_0" / stages.FOLD_RECORD).read_text(encoding="utf-8"))
    assert_beats_step0(c, "unet", "seg", fold["stages"]["unet"]["eval/seg"], "pixel_auc",
                       0.05)


def test_classifier_kept_the_trained_unet(tiny_cv):
    from lungjax.checkpointing import restore_params

    _, cv, _ = tiny_cv
    unet = restore_params(str(cv / "fold_0" / "unet" / "checkpoints"))["params"]["unet"]
    cls = restore_params(str(cv / "fold_0" / "classify" / "checkpoints"))["params"]["unet"]
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(unet), jax.tree_util.tree_leaves(cls)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rerun_skips_finished_stages(tiny_cv, capsys):
    c, cv, _ = tiny_cv
    before = json.loads((cv / "fold_0" / stages.FOLD_RECORD).read_text(encoding="utf-8"))
    rec = stages.run("train", c, str(cv / "fold_0"))
    out = capsys.readouterr().out
    for name in c.stage_order:
        assert f"{name}: done" in out
    assert rec["stages"]["screen"]["rule"] == before["stages"]["screen"]["rule"]
    assert rec["stages"]["classify"]["eval/cls"] == before["stages"]["classify"]["eval/cls"]
    assert rec["result"]["eval/find"] == before["result"]["eval/find"]


def test_find_stage_scores_nodules_of_the_held_out_scans(tiny_cv):
    """The whole method on the held-out scans: marks in world mm with the U-Net's peak,
    a diameter and a malignant probability, scored against the annotated nodules."""
    from lungjax.data.tables import read_marks_csv

    _, cv, _ = tiny_cv
    fold = json.loads((cv / "fold_0" / stages.FOLD_RECORD).read_text(encoding="utf-8"))
    find = fold["stages"]["find"]
    ev = find["eval/find"]
    assert ev["n_nodules"] >= 1 and 0 <= ev["n_found"] <= ev["n_nodules"]
    assert 0.0 <= ev["cpm_lo"] <= ev["cpm"] <= ev["cpm_hi"] <= 1.0
    marks = read_marks_csv(find["submission_csv"])
    assert set(np.unique(marks.uid)) <= set(fold["uids"]) and len(marks) == find["marks"]
    header = pathlib.Path(find["submission_csv"]).read_text(encoding="utf-8").split("\n")[0]
    assert header.endswith("probability,diameter_mm,malignancy_probability")
    assert np.all((marks.probability >= 0.5) & (marks.probability <= 1.0))


def test_export_runs_the_method_on_a_new_scan_file(tiny_cv, tmp_path):
    """``python -m lungjax.detect`` on the export: the nodule mask on the scan's own grid,
    the marks with their malignancy, the suspicious slices in world z, a PNG; equal to
    the find stage's marks on the same scan (same networks, same preprocessing)."""
    import SimpleITK as sitk

    from lungjax import detect
    from lungjax.data.luna16 import Luna16Dataset
    from lungjax.data.store import read_manifest
    from lungjax.data.tables import read_marks_csv
    from lungjax.train_data import prepare_data

    c, cv, _ = tiny_cv
    run = cv / "fold_0"
    fold = json.loads((run / stages.FOLD_RECORD).read_text(encoding="utf-8"))
    sidecars = stages.run("export", c, str(run))
    assert set(sidecars) == {"find"} and sidecars["find"]["find"]["rule"] == 0.35
    uid = fold["uids"][0]
    scan = Luna16Dataset.open(read_manifest(prepare_data(c))["source_root"]).scan_path(uid)
    out = tmp_path / "predict"
    assert detect.main(["--model", str(run / "export"), "--scan", scan, "--out", str(out)]) == 0
    mask = sitk.ReadImage(str(out / "masks" / f"{uid}_nodules.mhd"))
    original = sitk.ReadImage(scan)
    assert mask.GetSize() == original.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), original.GetOrigin())
    got = read_marks_csv(str(out / "submission.csv"))
    stage = read_marks_csv(fold["stages"]["find"]["submission_csv"])
    want = stage.select(stage.uid == uid).xyz
    assert len(got) == len(want)
    if len(want):  # the scan read from its file lands where the store's copy did
        d = np.linalg.norm(got.xyz[:, None] - want[None], axis=-1).min(axis=1)
        assert np.all(d < 1.5), d
    text = (out / "submission.csv").read_text(encoding="utf-8").split("\n")[0]
    assert text.endswith("diameter_mm,malignancy_probability")
    slices = (out / "scans" / f"{uid}_suspicious_slices.csv").read_text(
        encoding="utf-8").split("\n")
    assert slices[0] == "world_z_mm,max_probability"
    rec = json.loads((out / "predict.json").read_text(encoding="utf-8"))["scans"][uid]
    assert rec["suspicious_slices"] == len([r for r in slices[1:] if r])
    assert rec["suspicious_slices"] <= rec["slices"]
    assert (out / f"{uid}.png").stat().st_size > 0


def test_no_patient_in_both_the_classifier_training_and_the_held_out_scans(tiny_cv):
    """Split by patient, as the paper: the generated scans reuse real LIDC nodules, so a
    training ROI whose LIDC patient also gave a held-out nodule is left out."""
    from lungjax.data import dense_sampling as ds
    from lungjax.data.sampler import SamplerConfig
    from lungjax.data.store import PatchStore
    from lungjax.train_data import held_out_uids, prepare_data

    c, _, _ = tiny_cv
    cfg = stages.stage_config(c, "classify", dict(stages.stage_specs(c))["classify"])
    store = PatchStore.open(prepare_data(cfg))
    held = held_out_uids(cfg, store)
    train = [u for u in store.uids() if u not in held]
    patients = ds.nodule_patients(store, store.uids())
    # Every stored nodule of the generated data is matched to its LIDC patient.
    assert all(len(patients[u]) == len(store.scan(u).nodules_world) for u in store.uids())
    assert not any(p == u for u in store.uids() for p in patients[u])
    data = ds.RoiTrainData(cfg, store, train, held)
    held_patients = {p for u in held for p in patients[u]}
    pool, smp = data.sampler.pool, data.sampler
    assert len(pool)
    # Each ROI's patient: the stored nodule it is centred on.
    rows_patients = set()
    for r in pool:
        s = int(r["scan"])
        j = np.argmin(np.linalg.norm(smp.scans[s].nodules_zyx - r["center_zyx"], axis=1))
        rows_patients.add(patients[smp.uids[s]][j])
    assert rows_patients and not rows_patients & held_patients
    # Leaving out a patient that a training nodule comes from removes its ROIs.
    some = next(iter(rows_patients))
    cut = ds.roi_sampler(store, train, SamplerConfig.from_config(cfg), 8,
                         exclude_patients=[some])
    every = ds.roi_sampler(store, train, SamplerConfig.from_config(cfg), 8)
    assert cut.left_out >= 1 and len(cut.pool) == len(every.pool) - cut.left_out
