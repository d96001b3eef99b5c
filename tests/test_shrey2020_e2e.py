"""configs/shrey2020.py:tiny end to end through lungjax.stages, trained once for the
module: U-Net, slice screening, classifier and the baseline classifiers as CV variants
sharing the U-Net, the paper's tables, and a rerun that skips every finished stage."""

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
    assert fold["stage_order"] == ["unet", "screen", "classify"]
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
    # every baseline trained its own classify stage and shared the U-Net and screening
    for vname in c.cv.variants:
        v = fold["variants"][vname]
        assert v["dirs"]["unet"] == fold["dirs"]["unet"]
        assert v["dirs"]["screen"] == fold["dirs"]["screen"]
        assert v["dirs"]["classify"] == str(cv / "fold_0" / vname / "classify")
        assert v["stages"]["classify"]["step"] == c.stages.classify.sections.train.num_steps
    md = (cv / "cv" / "shrey2020_tables.md").read_text(encoding="utf-8")
    assert "97.96" in md and "| fully connected | ours (1 fold)" in md
    assert (cv / "cv" / "shrey2020_tables.png").stat().st_size > 0
    assert (cv / "cv" / "cv_report.md").is_file()
    assert set(report["classifiers"]) == {"proposed", *c.cv.variants}


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
    assert rec["result"]["eval/cls"] == before["result"]["eval/cls"]
