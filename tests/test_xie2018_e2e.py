"""xie2018 tiny end to end on the generated tiny dataset: train through one anchor-update
round (provisional test over the training scans -> false positives become sampling
anchors), resume mid-round on the same anchors, whole-scan detection + FROC, the Table 1
report (single model, a trained fixed-anchor ablation, the ensemble of the two), and the
trained networks against the same network at step 0 on held-out patches.

The tiny model is trained once per module (``tiny``) and Table 1 run once (``table1``);
the tests read what those left."""

import importlib.util
import json
import pathlib
import shutil
import types

import jax
import numpy as np
import pytest

from lungjax import stages, train as train_lib
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
def cache_dir(tiny_data_cache):
    return tiny_data_cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cache_dir):
    """The tiny variant (config seed) trained once on fold 0, in ``<cv>/fold_0``."""
    c = xie_config()
    c.data.cache_dir = cache_dir
    c.train.keep_checkpoints = 10  # every step's checkpoint (checkpoint_every = 1)
    cv = tmp_path_factory.mktemp("xie_cv")
    engines = {}  # the runner's compiled engine, reused by the tests
    rec = stages.run_fold(c, str(cv / "fold_0"), engines=engines)
    (engine,) = engines.values()
    return types.SimpleNamespace(config=c, cv=cv, run=cv / "fold_0" / "detector",
                                 engine=engine, summary=rec["stages"]["detector"], rec=rec)


@pytest.fixture(scope="module")
def table1(tiny):
    """Table 1 over fold 0: the method's fold is done (skipped); the fixed-anchor ablation
    trains its own fold 0 at the tiny budget; the ensemble detects with both."""
    c = tiny.config.copy_and_resolve_references()
    c.cv.folds = (0,)
    report = stages.cross_validate(c, str(tiny.cv))
    fold = tiny.cv / "fold_0"
    return types.SimpleNamespace(report=report, ablation=fold / "fixed_anchors" / "detector",
                                 ablation_eval=fold / "fixed_anchors" / "detect" / "eval",
                                 ensemble=tiny.cv / "ensemble" / "fold_0")


def _host(workdir, step):
    return Checkpointer(pathlib.Path(workdir) / "checkpoints").restore_host(step)


def _params(workdir, step=None):
    return restore_params(str(pathlib.Path(workdir) / "checkpoints"), step)["params"]


def _max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def _marks(path):
    """Submission rows as (N, 4) float (x, y, z, probability), sorted."""
    rows = pathlib.Path(path).read_text(encoding="utf-8").splitlines()[1:]
    arr = np.array([[float(v) for v in r.split(",")[1:5]] for r in rows]).reshape(-1, 4)
    return arr[np.lexsort(arr.T[::-1])]


def _same_marks(a, b) -> bool:
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-9)


def _trained_state(engine, workdir):
    """The final TrainState of a run of ``engine``'s config (same model / optimizer)."""
    ck = Checkpointer(pathlib.Path(workdir) / "checkpoints")
    try:
        _, state, _ = ck.restore(engine.abstract_state)
    finally:
        ck.close()
    return state


def test_tiny_anchor_rounds_resume_evaluate(tmp_path, tiny):
    c, engine, summary, run_a = tiny.config, tiny.engine, tiny.summary, tiny.run
    spr, n = c.sampler.steps_per_round, c.train.num_steps
    assert 0 < spr < n, "the tiny run must cross one round boundary"
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
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                                   atol=1e-6),
                           _params(run_a), _params(run_b))

    # Whole-scan detection of the held-out fold by the anchor detector (the "detect" stage).
    det = tiny.rec["result"]
    assert 0.0 <= det["cpm"] <= 1.0 and len(det["uids"]) == 1 and det["marks"] > 0
    ev_dir = tiny.cv / "fold_0" / "detect" / "eval"
    record = json.loads((ev_dir / "froc.json").read_text(encoding="utf-8"))
    assert record["cpm"] == pytest.approx(det["cpm"]) and len(record["sensitivities"]) == 7
    sub = (ev_dir / "submission.csv").read_text(encoding="utf-8").splitlines()
    assert sub[0].startswith("seriesuid,coordX,coordY,coordZ,probability")


def test_table1_trains_the_ablation_and_ensembles_two_different_members(tiny, table1):
    c, main, abl = tiny.config, tiny.run, table1.ablation
    spr, n = c.sampler.steps_per_round, c.train.num_steps
    report = table1.report
    assert set(report["systems"]) == {"single model", "fixed anchors", "ensemble"}
    table = tiny.cv / "table1" / "cv_report.md"
    assert table.is_file() and "ensemble" in table.read_text(encoding="utf-8")

    # The ablation was trained here at the tiny budget (its own fold run, log and
    # detection), not copied from the single model: its anchors were never updated.
    done = json.loads((abl / stages.STAGE_RECORD).read_text(encoding="utf-8"))
    assert done["step"] == n
    abl_det = json.loads((table1.ablation_eval.parent / stages.STAGE_RECORD).read_text(
        encoding="utf-8"))
    assert len(abl_det["uids"]) == 1
    assert json.loads((abl / "config.json").read_text(encoding="utf-8"))["sampler"][
        "update_anchors"] is False
    logged = [json.loads(line)["step"] for line in
              (abl / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(set(logged)) == list(range(1, n + 1))
    h_abl, h_main = _host(abl, n), _host(main, n)
    assert h_abl["round"] == h_main["round"] == (n - 1) // spr
    assert not h_abl["sampler"].get("provisional")
    assert not np.any(np.asarray(h_abl["sampler"]["arrays"]["pool"]["kind"]) == HARD_NEG)
    assert np.all(np.asarray(h_abl["sampler"]["arrays"]["index"]["kind"]) == NODULE)
    assert np.any(np.asarray(h_main["sampler"]["arrays"]["pool"]["kind"]) == HARD_NEG)

    # Same seed and round-0 anchors: the two runs agree up to the round boundary and part
    # after it, when only the single model samples its false positives.
    assert _max_abs_diff(_params(main, spr), _params(abl, spr)) < 1e-5
    assert _max_abs_diff(_params(main), _params(abl)) > 1e-4

    # The ensemble is built from those two different members; its marks are neither's.
    m_main = _marks(tiny.cv / "fold_0" / "detect" / "eval" / "submission.csv")
    m_abl = _marks(table1.ablation_eval / "submission.csv")
    m_ens = _marks(table1.ensemble / "submission.csv")
    assert len(m_main) and len(m_abl) and len(m_ens)
    assert not _same_marks(m_main, m_abl)
    assert not _same_marks(m_ens, m_main) and not _same_marks(m_ens, m_abl)


def test_tiny_trained_beats_step0_on_held_out_patches(tiny, table1):
    """Held-out patch loss, trained vs step 0 (same config, seed, engine and patches).

    Compared: the mean task loss (OHEM noduleness cross entropy + smooth-L1 box
    regression, the objective xie2018 trains) over the patch evaluator's held-out patches
    (``evals.patches``' evaluator: nodule-centred and candidate-negative 32^3 patches of
    fold 0's scan, never trained on) with the initial state the engine starts from
    (config seed) and with the final states of the single model and of the fixed-anchor
    ablation. A network that learns nothing (params unchanged, zero gradients, a frozen
    optimizer) keeps the step-0 loss and fails the strict margin.

    Why not the FROC: after 4 steps the held-out CPM is 0 for the trained and the step-0
    network alike (neither puts a mark on one of the scan's 3 nodules), so it cannot tell
    them apart. The held-out loss went down at every seed tried (0-3) by 2e-4 to 9e-4
    (seed 0: 0.91080 -> 0.91021); the patch AUC did not move consistently.
    """
    from lungjax.train_data import build_train_data

    c, engine = tiny.config, tiny.engine
    assert c.seed == 0
    data = build_train_data(c)  # held-out patches of fold 0 (data.eval_patches)
    ev = train_lib.PatchClassificationEvaluator()
    step0 = ev(engine, engine.init_state(), data)
    trained = ev(engine, _trained_state(engine, tiny.run), data)
    ablation = ev(engine, _trained_state(engine, table1.ablation), data)
    print(f"held-out patch loss: step 0 {step0['loss']:.6f}, trained {trained['loss']:.6f}, "
          f"fixed-anchor ablation {ablation['loss']:.6f} ({int(step0['count'])} patches)")
    assert step0["count"] == trained["count"] == ablation["count"] > 0
    assert trained["loss"] < step0["loss"] - 2e-4
    assert ablation["loss"] < step0["loss"] - 2e-4


def test_exported_detector_runs_on_a_scan_file(tiny, tmp_path):
    """``--mode=export`` of the fold, then ``python -m lungjax.detect`` on the held-out
    scan's .mhd: the anchor detector exported for any multiple of its coarsest stride."""
    from lungjax import detect
    from lungjax.data.luna16 import Luna16Dataset
    from lungjax.data.store import read_manifest
    from lungjax.data.tables import read_marks_csv
    from lungjax.train_data import prepare_data

    c = tiny.config
    fold = tiny.cv / "fold_0"
    sidecars = stages.run("export", c, str(fold))
    assert sidecars["detect"]["coarsest_stride"] == 16
    uid = tiny.rec["uids"][0]
    scan = Luna16Dataset.open(read_manifest(prepare_data(c))["source_root"]).scan_path(uid)
    out = tmp_path / "predict" / "submission.csv"
    assert detect.main(["--model", str(fold / "export"), "--scan", scan,
                        "--out", str(tmp_path / "predict"), "--save-maps"]) == 0
    got = read_marks_csv(str(out))
    # --save-maps: the finest head's noduleness on the scan's own grid
    from lungjax.data.io import read_scan

    ran = json.loads((tmp_path / "predict" / "predict.json").read_text(encoding="utf-8"))
    dense, ct = read_scan(ran["scans"][uid]["maps"]["noduleness"]), read_scan(scan)
    assert dense.array.shape == ct.array.shape and dense.array.dtype == np.float32
    np.testing.assert_allclose(dense.geometry.origin, ct.geometry.origin)
    assert 0 <= dense.array.min() <= dense.array.max() <= 1
    assert len(got) > 0 and set(np.unique(got.uid)) == {uid}
    assert np.all((got.probability >= 0) & (got.probability <= 1))
    assert out.read_text(encoding="utf-8").splitlines()[0].split(",")[-1] == "diameter_mm"
