"""xie2018 tiny end to end on the generated tiny dataset: train through one anchor-update
round (provisional test over the training scans -> false positives become sampling
anchors), resume mid-round on the same anchors, whole-scan detection + FROC, and the
Table 1 report (single model, fixed anchors, ensemble)."""

import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from lungjax import modes, train as train_lib
from lungjax.checkpointing import Checkpointer, restore_params
from lungjax.data.sampler import HARD_NEG, NODULE

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def xie_config(arg="tiny"):
    spec = importlib.util.spec_from_file_location("xie2018_cfg", ROOT / "configs" / "xie2018.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xie_data_cache"))


def _host(workdir, step):
    return Checkpointer(pathlib.Path(workdir) / "checkpoints").restore_host(step)


def test_tiny_anchor_rounds_resume_evaluate_table1(tmp_path, cache_dir):
    c = xie_config()
    c.data.cache_dir = cache_dir
    c.train.keep_checkpoints = 10
    spr, n = c.sampler.steps_per_round, c.train.num_steps
    assert 0 < spr < n, "the tiny run must cross one round boundary"
    run_a = tmp_path / "cv" / "fold_0"
    engine = train_lib.build_engine(c)

    summary = modes.train(c, str(run_a), engine=engine)
    assert summary["step"] == n and not summary["preempted"]

    # Round 0 trained on ground-truth anchors only; the boundary's provisional test made
    # the false positives anchors of round 1 and is recorded in the checkpoint.
    h0 = _host(run_a, spr)
    assert h0["round"] == 0
    kinds0 = np.asarray(h0["sampler"]["arrays"]["pool"]["kind"])
    assert not np.any(kinds0 == HARD_NEG)
    idx0 = np.asarray(h0["sampler"]["arrays"]["index"]["kind"])
    assert np.all(idx0 == NODULE)
    h1 = _host(run_a, spr + 1)
    assert h1["round"] == 1
    kinds1 = np.asarray(h1["sampler"]["arrays"]["pool"]["kind"])
    n_fp = int(np.sum(kinds1 == HARD_NEG))
    assert n_fp > 0
    prov = h1["sampler"]["provisional"]["round_1"]
    assert prov["fp_anchors"] == n_fp and len(np.asarray(prov["score"])) >= n_fp
    assert np.any(np.asarray(h1["sampler"]["arrays"]["index"]["kind"]) == HARD_NEG)

    # Resume mid-round 1 (a copy cut after step spr + 1): same round, same anchors, no
    # second provisional test, and the same final weights as the uninterrupted run.
    run_b = tmp_path / "resumed"
    (run_b / "checkpoints").mkdir(parents=True)
    for d in (run_a / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) <= spr + 1:
            shutil.copytree(d, run_b / "checkpoints" / d.name)
    result = train_lib.train_and_evaluate(c, str(run_b), engine=engine)
    assert result["step"] == n
    hb = _host(run_b, n)
    ha = _host(run_a, n)
    assert hb["round"] == ha["round"] == (n - 1) // spr
    for key in ("center_zyx", "kind", "sample_id"):
        np.testing.assert_array_equal(hb["sampler"]["arrays"]["pool"][key],
                                      ha["sampler"]["arrays"]["pool"][key])
    assert set(hb["sampler"]["provisional"]) == {"round_1"}
    np.testing.assert_array_equal(hb["sampler"]["provisional"]["round_1"]["centre_zyx"],
                                  prov["centre_zyx"])
    pa, pb = restore_params(str(run_a / "checkpoints"))["params"], \
        restore_params(str(run_b / "checkpoints"))["params"]
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                                   atol=1e-6), pa, pb)

    # Whole-scan detection of the held-out fold through the anchor-detector branch.
    det = summary["detection"]
    assert 0.0 <= det["cpm"] <= 1.0 and det["scans"] == 1 and det["marks"] > 0
    record = json.loads((run_a / "eval" / "froc.json").read_text(encoding="utf-8"))
    assert record["cpm"] == pytest.approx(det["cpm"]) and len(record["sensitivities"]) == 7
    sub = (run_a / "eval" / "submission.csv").read_text(encoding="utf-8").splitlines()
    assert sub[0].startswith("seriesuid,coordX,coordY,coordZ,probability")

    # Table 1 over fold 0. The fold runs are done already (a finished fold is skipped), so
    # the ablation folder holds a copy of the single model: this checks the report and
    # the ensemble detection (two identical members = the single model's marks).
    c.cv.folds = (0,)
    shutil.copytree(run_a, tmp_path / "cv" / "fixed_anchors" / "fold_0")
    report = modes.cross_validate(c, str(tmp_path / "cv"))
    assert set(report["systems"]) == {"single model", "fixed anchors", "ensemble"}
    table = tmp_path / "cv" / "table1" / "cv_report.md"
    assert table.is_file() and "ensemble" in table.read_text(encoding="utf-8")
    ens = (tmp_path / "cv" / "ensemble" / "fold_0" / "submission.csv").read_text(encoding="utf-8").splitlines()
    single_rows = sorted(sub[1:])
    assert len(ens) - 1 == len(single_rows)
    s_single = sorted(float(r.split(",")[-1]) for r in sub[1:])
    s_ens = sorted(float(r.split(",")[-1]) for r in ens[1:])
    np.testing.assert_allclose(s_ens, s_single, rtol=1e-4, atol=1e-6)
