"""dou2017 end to end (lungjax.methods.dou2017): stage configs, candidate patches, and the
``tiny`` variant through every mode: generate -> prepare -> train the FCN (OSF) -> screen
training and held-out scans -> train ResNet+HL on nodules + stage-1 false positives ->
score held-out candidates -> FROC -> export -> cross-validation report with ablations."""

import importlib.util
import json
import pathlib
import types

import jax
import numpy as np
import pytest

from lungjax import stages
from lungjax.data.tables import read_marks_csv
from lungjax.methods import candidates as st
from lungjax.tasks.screening import crop_patch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(arg="tiny", path="configs/dou2017.py"):
    spec = importlib.util.spec_from_file_location("cfg_dou2017", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _scan_file(c, uid):
    """The generated dataset's .mhd of ``uid`` (what a user would point the CLI at)."""
    from lungjax.data.luna16 import Luna16Dataset
    from lungjax.data.store import read_manifest
    from lungjax.train_data import prepare_data

    return Luna16Dataset.open(read_manifest(prepare_data(c))["source_root"]).scan_path(uid)


def _stage(c, name):
    return stages.stage_config(c, name, dict(stages.stage_specs(c))[name])


def test_fpr_stage_config_is_the_papers_stage2_on_the_fcn_trunk():
    c = _config("")
    specs = dict(stages.stage_specs(c))
    assert [n for n, _ in stages.stage_specs(c)] == ["fcn", "screen", "fpr", "classify"]
    assert specs["fpr"]["init_from"] == "fcn" and specs["fpr"]["hard_negatives_from"] == "screen"
    assert specs["classify"]["network"] == "fpr" and specs["classify"]["evaluator"] == "froc"
    c2 = _stage(c, "fpr")
    assert c2.model.name == "dou2017_fpr_resnet_hl" and c2.task.name == "hybrid"
    assert tuple(c2.model.trunk_features) == tuple(c.model.features[:3])
    assert [tuple(k) for k in c2.model.trunk_kernels] == [tuple(k) for k in c.model.kernels[:3]]
    assert tuple(c2.data.patch_size_zyx) == (24, 60, 60) == tuple(c2.task.patch_size_zyx)
    assert c2.task.lam == 0.5 and c2.optimizer.weight_decay == pytest.approx(2e-4)
    assert tuple(c2.train.init_paths) == ("conv1:conv1", "conv2:conv2", "conv3:conv3")
    assert not c2.train.osf.enabled and c.train.osf.enabled
    # Stage-1 false positives and the dataset's candidate negatives (the paper: the first)
    assert dict(c2.sampler.negative_mix) == {"hard": 1.0, "candidate": 1.0}
    assert dict(_stage(_config("paper"), "fpr").sampler.negative_mix) == {"hard": 1.0}
    # stage-1 fields the stage-2 network does not take are gone, merged ones kept
    assert "features" not in c2.model and c2.data.fold == c.data.fold
    assert c2.augment.positive.translate_nodule_fraction == 1.0
    assert c2.augment.positive.rot90 and tuple(c2.augment.positive.scale_range) == (0.9, 1.1)
    # the classify stage applies the fpr network: its config is fpr's
    assert _stage(c, "classify").model.name == c2.model.name
    no_osf = stages.variant_config(c, "no_osf")
    assert _stage(no_osf, "fcn").train.osf.enabled is False
    bad = _config("")
    bad.stages.fpr.sections.model.name = "dou2017_fpr_vgg"
    with pytest.raises(ValueError, match="dou2017_fpr_vgg"):
        _stage(bad, "fpr")
    paper = _config("paper")
    assert tuple(paper.model.features) == (64, 64, 150, 150)
    assert paper.detection.threshold == 0.85
    assert tuple(_stage(paper, "fpr").model.stage_features) == (64, 128)


def test_variants_share_the_stages_they_do_not_change():
    c = _config("tiny")
    specs = dict(stages.stage_specs(c))
    main = {n: stages.fingerprint(c, n, specs) for n in specs}
    for variant, changed in (("deepnet", {"fpr", "classify"}), ("resnet", {"fpr", "classify"}),
                             ("no_osf", {"fcn", "screen", "fpr", "classify"})):
        v = stages.variant_config(c, variant)
        vs = dict(stages.stage_specs(v))
        diff = {n for n in vs if stages.fingerprint(v, n, vs) != main[n]}
        assert diff == changed, variant


def test_baseline_configs_change_one_thing():
    base = _config("tiny")
    for net in ("deepnet", "resnet", "resnet_hl"):
        c = _config("tiny", f"configs/baselines/dou2017_{net}.py")
        assert _stage(c, "fpr").model.name == f"dou2017_fpr_{net}" and c.train.osf.enabled
        assert c.name == f"dou2017_{net}_tiny"
    c = _config("tiny", "configs/baselines/dou2017_fcn_no_osf.py")
    assert not c.train.osf.enabled
    assert _stage(c, "fpr").model.name == _stage(base, "fpr").model.name


def test_crop_matches_store_read_patch_convention():
    vol = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    p = crop_patch(vol, (2, 3, 3), (3, 4, 4))  # start = center - size // 2 = (1, 1, 1)
    np.testing.assert_array_equal(p, vol[1:4, 1:5, 1:5])
    edge = crop_patch(vol, (0, 0, 6), (2, 2, 2))  # start (-1, -1, 5): outside is 0
    expect = np.zeros((2, 2, 2), np.float32)
    expect[1, 1, :] = vol[0, 0, 5:7]
    np.testing.assert_array_equal(edge, expect)


def test_candidates_round_trip(tmp_path):
    from lungjax.tasks.screening import Candidates

    a = Candidates(np.zeros((2, 3), np.int64), np.array([[1., 2, 3], [4, 5, 6]]),
                   np.array([[-1., 0, 1], [2, 3, 4]]), np.array([0.9, 0.7]))
    b = Candidates(np.zeros((0, 3), np.int64), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))
    path = str(tmp_path / "c.npz")
    st.save_candidates(path, {"u1": a, "u2": b}, {"u1": {"total": 1.5}, "u2": {"total": 2.0}})
    back = st.load_candidates(path)
    assert list(back) == ["u1", "u2"] and back["u2"]["score"].shape == (0,)
    np.testing.assert_array_equal(back["u1"]["voxel_zyx"], a.voxel_zyx)
    np.testing.assert_array_equal(back["u1"]["world_xyz"], a.world_xyz)
    assert back["u1"]["seconds"] == 1.5
    marks = st.candidate_marks(back)
    assert list(marks.uid) == ["u1", "u1"] and np.allclose(marks.probability, [0.9, 0.7])


@pytest.fixture(scope="module")
def tiny_fold(tmp_path_factory, tiny_data_cache):
    """The ``tiny`` method (config seed) trained once on fold 0, in ``<root>/cv/fold_0``;
    ``rec`` is the fold record ``--mode=train`` returned."""
    c = _config("tiny")
    root = tmp_path_factory.mktemp("dou2017_tiny")
    c.data.cache_dir = tiny_data_cache
    c.detection.max_scans = 1
    c.cv.folds = (0,)
    fold_dir = root / "cv" / "fold_0"
    rec = stages.run("train", c, str(fold_dir))
    return types.SimpleNamespace(config=c, root=root, fold_dir=fold_dir, rec=rec)


@pytest.mark.slow
def test_tiny_end_to_end_train_export_cv(tiny_fold):
    c = tiny_fold.config.copy_and_resolve_references()
    root, fold_dir, rec = tiny_fold.root, tiny_fold.fold_dir, tiny_fold.rec
    res = rec["result"]
    assert rec["final_stage"] == "classify"
    assert 0.0 <= res["cpm"] <= 1.0 and len(res["sensitivities"]) == 7
    s1 = rec["stages"]["screen"]["stats"]
    assert s1["n_scans"] == 1 and s1["n_nodules"] >= 1 and s1["fps_per_scan"] >= 0
    # stage 2 scored every held-out stage-1 candidate, with a regressed diameter, and
    # merged the marks within the regressed diameter of a higher-scoring one (the record
    # keeps the CPM before the merge)
    cands = st.load_candidates(str(fold_dir / "screen" / "candidates_test.npz"))
    sub = read_marks_csv(res["submission_csv"])
    assert 0 < len(sub) <= sum(len(v["score"]) for v in cands.values())
    assert 0.0 <= res["cpm_unmerged"] <= 1.0
    header = pathlib.Path(res["submission_csv"]).read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[-1] == "diameter_mm"
    png = pathlib.Path(res["submission_csv"]).with_name("froc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("learning_curve_fcn.png", "learning_curve_fpr.png"):
        assert png.with_name(name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(np.unique(sub.uid)) <= set(rec["uids"])
    u = rec["uids"][0]
    secs = res["seconds_per_scan"][u]
    assert secs["total"] == pytest.approx(secs["screen"] + secs["classify"])
    # stage 2 trained on the training scans' stage-1 candidates: the training-scan
    # candidates exist and none of them is a held-out scan
    train_c = st.load_candidates(str(fold_dir / "screen" / "candidates_train.npz"))
    assert train_c and not set(train_c) & set(rec["uids"])
    fold = json.loads((fold_dir / stages.FOLD_RECORD).read_text(encoding="utf-8"))
    assert fold["result"]["cpm"] == res["cpm"]
    for name in ("fcn", "screen", "fpr", "classify"):  # every stage left its record
        assert (fold_dir / name / stages.STAGE_RECORD).is_file()

    # a rerun skips every finished stage and returns the same record
    again = stages.run("train", c, str(fold_dir))
    assert again["result"]["cpm"] == res["cpm"]
    assert again["stages"]["fpr"]["step"] == rec["stages"]["fpr"]["step"]

    # export: stage 2 gives (probability, diameter, centre offset z, y, x) per candidate
    # patch, as the checkpoint
    out = stages.run("export", c, str(fold_dir))
    assert out["screen"]["output_mapping"]["stride_zyx"] == [1, 2, 2]
    method = json.loads((fold_dir / "export" / stages.METHOD_JSON).read_text(encoding="utf-8"))
    assert [s["name"] for s in method["stages"]] == ["screen", "classify"]
    from lungjax import train
    from lungjax.checkpointing import restore_params
    from lungjax.export import load_predictor

    predict, sidecar = load_predictor(str(fold_dir / "export" / "classify"))
    x = np.random.default_rng(0).random((3, 24, 60, 60, 1), dtype=np.float32)
    y = np.asarray(predict(x))
    assert y.shape == (3, 5) and np.all((y[:, 0] >= 0) & (y[:, 0] <= 1)) and np.all(y[:, 1] > 0)
    assert sidecar["regressed_position"] and sidecar["merge_within_diameter"]
    c2 = _stage(c, "fpr")
    ck = restore_params(str(fold_dir / "fpr" / "checkpoints"))
    model, task = train.build_model(c2), train.build_task(c2)
    ref = jax.jit(lambda v, x: task.decode(model.apply(v, x, train=False)))(
        {"params": ck["params"], **ck["model_state"]}, x)
    np.testing.assert_allclose(y[:, 0], np.asarray(ref["score"]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(y[:, 2:], np.asarray(ref["offset_zyx"]), rtol=1e-4, atol=1e-4)

    # the whole method on a scan file, from the folder export printed: screening, then
    # each candidate's patch scored by the stage-2 network, with its diameter
    from lungjax import detect

    out_csv = root / "detect" / "submission.csv"
    u = rec["uids"][0]
    assert detect.main(["--model", str(fold_dir / "export"), "--scan", _scan_file(c, u),
                        "--out", str(root / "detect"), "--save-maps"]) == 0
    assert (root / "detect" / f"{u}.png").is_file()
    # --save-maps: the FCN's nodule probability on the scan's own grid
    from lungjax.data.io import read_scan

    ran = json.loads((root / "detect" / "predict.json").read_text(encoding="utf-8"))
    prob = read_scan(ran["scans"][u]["maps"]["screen_probability"])
    scan = read_scan(_scan_file(c, u))
    assert prob.array.shape == scan.array.shape
    np.testing.assert_allclose(prob.geometry.spacing, scan.geometry.spacing)
    assert prob.array.dtype == np.float32 and 0 <= prob.array.min() <= prob.array.max() <= 1
    got = read_marks_csv(str(out_csv))
    header = out_csv.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[-1] == "diameter_mm" and set(np.unique(got.uid)) <= {u}
    assert np.all((got.probability >= 0) & (got.probability <= 1))
    print(f"detect CLI on {u}: {len(got)} marks; the fold's stage-2 marks of that scan: "
          f"{int(np.sum(sub.uid == u))}")

    # cv: fold 0's method is done (reused); the variants train (their own stages at a few
    # steps: the method's are unchanged, so they are not rerun) and the paper's three
    # tables + FROC curves are written
    v = c.cv.variants
    v.no_osf.stages.fcn.sections.train.num_steps = 4
    for net in ("deepnet", "resnet"):
        v[net].stages.fpr.sections.train = dict(num_steps=2)
    report = stages.run("cv", c, str(root / "cv"))
    tables = (root / "cv" / "cv" / "dou2017_tables.md").read_text(encoding="utf-8")
    assert "without OSF" in tables and "with OSF" in tables
    for name in ("DeepNet", "ResNet", "ResNet+HL"):
        assert f"| {name} |" in tables
    assert "paper (Dou et al. 2017)" in tables
    assert (root / "cv" / "cv" / "froc_cv.png").is_file()
    assert (root / "cv" / "cv" / "froc_systems.png").is_file()
    assert report["pooled"] is not None and "stage1_no_osf_sensitivity" in report["metrics"]
    fold = json.loads((fold_dir / stages.FOLD_RECORD).read_text(encoding="utf-8"))
    assert set(fold["variants"]) == {"no_osf", "deepnet", "resnet"}
    assert fold["result"]["cpm"] == res["cpm"]  # the trained fold was reused
    # a variant runs only the stages it changes: deepnet trains its own fpr on the
    # method's fcn and screening
    dn = fold["variants"]["deepnet"]["dirs"]
    assert dn["fcn"] == fold["dirs"]["fcn"] and dn["screen"] == fold["dirs"]["screen"]
    assert dn["fpr"] == str(fold_dir / "deepnet" / "fpr")
    assert set(fold["variants"]["no_osf"]["stages"]) == {"fcn", "screen"}


@pytest.mark.slow
def test_tiny_trained_stage1_beats_step0_on_the_held_out_fold(tiny_fold, tmp_path):
    """Stage 1 (the FCN) of the trained tiny method against the same FCN at step 0.

    Same config and seed (the engine's initial state is the step-0 network the trained
    run started from), measured on fold 0's held-out scan only (never trained on):

    * held-out patch AUC: the ``evals.patches`` evaluator over fold 0's nodule and
      candidate-negative 10x30x30 patches; the trained figure is the one the pipeline
      recorded (``fcn/stage.json``), the step-0 one the same evaluator on the
      initial state. Observed: 0.301 at step 0, 0.732 trained.
    * whole-scan screening (``screen_scans``, threshold 0.5, at most 16 candidates per
      scan, as the pipeline): nodules hit by the stage-1 candidates, at no more false
      positives per scan than step 0. Observed: 0/3 at step 0, 1/3 trained, 15 FPs each.

    A network that learns nothing keeps its step-0 ranking and candidates, so both strict
    comparisons fail. Not compared: the final FROC, 0 for the trained pipeline (stage 2,
    4 steps, ranks the one stage-1 hit below 8 false positives) as for step 0.

    Measured beyond this test: the tiny FCN (widths 4-4-8-8, N(0, 0.01) weights, 12 Adam
    steps) improves on the held-out fold at seeds 0 and 1 only; at seeds 2-4 its output
    became constant (held-out AUC exactly 0.5; ReLU biases pushed below the tiny
    activations), so this passes at the config seed, not for any seed.
    """
    from lungjax import train
    from lungjax.checkpointing import Checkpointer
    from lungjax.data.store import PatchStore
    from lungjax.detect import store_screening_stats
    from lungjax.train_data import build_train_data, prepare_data

    c, fold_dir, rec = tiny_fold.config, tiny_fold.fold_dir, tiny_fold.rec
    assert c.seed == 0
    cfg1 = _stage(c, "fcn")
    engine = train.build_engine(cfg1)
    state0 = engine.init_state()

    trained = json.loads((fold_dir / "fcn" / stages.STAGE_RECORD).read_text(
        encoding="utf-8"))["eval/patches"]
    step0 = train.PatchClassificationEvaluator()(engine, state0, build_train_data(cfg1))
    print(f"stage-1 held-out patch AUC: step 0 {step0['auc']:.4f}, trained "
          f"{trained['auc']:.4f} ({int(step0['count'])} patches)")
    assert step0["count"] == trained["count"] > 0
    assert trained["auc"] > step0["auc"] + 0.2

    # The step-0 FCN screens the held-out scan as the pipeline does (from a checkpoint).
    run0 = tmp_path / "stage1_step0"
    ck = Checkpointer(run0 / "checkpoints", async_save=False)
    ck.save(0, state0, host_state={"round": 0})
    ck.close()
    store = PatchStore.open(prepare_data(c))
    det = st.screen_scans(cfg1, str(run0), store, rec["uids"], progress=False)
    s0, s1 = (store_screening_stats(det.marks, store, rec["uids"]),
              rec["stages"]["screen"]["stats"])
    print(f"stage-1 held-out screening: step 0 {s0['n_detected']}/{s0['n_nodules']} hit, "
          f"{s0['fps_per_scan']:.0f} FPs/scan; trained {s1['n_detected']}/{s1['n_nodules']} "
          f"hit, {s1['fps_per_scan']:.0f} FPs/scan")
    assert s0["n_nodules"] == s1["n_nodules"] > 0
    assert s1["n_detected"] > s0["n_detected"]
    assert s1["fps_per_scan"] <= s0["fps_per_scan"]
