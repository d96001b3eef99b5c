"""A one-network method end to end on the generated tiny dataset: generate -> prepare ->
train (through the store pipeline) -> screen held-out scans -> FROC -> export -> cv
report, through the stages runner (``train`` then ``detect``)."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from lungjax import stages

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_engine import tiny_config  # noqa: E402

pytestmark = pytest.mark.slow


def screening_method():
    """The dou2017 FCN alone as a method: train it, detect with its score volume."""
    c = tiny_config()
    c.stages = dict(net=dict(kind="train"),
                    detect=dict(kind="detect", network="net", evaluator="froc"))
    c.stage_order = ("net", "detect")
    c.cv.variants = {}
    c.cv.report = ""
    return c


@pytest.fixture(scope="module")
def cache_dir(tiny_data_cache):
    return tiny_data_cache


def test_tiny_train_evaluate_export_cv(tmp_path, cache_dir):
    c = screening_method()
    c.data.cache_dir = cache_dir
    c.data.fold = 0
    workdir = tmp_path / "cv" / "fold_0"

    rec = stages.run("train", c, str(workdir))
    summary = rec["stages"]["net"]
    assert summary["step"] == c.train.num_steps and not summary["preempted"]
    assert 0.0 <= summary["eval/patches"]["accuracy"] <= 1.0
    det = rec["result"]
    assert rec["final_stage"] == "detect"
    assert 0.0 <= det["cpm"] <= 1.0 and len(det["uids"]) >= 1
    out = workdir / "detect" / "eval"
    assert (out / "submission.csv").is_file()
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for png in (workdir / "net" / "learning_curve.png", out / "learning_curve_net.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # beside the FROC too
    record = json.loads((out / "froc.json").read_text(encoding="utf-8"))
    assert record["cpm"] == pytest.approx(det["cpm"])
    done = json.loads((workdir / "net" / stages.STAGE_RECORD).read_text(encoding="utf-8"))
    assert done["step"] == c.train.num_steps

    # --mode=evaluate re-detects with the trained network: the same marks
    again = stages.run("evaluate", c, str(workdir))
    assert again["result"]["cpm"] == det["cpm"] and again["result"]["marks"] == det["marks"]

    # export reproduces the checkpoint's predictions
    sidecars = stages.run("export", c, str(workdir))
    assert sidecars["detect"]["output_mapping"]["stride_zyx"] == [1, 2, 2]
    from lungjax.checkpointing import restore_params
    from lungjax.export import load_predictor
    from lungjax.steps import make_predict_fn
    from lungjax import train

    predict, _ = load_predictor(str(workdir / "export" / "detect"))
    ck = restore_params(str(workdir / "net" / "checkpoints"))
    x = np.random.default_rng(0).random((2, 10, 30, 30, 1), dtype=np.float32)
    ref = jax.jit(make_predict_fn(train.build_model(c), train.build_task(c)))(
        {"params": ck["params"]}, x)
    np.testing.assert_allclose(predict(x), np.asarray(ref), rtol=1e-5, atol=1e-6)

    # a rerun with a field that changes results fails in one line naming it, before
    # anything is written; one that does not (logging) is allowed
    c.cv.folds = (0, 1)
    steps = c.train.num_steps
    c.train.num_steps = steps + 1
    with pytest.raises(stages.StageConfigError,
                       match=rf"stage 'net' was run with another configuration \(train.num_steps: "
                             rf"{steps} -> {steps + 1}\); rerun with --restart"):
        stages.cross_validate(c, str(tmp_path / "cv"))
    assert not (tmp_path / "cv" / "fold_1").exists()
    c.train.num_steps = steps
    c.train.log_every = 1

    # cv: fold 0 is done (skipped), fold 1 trains; one report over both
    report = stages.cross_validate(c, str(tmp_path / "cv"))
    assert len(report["folds"]) == 2 and "cpm" in report["metrics"]
    assert report["pooled"] is not None  # both folds' marks pooled into one FROC
    assert (tmp_path / "cv" / "cv" / "cv_report.md").is_file()
    assert (tmp_path / "cv" / "cv" / "cv_report.json").is_file()
    assert (tmp_path / "cv" / "fold_1" / stages.FOLD_RECORD).is_file()


def test_stage_list_errors_name_the_stage_and_field():
    c = screening_method()
    c.stages.detect.netwrk = "net"
    with pytest.raises(stages.StageError, match=r"config.stages.detect: unknown field\(s\) netwrk"):
        stages.stage_specs(c)
    c = screening_method()
    c.stages.detect.network = "nope"
    with pytest.raises(stages.StageError, match="config.stages.detect.network: 'nope' is not an "
                                                 "earlier stage"):
        stages.stage_specs(c)
    c = screening_method()
    c.stage_order = ("detect", "net")  # detect would apply a network not trained yet
    with pytest.raises(stages.StageError, match="'net' is not an earlier stage"):
        stages.stage_specs(c)
    c = screening_method()
    c.stage_order = ("net",)
    with pytest.raises(stages.StageError, match="config.stage_order"):
        stages.stage_specs(c)
    c = screening_method()
    c.stages.net.kind = "trian"
    with pytest.raises(stages.StageError, match="config.stages.net.kind: 'trian' is not a stage kind"):
        stages.stage_specs(c)
    c = screening_method()
    c.stages.net.sections = dict(trainn=dict(num_steps=3))
    with pytest.raises(stages.StageError, match="config.stages.net.sections.trainn: not a field"):
        stages.stage_config(c, "net", dict(stages.stage_specs(c))["net"])
