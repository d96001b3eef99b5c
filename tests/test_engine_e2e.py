"""dou2017 tiny end to end on the generated tiny dataset: generate -> prepare -> train
(through the store pipeline) -> screen held-out scans -> FROC -> export -> cv report."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from lungjax import modes

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_engine import tiny_config  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    pytest.importorskip("lungjax.data.synthetic",
                        reason="the generated dataset (lungjax.data.synthetic) is not built yet")
    return str(tmp_path_factory.mktemp("data_cache"))


def test_tiny_train_evaluate_export_cv(tmp_path, cache_dir):
    c = tiny_config()
    c.data.cache_dir = cache_dir
    c.data.fold = 0
    workdir = tmp_path / "cv" / "fold_0"

    summary = modes.train(c, str(workdir))
    assert summary["step"] == c.train.num_steps and not summary["preempted"]
    assert 0.0 <= summary["eval/patches"]["accuracy"] <= 1.0
    det = summary["detection"]
    assert 0.0 <= det["cpm"] <= 1.0 and det["scans"] >= 1
    assert (workdir / "eval" / "submission.csv").is_file()
    assert (workdir / "eval" / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for png in ("learning_curve.png", "eval/learning_curve.png"):  # beside the FROC too
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((workdir / "eval" / "froc.json").read_text(encoding="utf-8"))
    assert record["cpm"] == pytest.approx(det["cpm"])
    assert json.loads((workdir / modes.DONE_FILE).read_text(encoding="utf-8"))["step"] == c.train.num_steps

    # export reproduces the checkpoint's predictions
    sidecar = modes.export(c, str(workdir))
    assert sidecar["output_mapping"]["stride_zyx"] == [1, 2, 2]
    from lungjax.checkpointing import restore_params
    from lungjax.export import load_predictor
    from lungjax.steps import make_predict_fn
    from lungjax import train

    predict, _ = load_predictor(str(workdir / "export"))
    ck = restore_params(str(workdir / "checkpoints"))
    x = np.random.default_rng(0).random((2, 10, 30, 30, 1), dtype=np.float32)
    ref = jax.jit(make_predict_fn(train.build_model(c), train.build_task(c)))(
        {"params": ck["params"]}, x)
    np.testing.assert_allclose(predict(x), np.asarray(ref), rtol=1e-5, atol=1e-6)

    # cv: fold 0 is done (skipped), fold 1 trains; one report over both
    c.cv.folds = (0, 1)
    c.train.num_steps = 4
    report = modes.cross_validate(c, str(tmp_path / "cv"))
    assert len(report["folds"]) == 2 and "cpm" in report["metrics"]
    assert report["pooled"] is not None  # both folds' marks pooled into one FROC
    assert (tmp_path / "cv" / "cv" / "cv_report.md").is_file()
    assert (tmp_path / "cv" / "cv" / "cv_report.json").is_file()
    assert (tmp_path / "cv" / "fold_1" / modes.DONE_FILE).is_file()
