"""A new method is a config + its models + its own stage kind, with no edit to the runner,
loop, steps or checkpointing: a toy two-stage method defined entirely here (segment
nodules, then classify the segmented regions) runs end to end through the stages runner
on the generated tiny dataset, cross-validation report included."""

import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lungjax import stages
from lungjax.registry import MODELS, STAGES

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- models


class ToySegmenter(nn.Module):
    """(B, D, H, W, 1) -> (B, D, H, W, 1) nodule logits, same size (SAME padding)."""

    features: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.features, (3, 3, 3))(x))
        return nn.Conv(1, (1, 1, 1))(x)


class ToyClassifier(nn.Module):
    """(B, D, H, W, 1) patch -> (B, 2) nodule / not-nodule logits."""

    features: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.features, (3, 3, 3), strides=2)(x))
        return nn.Dense(2)(jnp.mean(x, axis=(1, 2, 3)))


for _name, _cls in (("toy_segmenter", ToySegmenter), ("toy_classifier", ToyClassifier)):
    if _name not in MODELS:
        MODELS.register(_name, _cls)


# ----------------------------------------------------------------------------- stage kind


def _regions(model, variables, volume, top_fraction):
    """Connected regions of the ``top_fraction`` most nodule-like voxels of the segmented
    volume (a toy network after a few steps is not calibrated to 0.5): (K, 3) voxel
    centroids, (K,) scores."""
    from scipy import ndimage

    logits = jax.jit(lambda v, x: model.apply(v, x))(variables, volume[None, ..., None])
    prob = np.asarray(jax.nn.sigmoid(logits))[0, ..., 0]
    labels, n = ndimage.label(prob >= np.quantile(prob, 1.0 - top_fraction))
    if not n:
        return np.zeros((0, 3)), np.zeros(0)
    idx = np.arange(1, n + 1)
    centres = np.asarray(ndimage.center_of_mass(prob, labels, idx)).reshape(-1, 3)
    return centres, np.asarray(ndimage.maximum(prob, labels, idx), np.float64)


def segment_regions(run: stages.StageRun) -> dict:
    """Segments the held-out scans (and, for a later ``hard_negatives_from``, the training
    scans) with the network of stage ``network``; each connected region becomes a
    candidate, saved as a "screen" stage saves them."""
    from lungjax import train
    from lungjax.data.coords import voxel_to_world
    from lungjax.methods.candidates import save_candidates
    from lungjax.tasks.screening import Candidates

    ctx = run.ctx
    model = train.build_model(run.config)
    variables, _ = stages.restore_variables(run.dirs[run.spec["network"]])
    parts = [("test", ctx.test_uids)]
    if run.needs_train_candidates and not ctx.evaluate_only:
        parts.append(("train", ctx.train_uids))
    found = 0
    for part, uids in parts:
        cands, seconds = {}, {}
        for uid in uids:
            vox, score = _regions(model, variables, ctx.store.read_volume(uid), 1e-4)
            world = voxel_to_world(vox, ctx.store.scan(uid).geometry).reshape(-1, 3)
            cands[uid] = Candidates(np.rint(vox).astype(np.int64), vox, world, score)
            seconds[uid] = {"total": 0.0}
            found += len(score)
        save_candidates(str(pathlib.Path(run.dir) / f"candidates_{part}.npz"), cands, seconds)
    return {"regions": found, "summary_line": f"{found} segmented regions"}


if "toy_segment_regions" not in STAGES:
    STAGES.register("toy_segment_regions", segment_regions)


# ----------------------------------------------------------------------------- method


def toy_method(cache_dir):
    spec = importlib.util.spec_from_file_location("toy_base", ROOT / "configs" / "base.py")
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.name = "toy"
    c.data.synthetic_preset = "tiny"
    c.data.cache_dir = cache_dir
    c.data.patch_size_zyx = (16, 16, 16)
    c.data.eval_patches = 16
    c.model.name = "toy_segmenter"
    c.task = dict(name="segmentation", num_classes=1, loss="bce_dice", switch_step=0,
                  dice_smooth=1.0, threshold=0.5)
    c.optimizer.learning_rate = 1e-2
    c.train.batch_size = 8
    c.train.num_steps = 6
    c.train.log_every = 3
    c.train.checkpoint_every = 3
    c.train.progress_bar = False
    c.train.async_checkpoint = False
    c.data.batch_mask = True  # the segmenter learns the store's nodule masks
    c.evals = dict(seg=dict(type="segmentation", every_steps=0, threshold=0.5, spacing=()))
    c.detection.max_scans = 1
    c.stages.seg = dict(kind="train")
    c.stages.regions = dict(kind="toy_segment_regions", network="seg")
    c.stages.cls = dict(
        kind="train", hard_negatives_from="regions", replace=("model", "task", "evals"),
        sections=dict(model=dict(name="toy_classifier", features=4),
                      task=dict(name="classification", num_classes=2,
                                loss="softmax_cross_entropy", positive_class=1),
                      evals=dict(patches=dict(type="patch_classification", every_steps=0)),
                      data=dict(batch_mask=False),
                      sampler=dict(positive_sources=("nodules",),
                                   negative_mix=(("hard", 1.0),),
                                   random_negatives_per_scan=0)))
    c.stages.score = dict(kind="classify_candidates", network="cls", candidates_from="regions",
                          batch=8, evaluator="froc", progress=False)
    c.stage_order = ("seg", "regions", "cls", "score")
    c.cv.folds = (0, 1)
    return c


@pytest.fixture(scope="module")
def toy_cv(tmp_path_factory, tiny_data_cache):
    root = tmp_path_factory.mktemp("toy_method")
    c = toy_method(tiny_data_cache)
    report = stages.run("cv", c, str(root / "cv"))
    return c, root / "cv", report


def test_toy_two_stage_method_runs_end_to_end_with_cv_report(toy_cv):
    c, cv, report = toy_cv
    assert len(report["folds"]) == 2 and "cpm" in report["metrics"]
    assert (cv / "cv" / "cv_report.md").is_file() and (cv / "cv" / "cv_report.json").is_file()
    for k in (0, 1):
        fold = json.loads((cv / f"fold_{k}" / stages.FOLD_RECORD).read_text(encoding="utf-8"))
        assert fold["final_stage"] == "score" and fold["stage_order"] == list(c.stage_order)
        assert set(fold["stages"]) == set(c.stage_order)
        seg = fold["stages"]["seg"]
        assert seg["step"] == c.train.num_steps
        assert 0.0 <= seg["eval/seg"]["dice"] <= 1.0  # the segmentation evaluator ran
        assert fold["stages"]["cls"]["step"] == c.train.num_steps
        assert 0.0 <= fold["result"]["cpm"] <= 1.0
        # every held-out region was scored by the classifier: one mark per region
        from lungjax.data.tables import read_marks_csv

        marks = read_marks_csv(fold["result"]["submission_csv"])
        regions = np.load(cv / f"fold_{k}" / "regions" / "candidates_test.npz")
        assert len(marks.uid) == len(regions["score"]) > 0
        # the classifier trained in its own folder on the segmenter's training-scan regions
        # (hard negatives where they miss the nodules)
        train_regions = np.load(cv / f"fold_{k}" / "regions" / "candidates_train.npz")
        assert len(train_regions["score"]) > 0
        cfg = json.loads((cv / f"fold_{k}" / "cls" / "config.json").read_text(encoding="utf-8"))
        assert cfg["model"]["name"] == "toy_classifier" and cfg["data"]["batch_mask"] is False


def test_toy_method_rerun_skips_finished_stages(toy_cv, capsys):
    c, cv, _ = toy_cv
    cfg = c.copy_and_resolve_references()
    cfg.data.fold = 0
    before = json.loads((cv / "fold_0" / stages.FOLD_RECORD).read_text(encoding="utf-8"))
    rec = stages.run("train", cfg, str(cv / "fold_0"))
    out = capsys.readouterr().out
    for name in c.stage_order:
        assert f"{name}: done" in out
    assert rec["result"]["cpm"] == before["result"]["cpm"]
    assert rec["stages"]["cls"]["step"] == before["stages"]["cls"]["step"]


def test_changed_stage_config_fails_then_restart_reruns_it_and_later_stages(toy_cv, tmp_path):
    import shutil

    c, cv, _ = toy_cv
    fold = tmp_path / "fold_0"  # a copy: the shared fold stays as the cv run left it
    shutil.copytree(cv / "fold_0", fold)
    cfg = c.copy_and_resolve_references()
    cfg.data.fold = 0
    cfg.stages.cls.sections.train = dict(num_steps=c.train.num_steps + 1)
    with pytest.raises(stages.StageConfigError, match=r"stage 'cls' was run with another "
                                                      r"configuration \(train.num_steps: 6 -> 7\)"):
        stages.run("train", cfg, str(fold))
    rec = stages.run("train", cfg, str(fold), restart=True)
    assert rec["stages"]["cls"]["step"] == 7
    moved = sorted(p.name.split(".old-")[0] for p in fold.iterdir() if ".old-" in p.name)
    assert moved == ["cls", "score"]  # the changed stage and the one after it; seg kept
    assert (fold / "seg" / stages.STAGE_RECORD).is_file()


# ----------------------------------------------------------------------------- faults

FAULT_RUN = ROOT / "tests" / "fault_run.py"


def _fault_run(workdir, cache_dir, mode="none", k=0):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(FAULT_RUN), str(workdir), cache_dir, mode,
                           str(k)], env=env, capture_output=True, text=True, timeout=600)


def _outcome(fold_dir):
    """What a fold computed: its result without timings and paths, and its submission."""

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if "seconds" not in k}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return None if isinstance(v, str) and "/" in v else v

    fold = json.loads((fold_dir / stages.FOLD_RECORD).read_text(encoding="utf-8"))
    return strip(fold["result"]), pathlib.Path(fold["result"]["submission_csv"]).read_bytes()


def test_full_disk_then_three_sigkills_then_resume_equals_an_uninterrupted_run(
        tiny_data_cache, tmp_path):
    """One fold of the toy method, interrupted four times in a row, each at a seeded file
    write of the run in progress: first a write that fails as on a full disk (the run
    stops in one line, no partial file is left, every record written before is whole),
    then three SIGKILLs (the first in the resumed run, the others in the runs resumed
    after them); a last run finishes the fold with the result and submission of an
    uninterrupted run of the same fold."""
    reference = _fault_run(tmp_path / "ref", tiny_data_cache)
    assert reference.returncode == 0, reference.stderr[-2000:]
    n_writes = int(reference.stdout.strip().splitlines()[-1].removeprefix("writes="))
    rng = np.random.default_rng(24)
    work = tmp_path / "w"
    k = int(rng.integers(3, n_writes - 2))
    proc = _fault_run(work, tiny_data_cache, "enospc", k)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr.strip().splitlines()[-1]
    assert not list(work.rglob(".tmp-*"))
    for f in work.rglob("*.json"):
        json.loads(f.read_text(encoding="utf-8"))  # whole, never half-written
    # Each kill point lies within the writes the interrupted run still has ahead of it:
    # every process redoes at least the writes after the last completed one.
    done = k - 1
    for _ in range(3):
        k = int(rng.integers(2, max(3, (n_writes - done) // 2)))
        proc = _fault_run(work, tiny_data_cache, "kill", k)
        assert proc.returncode == -9, (k, proc.stderr[-2000:])
        done += k - 1
    proc = _fault_run(work, tiny_data_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(work.rglob(".tmp-*"))
    assert _outcome(work) == _outcome(tmp_path / "ref")
