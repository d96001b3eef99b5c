"""Shrey et al. 2020: the suspicious-slice screening stage and the paper's tables.

* Stage kind ``"shrey2020_slice_screen"`` (``config.stages.<s>.network`` = the U-Net's
  "train" stage): the trained U-Net segments every axial slice of the held-out scans; a
  slice is suspicious when its largest predicted nodule probability exceeds
  ``config.screening.threshold`` (0.35 in the paper). A slice is truly positive when the
  store's nodule mask has a voxel on it. Writes ``<stage>/screening.json`` (slice-level
  sensitivity, specificity, precision at the rule's threshold, the threshold sweep, the
  slice ROC AUC, the per-scan and pooled Dice of the predicted volume mask) and
  ``<stage>/threshold_sweep.png``, both atomically.
* Stage kind ``"shrey2020_find"`` (``network`` = the classifier stage,
  ``segmenter_from`` = the U-Net stage): the whole method on the held-out scans, as
  ``python -m lungjax.detect`` runs its export on a new scan: suspicious slices, nodules
  as 3D connected components of the U-Net's mask (world mm, peak probability, diameter),
  each nodule's malignant probability from the classifier on its crop. Writes
  ``<stage>/submission.csv`` and ``<stage>/find.json`` (nodules found, FPs/scan, CPM with
  its bootstrap interval, malignancy AUC over the found nodules).
* CV report ``"shrey2020_tables"`` (``config.cv.report``): the paper's Tables 1 and 2
  (precision, recall, F1, accuracy, ROC AUC) beside ours for the proposed classifier and
  every baseline classifier run as a ``cv.variants`` entry, plus the screening and
  segmentation figures, as ``<workdir>/cv/shrey2020_tables.{md,json,png}``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from lungjax import fileio
from lungjax.atomic import atomic_write_json, atomic_write_text
from lungjax.evaluation.reports import n_folds
from lungjax.methods.slices import segment_slices
from lungjax.registry import CV_REPORTS, EXPORTED_METHODS, STAGE_EXPORTS, STAGES
from lungjax.tasks.screening import nodule_components
from lungjax.steps import forward_apply

# The classifier stage's name in configs/shrey2020.py, its evaluator's name, and the
# screening stage's name: the tables read their records.
CLASSIFY_STAGE = "classify"
CLASSIFY_EVAL = "eval/cls"
SIZE_EVAL = "eval/size"  # the diameter-alone yardstick on the same ROIs
SIZE_ROW = "size_rule"
SCREEN_STAGE = "screen"
UNET_STAGE = "unet"
FIND_STAGE = "find"

# Thresholds of the sweep plot and record.
SWEEP = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2).tolist())

# The paper's figures, percent: precision, recall, F1, accuracy (Tables 1 and 2), AUC
# where reported. Keys are cv.variants names ("proposed" = the method itself).
PAPER = {
    "proposed": dict(precision=98.0, recall=98.0, f1=98.0, accuracy=97.96, roc_auc=95.67),
    "fc_net": dict(precision=92.0, recall=91.0, f1=91.0, accuracy=90.62),
    "encoder_decoder_fc": dict(precision=26.0, recall=51.0, f1=34.0, accuracy=51.02),
    "resnet50": dict(precision=71.25, recall=71.93, f1=71.57, accuracy=77.14),
    "vgg16": dict(precision=75.94, recall=75.86, f1=75.33, accuracy=75.93),
    "densenet121": dict(precision=76.89, recall=76.47, f1=75.80, accuracy=76.50),
}
LABELS = {"proposed": "proposed (3 conv + FC)", "fc_net": "fully connected",
          "encoder_decoder_fc": "encoder-decoder + FC", "resnet50": "ResNet50",
          "vgg16": "VGG16", "densenet121": "DenseNet121"}
# The tables' rows: every classifier, then the yardstick.
ROW_LABELS = {**LABELS, SIZE_ROW: "diameter alone (yardstick)"}
# Our figure for each table column: the classification evaluator's names.
COLUMNS = (("precision", "precision"), ("recall", "sensitivity"), ("f1", "f1"),
           ("accuracy", "accuracy"), ("roc_auc", "roc_auc"))


# ----------------------------------------------------------------------------------
# Slice screening
# ----------------------------------------------------------------------------------


def slice_rule(max_prob: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Slice-level figures of the rule "suspicious when max probability > threshold".

    Args:
      max_prob: (S,) float, each slice's largest predicted nodule probability.
      labels: (S,) 0/1 or bool, 1 = the slice has nodule voxels.
      threshold: the rule's threshold (strictly greater counts as suspicious).

    Returns:
      ``threshold``, ``tp``, ``fp``, ``tn``, ``fn`` and ``sensitivity``, ``specificity``,
      ``precision``, ``suspicious_fraction`` (nan where a denominator is 0).
    """
    p = np.asarray(max_prob, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = p > threshold
    tp, fp = int(np.sum(s & y)), int(np.sum(s & ~y))
    tn, fn = int(np.sum(~s & ~y)), int(np.sum(~s & y))
    ratio = lambda a, b: float(a) / b if b else float("nan")  # noqa: E731
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp), "suspicious_fraction": ratio(tp + fp, len(p))}


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter, total = np.sum(pred & truth), np.sum(pred) + np.sum(truth)
    return 1.0 if total == 0 else float(2 * inter / total)


def plot_sweep(sweep: Sequence[Mapping[str, float]], rule: float, path: str, title: str) -> None:
    """Sensitivity and specificity of the suspicious-slice rule against its threshold,
    the rule's threshold marked; saved atomically to ``path``."""
    from matplotlib.figure import Figure

    from lungjax.evaluation.plots import save_figure

    t = [r["threshold"] for r in sweep]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t, [r["sensitivity"] for r in sweep], "o-", label="sensitivity")
    ax.plot(t, [r["specificity"] for r in sweep], "s-", label="specificity")
    ax.plot(t, [r["precision"] for r in sweep], "^-", label="precision", alpha=0.6)
    ax.axvline(rule, color="k", ls="--", lw=1, label=f"rule: max p > {rule:g}")
    ax.set_xlabel("threshold on a slice's max nodule probability")
    ax.set_ylabel("slice-level figure")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


@STAGES.register("shrey2020_slice_screen")
def slice_screen_stage(run) -> dict:
    """Screens every axial slice of the held-out scans with the U-Net of stage
    ``network``; the record holds the rule's slice-level figures, the sweep and Dice."""
    from lungjax import stages, train
    from lungjax.evaluation.classification import roc_auc

    cfg, ctx = run.config, run.ctx
    model, task = stages.scan_model(cfg), train.build_task(cfg)
    variables, step = stages.restore_variables(run.dirs[run.spec["network"]])
    predict = jax.jit(lambda x: task.probabilities(forward_apply(model, variables, x)))
    multiple = 2 ** (len(cfg.model.features) - 1)
    rule = float(cfg.screening.threshold)
    scores, labels, per_scan, seconds = [], [], {}, {}
    inter = total = 0
    for uid in ctx.test_uids:
        t0 = time.perf_counter()
        prob = segment_slices(predict, ctx.store.read_volume(uid), multiple=multiple,
                              batch=int(run.spec["batch"]))
        truth = ctx.store.read_volume(uid, array="nodules") > 0
        pred = prob >= float(cfg.task.threshold)
        scores.append(prob.reshape(len(prob), -1).max(axis=1))
        labels.append(truth.reshape(len(truth), -1).any(axis=1))
        inter += int(np.sum(pred & truth))
        total += int(np.sum(pred) + np.sum(truth))
        per_scan[uid] = {"dice": _dice(pred, truth), "slices": int(len(prob)),
                         "nodule_slices": int(labels[-1].sum()),
                         "suspicious_slices": int(np.sum(scores[-1] > rule))}
        seconds[uid] = time.perf_counter() - t0
    s = np.concatenate(scores) if scores else np.zeros(0)
    y = np.concatenate(labels) if labels else np.zeros(0, bool)
    at_rule = slice_rule(s, y, rule)
    sweep = [slice_rule(s, y, t) for t in SWEEP]
    auc = roc_auc(y, s) if 0 < y.sum() < len(y) else float("nan")
    record: dict[str, Any] = {
        "network": cfg.model.name, "step": int(step), "fold": int(ctx.config.data.fold),
        "uids": list(ctx.test_uids), "slices": int(len(s)), "nodule_slices": int(y.sum()),
        "rule": at_rule, "slice_roc_auc": auc, "sweep": sweep,
        "dice_pooled": 1.0 if total == 0 else 2.0 * inter / total,
        "dice_mean": float(np.mean([v["dice"] for v in per_scan.values()]))
        if per_scan else float("nan"),
        "dice_threshold": float(cfg.task.threshold), "per_scan": per_scan,
        "mean_seconds_per_scan": float(np.mean(list(seconds.values()))) if seconds else 0.0,
    }
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(run.dir, "screening.json"), record)
        plot_sweep(sweep, rule, os.path.join(run.dir, "threshold_sweep.png"),
                   f"{ctx.config.name}: suspicious-slice rule, fold {record['fold']} "
                   f"({len(s)} slices, {int(y.sum())} with nodule)")
    record["summary_line"] = (
        f"slices suspicious at max p > {rule:g}: sensitivity {at_rule['sensitivity']:.3f}, "
        f"specificity {at_rule['specificity']:.3f} ({len(s)} slices, {int(y.sum())} with "
        f"nodule); slice AUC {auc:.3f}; volume Dice {record['dice_pooled']:.3f}")
    return record


# ----------------------------------------------------------------------------------
# Whole scans: suspicious slices, nodules, their malignancy
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FindSettings:
    """How the method reads a whole scan (``config.shrey2020`` in the find stage, the
    export's ``find`` sidecar): the suspicious-slice rule's threshold, the nodule-mask
    threshold, the smallest component kept (voxels), the most nodules kept per scan
    (highest score first), how a nodule is scored (``screening.NODULE_SCORES``), the
    classifier's crop side and the slice batch."""

    rule: float = 0.35
    mask_threshold: float = 0.5
    min_voxels: int = 3
    max_nodules: int = 100
    score: str = "peak"
    crop: int = 64
    batch: int = 16

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "FindSettings":
        return FindSettings(**{f.name: type(f.default)(d[f.name])
                               for f in dataclasses.fields(FindSettings) if f.name in d})


@dataclasses.dataclass
class Findings2D:
    """The method's output on one preprocessed volume (voxel coordinates of it).

    Attributes:
      probability: (D, H, W) float32 U-Net nodule probability.
      slice_max: (D,) float32 each slice's largest probability (the rule reads it).
      suspicious: (S,) int64 indices of the slices with ``slice_max`` > the rule.
      mask: (D, H, W) uint8 predicted nodule mask (probability >= mask_threshold).
      centres_zyx: (K, 3) float64 centroid of each kept component.
      score: (K,) float64 its score (``FindSettings.score``).
      diameter_mm: (K,) float64 the diameter of a disc of its largest axial area.
      malignancy: (K,) float64 the classifier's malignant probability.
    """

    probability: np.ndarray
    slice_max: np.ndarray
    suspicious: np.ndarray
    mask: np.ndarray
    centres_zyx: np.ndarray
    score: np.ndarray
    diameter_mm: np.ndarray
    malignancy: np.ndarray


def find_in_volume(segment, classify, volume: np.ndarray, spacing_zyx, multiple: int,
                   settings: FindSettings) -> Findings2D:
    """The method on one preprocessed volume.

    Args:
      segment: the U-Net, (B, H', W', 1) float32 -> (B, H', W') nodule probability
        (sides multiples of ``multiple``).
      classify: the classifier stage's network, (B, crop, crop, 1) image crops -> (B,)
        malignant probability (it predicts the crop's mask itself, as in training).
      volume: (D, H, W) float32 in [0, 1]; spacing_zyx: its voxel size (mm).
    """
    from lungjax.methods.slices import classify_patches

    prob = segment_slices(segment, volume, multiple=multiple, batch=settings.batch)
    slice_max = prob.reshape(len(prob), -1).max(axis=1) if prob.size else np.zeros(0)
    mask, centres, score, diam = nodule_components(
        prob, spacing_zyx, threshold=settings.mask_threshold, min_voxels=settings.min_voxels,
        max_nodules=settings.max_nodules, score=settings.score)
    mal = classify_patches(classify, volume, np.rint(centres).astype(np.int64),
                           settings.crop, settings.batch)
    return Findings2D(prob, slice_max.astype(np.float32),
                      np.flatnonzero(slice_max > settings.rule), mask, centres, score, diam,
                      mal)


def _find_networks(run):
    """(segment, classify, multiple) of the find stage: the U-Net of ``segmenter_from``
    and the classifier stage ``network`` (its cascade), each jitted."""
    from lungjax import stages
    from lungjax import train as train_lib

    src = run.spec["segmenter_from"]
    seg_cfg = run.configs[src]
    seg_model, seg_task = stages.scan_model(seg_cfg), train_lib.build_task(seg_cfg)
    seg_vars, _ = stages.restore_variables(run.dirs[src])
    cfg = run.config
    cls_model, cls_task = train_lib.build_model(cfg), train_lib.build_task(cfg)
    cls_vars, step = stages.restore_variables(run.dirs[run.spec["network"]])
    segment = jax.jit(lambda x: seg_task.probabilities(forward_apply(seg_model, seg_vars, x)))
    classify = jax.jit(lambda x: cls_task.probabilities(forward_apply(cls_model, cls_vars, x)))
    return segment, classify, 2 ** (len(seg_cfg.model.features) - 1), step


def find_settings(cfg) -> FindSettings:
    """The find stage's settings from its config (the rule and mask threshold are the
    U-Net stage's ``screening.threshold`` and ``task.threshold``)."""
    return FindSettings(rule=float(cfg.screening.threshold),
                        mask_threshold=float(cfg.model.mask_threshold),
                        score=str(cfg.screening.nodule_score),
                        crop=int(cfg.data.patch_size_zyx[-1]))


@STAGES.register("shrey2020_find")
def find_stage(run) -> dict:
    """The whole method on the held-out scans: U-Net slice by slice, nodules as connected
    components of its mask, each classified benign / malignant on its crop. Writes
    ``submission.csv`` (world mm: the LUNA16 columns, probability = the U-Net's peak, then
    diameter_mm and malignancy_probability) and ``find.json``: the nodules found (a
    component's centroid within an annotated nodule's radius), false positives per scan,
    the FROC of the marks, and the malignancy AUC over the found nodules that carry a
    benign / malignant label."""
    from lungjax import stages
    from lungjax.data.coords import voxel_to_world, within_sphere
    from lungjax.data.sampler import malignant_label
    from lungjax.data.tables import Marks, write_marks_csv
    from lungjax.detect import screening_stats
    from lungjax.evaluation.classification import classification_record
    from lungjax.evaluation.froc import compute_froc

    from tqdm import tqdm

    cfg, ctx = run.config, run.ctx
    segment, classify, multiple, step = _find_networks(run)
    settings = find_settings(cfg)
    marks, mal, diam, labels, scores = [], [], [], [], []
    for uid in tqdm(ctx.test_uids, desc=run.name, unit="scan", disable=not run.progress):
        rec = ctx.store.scan(uid)
        f = find_in_volume(segment, classify, ctx.store.read_volume(uid), rec.spacing_zyx,
                           multiple, settings)
        xyz = voxel_to_world(f.centres_zyx, rec.geometry).reshape(-1, 3)
        marks.append(Marks(np.full(len(xyz), uid), xyz, f.score))
        mal.append(f.malignancy)
        diam.append(f.diameter_mm)
        # Each annotated nodule with a label, scored by the found nodule that hits it.
        lab = malignant_label(np.asarray(rec.nodule_malignancy, np.float64),
                              str(cfg.data.malignancy_uncertain))
        nxyz = np.asarray(rec.nodules_world, np.float64).reshape(-1, 3)
        r = np.asarray(rec.nodule_diameter_mm, np.float64) / 2
        hit = within_sphere(xyz[:, None], nxyz[None], r[None])  # (K, N), LUNA16's rule
        dist = np.linalg.norm(xyz[:, None] - nxyz[None], axis=-1)
        for j in np.flatnonzero((lab >= 0) & hit.any(axis=0)):
            labels.append(int(lab[j]))
            scores.append(float(f.malignancy[np.argmin(dist[:, j])]))
    all_marks = Marks.concatenate(marks)
    uids = list(ctx.test_uids)
    stats = screening_stats(all_marks, ctx.store.findings(uids), uids,
                            ctx.store.excluded(uids))
    froc = compute_froc(ctx.store.findings(uids), ctx.store.excluded(uids), uids, all_marks,
                        n_bootstrap=1000, seed=0)
    y, p = np.asarray(labels, np.int64), np.asarray(scores, np.float64)
    cls = (classification_record(y, p, seed=0, threshold=0.5, n_bootstrap=1000)
           if 0 < y.sum() < len(y) else {})
    csv = os.path.join(run.dir, "submission.csv")
    if jax.process_index() == 0:
        write_marks_csv(csv, all_marks, {"diameter_mm": np.concatenate(diam or [[]]),
                                         "malignancy_probability": np.concatenate(mal or [[]])})
    figures = {"sensitivity": stats["sensitivity"], "fps_per_scan": stats["fps_per_scan"],
               "n_nodules": stats["n_nodules"], "n_found": stats["n_detected"],
               "cpm": froc.cpm, "cpm_lo": froc.cpm_ci95[0], "cpm_hi": froc.cpm_ci95[1],
               "malignancy_nodules": int(len(y)),
               "malignancy_auc": cls.get("roc_auc", float("nan"))}
    out = {"step": int(step), "settings": dataclasses.asdict(settings),
           "eval/find": figures, "malignancy": cls, "uids": uids, "marks": len(all_marks),
           "submission_csv": csv}
    stages.write_json(os.path.join(run.dir, "find.json"), out)
    out["summary_line"] = (
        f"nodules found {stats['n_detected']}/{stats['n_nodules']} at "
        f"{stats['fps_per_scan']:.1f} FPs/scan; CPM {froc.cpm:.3f} ({froc.cpm_ci95[0]:.3f}-"
        f"{froc.cpm_ci95[1]:.3f}); malignancy AUC "
        f"{figures['malignancy_auc']:.3f} over {len(y)} found, labelled nodules; {csv}")
    return out


def _export_find(run) -> dict:
    """The find stage: the classifier (cascade) on (B, crop, crop, 1) crops in the stage
    folder, the U-Net on (B, H, W, 1) slices (sides multiples of its pools) in
    ``segmenter/``, the whole-scan settings in the classifier's sidecar."""
    from lungjax import stages
    from lungjax import train as train_lib
    from lungjax.methods.slices import export_slice_segmenter
    from lungjax.steps import make_predict_fn

    cfg = run.config
    multiple = 2 ** (len(run.configs[run.spec["segmenter_from"]].model.features) - 1)
    folder = export_slice_segmenter(run, multiple, "(B, H, W) nodule probability")
    model, task = train_lib.build_model(cfg), train_lib.build_task(cfg)
    settings = find_settings(cfg)
    meta = {"find": {**dataclasses.asdict(settings), "segmenter": folder,
                     "segmenter_multiple": multiple},
            "output": "(B,) malignant probability of the crop"}
    return stages.export_stage(run, make_predict_fn(model, task, spatial_dims=2),
                               (settings.crop, settings.crop), meta)


class ExportedFind:
    """``python -m lungjax.detect`` on a shrey2020 export: suspicious slices, nodules
    (world mm, diameter, malignant probability) and the nodule mask of a scan."""

    @staticmethod
    def load(stage_dir: str):
        """``find(volume, geometry, lung) -> (world_xyz (K, 3), U-Net peak probability
        (K,), diameter_mm (K,), {"nodules": mask}, {}, extra)`` where ``extra`` holds
        the per-mark column ``malignancy_probability`` and the table
        ``suspicious_slices`` (world z mm, the slice's largest probability)."""
        from lungjax.data.coords import voxel_to_world
        from lungjax.export import load_predictor

        classify, sidecar = load_predictor(stage_dir)
        if "find" not in sidecar:
            raise ValueError(f"{stage_dir}: not a shrey2020 find export (no 'find' in its "
                             "export.json)")
        segment, _ = load_predictor(os.path.join(stage_dir, sidecar["find"]["segmenter"]))
        settings = FindSettings.from_dict(sidecar["find"])
        multiple = int(sidecar["find"]["segmenter_multiple"])

        def find(volume, geometry, lung):
            del lung  # the U-Net looks at whole slices
            f = find_in_volume(segment, classify, volume, geometry.spacing_zyx, multiple,
                               settings)
            world = voxel_to_world(f.centres_zyx, geometry).reshape(-1, 3)
            zs = np.zeros((len(f.suspicious), 3))
            zs[:, 0] = f.suspicious
            slice_z = voxel_to_world(zs, geometry).reshape(-1, 3)[:, 2]
            extra = {"columns": {"malignancy_probability": f.malignancy},
                     "tables": {"suspicious_slices": {
                         "world_z_mm": slice_z,
                         "max_probability": f.slice_max[f.suspicious].astype(np.float64)}},
                     "info": {"suspicious_slices": int(len(f.suspicious)),
                              "slices": int(len(f.slice_max))}}
            return world, f.score, f.diameter_mm, {"nodules": f.mask}, {}, extra

        return find


STAGE_EXPORTS.register("shrey2020_find", _export_find)
EXPORTED_METHODS.register("shrey2020_find", ExportedFind)


# ----------------------------------------------------------------------------------
# The paper's tables
# ----------------------------------------------------------------------------------


def _classifier_rows(records: Sequence[dict]) -> dict[str, dict]:
    """Classifier -> {figure: mean over folds, figure_lo / _hi: mean of the folds'
    bootstrap bounds, "folds": n}, from each fold's classify stage (and its variants'),
    and ``SIZE_ROW`` from the classify stage's diameter-alone yardstick."""
    per: dict[str, list[dict]] = {}
    for r in records:
        found = {"proposed": r["stages"].get(CLASSIFY_STAGE)}
        for vname, v in r["variants"].items():
            found[vname] = v["stages"].get(CLASSIFY_STAGE)
        for name, rec in found.items():
            if rec and CLASSIFY_EVAL in rec:
                per.setdefault(name, []).append(rec[CLASSIFY_EVAL])
        # The proposed classifier's ROIs (every variant trains on the same ones).
        size = (found["proposed"] or {}).get(SIZE_EVAL)
        if size:
            per.setdefault(SIZE_ROW, []).append(size)
    rows = {}
    for name, evals in per.items():
        row: dict[str, Any] = {"folds": len(evals)}
        for _, ours in COLUMNS:
            for suffix in ("", "_lo", "_hi"):
                vals = [e[ours + suffix] for e in evals if ours + suffix in e]
                row[ours + suffix] = float(np.mean(vals)) if vals else float("nan")
        rows[name] = row
    return rows


def _pct(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def _screen_rows(records: Sequence[dict]) -> dict[str, float]:
    """Screening and segmentation figures, mean over folds."""
    keys = {"sensitivity": ("rule", "sensitivity"), "specificity": ("rule", "specificity"),
            "precision": ("rule", "precision"), "slice_roc_auc": ("slice_roc_auc",),
            "volume_dice": ("dice_pooled",)}
    out = {}
    for k, path in keys.items():
        vals = []
        for r in records:
            v = r["stages"].get(SCREEN_STAGE)
            for p in path:
                v = v.get(p) if isinstance(v, Mapping) else None
            if v is not None and np.isfinite(v):
                vals.append(float(v))
        out[k] = float(np.mean(vals)) if vals else float("nan")
    for k in ("sensitivity", "fps_per_scan", "cpm", "malignancy_auc"):
        vals = [r["stages"][FIND_STAGE]["eval/find"].get(k) for r in records
                if FIND_STAGE in r["stages"]]
        vals = [float(v) for v in vals if v is not None and np.isfinite(v)]
        out[f"method_{k}"] = float(np.mean(vals)) if vals else float("nan")
    dice = [r["stages"][UNET_STAGE].get("eval/seg", {}).get("dice") for r in records
            if UNET_STAGE in r["stages"]]
    dice = [d for d in dice if d is not None]
    out["slice_dice"] = float(np.mean(dice)) if dice else float("nan")
    return out


def plot_tables(rows: Mapping[str, dict], path: str, title: str) -> None:
    """Grouped bars: the paper's and our F1 and accuracy for each classifier; saved
    atomically to ``path``."""
    from matplotlib.figure import Figure

    from lungjax.evaluation.plots import save_figure

    names = [n for n in PAPER if n in rows] + [n for n in rows if n not in PAPER]
    fig = Figure(figsize=(max(6, 1.4 * len(names)), 4))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    bars = (("paper F1", lambda n: PAPER.get(n, {}).get("f1", np.nan)),
            ("ours F1", lambda n: 100 * rows[n]["f1"]),
            ("paper accuracy", lambda n: PAPER.get(n, {}).get("accuracy", np.nan)),
            ("ours accuracy", lambda n: 100 * rows[n]["accuracy"]))
    for i, (label, get) in enumerate(bars):
        vals = np.array([get(n) for n in names], np.float64)
        ax.bar(x + (i - 1.5) * 0.2, np.nan_to_num(vals), 0.2, label=label,
               hatch="//" if label.startswith("paper") else None, alpha=0.85)
    ax.set_xticks(x)
    ax.set_xticklabels([ROW_LABELS.get(n, n) for n in names], rotation=20, ha="right",
                       fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


@CV_REPORTS.register("shrey2020_tables")
def write_tables(config, workdir: str, records: Sequence[dict], report: dict) -> dict:
    """``<workdir>/cv/shrey2020_tables.{md,json,png}``: the paper's Tables 1-2 beside our
    proposed and baseline classifiers, then the screening rule and segmentation figures;
    returns the report plus "tables" (the Markdown) and "classifiers" (the rows)."""
    out_dir = os.path.join(workdir, "cv")
    fileio.makedirs(out_dir)
    rows = _classifier_rows(records)
    screen = _screen_rows(records)
    folds = [int(r["fold"]) for r in records]
    rule = float(config.screening.threshold)
    md = [f"# {config.name}: the paper's tables", "",
          f"{len(records)} held-out folds {folds}; ours = mean over folds, in brackets the "
          "mean of the folds' bootstrap 95% intervals (over held-out nodules). Benign = "
          "median malignancy 1-2, malignant = 4-5 (3 excluded). Paper: LIDC-IDRI, one "
          "60/15/25 split. Diameter alone: malignant when the annotated diameter reaches "
          "the threshold most accurate on the training ROIs, no network (its ROC AUC is "
          "the held-out diameter's).", "",
          "## Benign / malignant classifiers (percent)", "",
          "| classifier | source | precision | recall | F1 | accuracy | ROC AUC |",
          "|---|---|---|---|---|---|---|"]
    for name in list(PAPER) + [n for n in rows if n not in PAPER]:
        label = ROW_LABELS.get(name, name)
        if name in PAPER:
            p = PAPER[name]
            md.append(f"| {label} | paper | " + " | ".join(
                f"{p[k]:.2f}" if k in p else "–" for k, _ in COLUMNS) + " |")
        if name in rows:
            r = rows[name]
            md.append(f"| {label} | ours ({n_folds(r['folds'])}) | " + " | ".join(
                f"{_pct(r[o])} [{_pct(r[o + '_lo'])}-{_pct(r[o + '_hi'])}]"
                for _, o in COLUMNS) + " |")
    md += ["", f"## Screening (U-Net, slice is suspicious when max p > {rule:g})", "",
           "| figure | ours (mean over folds) |", "|---|---|"]
    for k, v in screen.items():
        md.append(f"| {k.replace('_', ' ')} | {v:.4f} |" if np.isfinite(v) else
                  f"| {k.replace('_', ' ')} | – |")
    md.append("")
    md.append("Slice Dice: the U-Net stage's held-out training-style slices (5 before to 5 "
              "after each nodule; crops where the U-Net trains on crops); volume Dice: every "
              "slice of the held-out scans pooled. method_*: the whole method on the "
              "held-out scans (stage find: nodules as components of the U-Net's mask, "
              "sensitivity and FPs/scan by LUNA16's hit rule, the FROC's CPM, and the "
              "malignancy AUC over the found nodules with a benign / malignant label).")
    files = {"tables_md": os.path.join(out_dir, "shrey2020_tables.md"),
             "tables_json": os.path.join(out_dir, "shrey2020_tables.json"),
             "tables_png": os.path.join(out_dir, "shrey2020_tables.png")}
    text = "\n".join(md) + "\n"
    if jax.process_index() == 0:
        atomic_write_text(files["tables_md"], text)
        atomic_write_json(files["tables_json"], {"folds": folds, "paper": PAPER,
                                                 "classifiers": rows, "screening": screen})
        plot_tables(rows, files["tables_png"], f"{config.name}: F1 and accuracy, paper vs "
                                               f"ours ({n_folds(len(records))})")
    print(text, flush=True)
    report = dict(report)
    report["files"] = {**report.get("files", {}), **files}
    report["tables"] = text
    report["classifiers"] = rows
    report["screening"] = screen
    return report

