"""Yu et al. (2021) as stages: the sub-case sampler of the Res U-Net, the schedules the
paper gives in epochs, the held-out segmentation and classification stages, the
cross-validation tables, and the LIDC-IDRI label counts.

Stages of ``configs/yu2021.py`` (``lungjax.stages`` runs them)::

    seg      "train"             Res U-Net on sub-cases (sampler "yu2021_subcases")
    segeval  "yu2021_segment"    held-out scans segmented sub-case by sub-case:
                                 segmentation.json (+ per-nodule Dice), segmentation.png
    cls      "train"             3D ResNet50 on nodule ROIs (sampler "nodule_roi")
    clseval  "yu2021_classify"   held-out ROIs: classification.json (bootstrap
                                 intervals), roc.png; its export (``--mode=export``)
                                 is the whole method on a new scan: the Res U-Net of
                                 ``segmenter_from`` sub-case by sub-case, its nodules
                                 (connected components) each classified on its ROI

Sub-cases: each stored (preprocessed, lung-cropped) scan of D slices is split along z
into ``yu2021.subcases`` equal slabs; slab k is the patch of ``data.patch_size_zyx``
centred at z = (2k + 1) D / (2 n) and in-plane on the volume's centre (the paper's two
48 x 192 x 192 sub-cases of a case resampled to 3 x 1.5 x 1.5 mm). Voxels of a slab
outside the volume read as 0 (-1000 HU after the window).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import numpy as np

from lungjax import fileio
from lungjax.data.dense_sampling import RoiSampler, roi_sampler
from lungjax.data.pipeline import StoreTrainData, Targets
from lungjax.data.sampler import (NODULE, RANDOM_NEG, SAMPLE_DTYPE, SamplerConfig,
                                  malignant_label, pool_rows, round_half_up, scan_info)
from lungjax.evaluation.reports import n_folds
from lungjax.registry import (CV_REPORTS, EXPORTED_METHODS, SAMPLERS, STAGE_CONFIGS,
                              STAGE_EXPORTS, STAGES)
from lungjax.steps import forward_apply

# The cv table's row of the diameter-alone yardstick (stage cls's evaluator "size").
SIZE_ROW = "diameter alone"
SIZE_EVAL = "eval/size"  # the cls stage's diameter-alone yardstick
# The paper's held-out figures (Yu et al. 2021, Results).
PAPER = {"dice_large": 0.81, "accuracy": 0.873, "roc_auc": 0.907, "specificity": 0.948}


# ----------------------------------------------------------------------------------
# Sub-cases
# ----------------------------------------------------------------------------------


def subcase_centres(shape_zyx: Sequence[int], n: int) -> np.ndarray:
    """(n, 3) int64 voxel centres of the ``n`` z-slabs of a (D, H, W) volume."""
    d, h, w = (int(v) for v in shape_zyx)
    z = np.floor((2 * np.arange(n) + 1) * d / (2 * n)).astype(np.int64)
    return np.stack([z, np.full(n, h // 2), np.full(n, w // 2)], -1)


def subcase_size(cfg) -> tuple[int, ...]:
    """(3,) the sub-case size of a config: ``yu2021.subcase_size_zyx``, or the training
    patch ``data.patch_size_zyx`` when it is empty (the paper trains on the sub-cases)."""
    size = tuple(int(v) for v in cfg.yu2021.subcase_size_zyx)
    return size or tuple(int(v) for v in cfg.data.patch_size_zyx)


def subcase_owner(depth: int, n: int) -> np.ndarray:
    """(D,) int64: the slab each slice belongs to (slice z in [k D / n, (k + 1) D / n))."""
    return np.minimum((np.arange(depth) * n) // depth, n - 1)


def subcase_sampler(store, uids: Sequence[str], cfg: SamplerConfig, batch_size: int,
                    n: int) -> RoiSampler:
    """A shuffled-pass sampler over the sub-cases of ``uids`` (label 1 = the slab holds
    nodule voxels), ``n`` per scan; a round covers every sub-case."""
    scans, parts = [], []
    for s, uid in enumerate(uids):
        rec = store.scan(uid)
        if "nodules" not in rec.arrays:
            raise ValueError(f"scan {uid}: the store has no nodule mask for it; prepare the "
                             "store again (store version 2 writes one for every scan)")
        scans.append(scan_info(rec))
        centres = subcase_centres(rec.shape_zyx, n)
        has = store.read_volume(uid, array="nodules").reshape(rec.shape_zyx[0], -1).max(1) > 0
        owner = subcase_owner(rec.shape_zyx[0], n)
        pos = np.array([has[owner == k].any() for k in range(n)])
        rows = pool_rows(s, centres, centres, 0.0, pos.astype(np.int32),
                         np.where(pos, NODULE, RANDOM_NEG))
        parts.append(rows)
    pool = np.concatenate(parts) if parts else np.zeros(0, SAMPLE_DTYPE)
    pool["sample_id"] = np.arange(len(pool))
    return RoiSampler(list(uids), scans, pool, cfg, batch_size, balance=False)


@SAMPLERS.register("yu2021_subcases")
class SubcaseTrainData(StoreTrainData):
    """``StoreTrainData`` over :func:`subcase_sampler` (``sampler.name =
    "yu2021_subcases"``; reads ``yu2021.subcases``; batches carry the nodule mask with
    ``data.batch_mask``). Held-out evaluation: every held-out sub-case."""

    eval_kinds = (NODULE, RANDOM_NEG)

    def __init__(self, config, store, train_uids, eval_uids=None, **kw):
        self.subcases = int(config.yu2021.subcases)
        kw.setdefault("targets", Targets.from_config(config))
        super().__init__(config, store, train_uids, eval_uids, **kw)

    def make_sampler(self, uids, *, random_negatives: bool):
        del random_negatives
        return subcase_sampler(self.store, uids, SamplerConfig.from_config(self.config),
                               int(self.config.train.batch_size), self.subcases)


# ----------------------------------------------------------------------------------
# Schedules in epochs (stage "derive" functions)
# ----------------------------------------------------------------------------------


def _train_uids(config) -> tuple[Any, list[str]]:
    """(store, training uids) of the prepared store (the runner prepares it before any
    stage configuration is derived)."""
    from lungjax.data.store import PatchStore
    from lungjax.train_data import default_store_path, held_out_uids

    store = PatchStore.open(config.data.store or default_store_path(config))
    held = set(held_out_uids(config, store))
    return store, [u for u in store.uids() if u not in held]


def _epochs_to_steps(cfg, steps_per_epoch: int) -> None:
    y = cfg.yu2021
    cfg.train.num_steps = max(1, int(y.epochs * steps_per_epoch))
    cfg.optimizer.decay_steps = tuple(max(1, int(e * steps_per_epoch))
                                      for e in y.lr_decay_epochs)


@STAGE_CONFIGS.register("yu2021_seg_epochs")
def seg_epochs(cfg, config) -> None:
    """Segmentation stage: ``yu2021.epochs`` / ``lr_decay_epochs`` / ``bce_epochs`` ->
    ``train.num_steps``, ``optimizer.decay_steps``, ``task.switch_step``; an epoch is
    every training sub-case once: ceil(training scans x subcases / batch) steps."""
    del config
    _, uids = _train_uids(cfg)
    spe = math.ceil(len(uids) * int(cfg.yu2021.subcases) / int(cfg.train.batch_size))
    _epochs_to_steps(cfg, spe)
    cfg.task.switch_step = max(1, int(cfg.yu2021.bce_epochs * spe))


@STAGE_CONFIGS.register("yu2021_cls_epochs")
def cls_epochs(cfg, config) -> None:
    """Classification stage: ``yu2021.epochs`` / ``lr_decay_epochs`` -> steps; an epoch
    is one round of the ROI sampler (every benign and malignant training ROI once, the
    smaller class repeated under ``sampler.roi_balance``)."""
    del config
    store, uids = _train_uids(cfg)
    lab = np.concatenate([malignant_label(np.asarray(store.scan(u).nodule_malignancy,
                                                     np.float64),
                                          str(cfg.data.malignancy_uncertain)) for u in uids])
    b = int(cfg.train.batch_size)
    pos, neg = int((lab == 1).sum()), int((lab == 0).sum())
    if cfg.sampler.roi_balance:
        p_b = int(round_half_up(b * float(cfg.data.positive_fraction)))  # as RoiSampler
        spe = max(math.ceil(pos / max(p_b, 1)), math.ceil(neg / max(b - p_b, 1)))
    else:
        spe = math.ceil((pos + neg) / b)
    _epochs_to_steps(cfg, max(spe, 1))


# ----------------------------------------------------------------------------------
# Held-out segmentation
# ----------------------------------------------------------------------------------


def segment_volume(predict, volume: np.ndarray, size_zyx: Sequence[int], n: int,
                   lung: np.ndarray | None = None) -> np.ndarray:
    """Foreground probability (D, H, W) float32 of a (D, H, W) preprocessed volume: each
    z-slab's sub-case through ``predict((1, *size, 1) image) -> (1, *size)``
    probabilities, pasted back where the slab owns the slices and the patch covers the
    volume (else 0); a sub-case running past the volume reads 0 there (air). ``lung``:
    a (D, H, W) lung mask bounding the prediction (``yu2021.lung_only``: the paper
    segments the lung parenchyma it extracted first), None = unbounded."""
    from lungjax.tasks.screening import crop_patch

    shape = np.asarray(volume.shape, np.int64)
    size = np.asarray(size_zyx, np.int64)
    out = np.zeros(tuple(shape), np.float32)
    owner = subcase_owner(int(shape[0]), n)
    for k, c in enumerate(subcase_centres(shape, n)):
        patch = crop_patch(volume, c, size)
        prob = np.asarray(predict(patch[None, ..., None]))[0]
        start = c - size // 2
        lo, hi = np.clip(start, 0, shape), np.clip(start + size, 0, shape)
        z = np.flatnonzero(owner == k)
        z = z[(z >= lo[0]) & (z < hi[0])]
        if not len(z):
            continue
        a = lo - start
        out[z, lo[1]:hi[1], lo[2]:hi[2]] = prob[z - start[0], a[1]:a[1] + hi[1] - lo[1],
                                                a[2]:a[2] + hi[2] - lo[2]]
    if lung is not None:
        out *= np.asarray(lung, np.float32)
    return out


def nodule_dice(prob: np.ndarray, labels: np.ndarray, label: int, threshold: float,
                margin: int = 4) -> float:
    """Dice of one nodule: the thresholded prediction against ``labels == label`` in the
    nodule's bounding box grown by ``margin`` voxels (what a per-nodule segmentation is
    scored on; other nodules' voxels in the box are left out)."""
    zyx = np.argwhere(labels == label)
    lo = np.maximum(zyx.min(0) - margin, 0)
    hi = np.minimum(zyx.max(0) + margin + 1, labels.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    lab = labels[box]
    keep = (lab == 0) | (lab == label)
    p = (prob[box] >= threshold) & keep
    t = lab == label
    return float(2 * np.count_nonzero(p & t) / max(np.count_nonzero(p) + np.count_nonzero(t), 1))


@STAGES.register("yu2021_segment")
def segment_stage(run) -> dict:
    """Segments the held-out scans with the network of stage ``network`` (inside the lung
    mask with ``yu2021.lung_only``); Dice over all voxels and per nodule (all, and
    nodules larger than ``yu2021.large_nodule_mm``) -> ``segmentation.json``,
    ``segmentation.png`` and each scan's thresholded mask ``masks/<uid>.mha`` (uint8,
    the store's grid, world geometry) in the stage folder."""
    from lungjax import stages, train
    from lungjax.data import io
    from lungjax.evaluation.segmentation import segmentation_record

    cfg, ctx = run.config, run.ctx
    model, task = train.build_model(cfg), train.build_task(cfg)
    variables, step = stages.restore_variables(run.dirs[run.spec["network"]])
    apply = jax.jit(lambda v, x: task.probabilities(forward_apply(model, v, x)))
    threshold = float(cfg.task.threshold)
    per_scan, nodules = {}, []
    masks = os.path.join(run.dir, "masks")
    fileio.makedirs(masks)
    for uid in ctx.test_uids:
        # The store's lung mask is closed and hole-filled at preparation, so
        # juxtapleural nodules stay inside it.
        lung = ctx.store.read_volume(uid, array="lung") if cfg.yu2021.lung_only else None
        prob = segment_volume(lambda x: apply(variables, x), ctx.store.read_volume(uid),
                              subcase_size(cfg), int(cfg.yu2021.subcases), lung)
        labels = ctx.store.read_volume(uid, array="nodules").astype(np.int64)
        rec = ctx.store.scan(uid)
        if jax.process_index() == 0:
            io.write_scan(os.path.join(masks, f"{uid}.mha"),
                          (prob >= threshold).astype(np.uint8), rec.geometry, compress=True)
        per_scan[uid] = (prob, labels > 0, rec.spacing_zyx)
        for lab, r in zip(rec.nodule_mask_label, rec.nodule_diameter_mm):
            if lab > 0 and np.any(labels == lab):
                nodules.append({"uid": uid, "label": int(lab), "diameter_mm": float(r),
                                "dice": nodule_dice(prob, labels, int(lab), threshold)})
    seg = segmentation_record(per_scan, threshold=threshold)
    large_mm = float(cfg.yu2021.large_nodule_mm)
    large = [n["dice"] for n in nodules if n["diameter_mm"] > large_mm]
    figures = {"dice": seg["pooled"]["dice"], "mean_scan_dice": seg["mean"]["dice"],
               "nodule_dice": float(np.mean([n["dice"] for n in nodules])) if nodules
               else float("nan"),
               "large_nodule_dice": float(np.mean(large)) if large else float("nan"),
               "n_nodules": len(nodules), "n_large": len(large)}
    out = {"step": int(step), "network": cfg.model.name, "large_nodule_mm": large_mm,
           "eval/segmentation": figures, "segmentation": seg, "nodules": nodules,
           "paper": {"large_nodule_dice": PAPER["dice_large"]}}
    stages.write_json(os.path.join(run.dir, "segmentation.json"), out)
    if jax.process_index() == 0:
        plot_nodule_dice(nodules, large_mm, os.path.join(run.dir, "segmentation.png"),
                         title=f"{ctx.config.name} {run.name}: fold "
                               f"{int(ctx.config.data.fold)}")
    out["summary_line"] = (f"Dice {figures['dice']:.3f} (pooled over {len(per_scan)} scans); "
                           f"per nodule {figures['nodule_dice']:.3f}, > {large_mm:g} mm "
                           f"{figures['large_nodule_dice']:.3f} ({len(large)} nodules; "
                           f"paper {PAPER['dice_large']})")
    return out


def plot_nodule_dice(nodules: Sequence[dict], large_mm: float, path: str, *,
                     title: str) -> None:
    """Per-nodule Dice against diameter (mm), the large-nodule threshold marked."""
    from matplotlib.figure import Figure

    from lungjax.evaluation.plots import save_figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    d = [n["diameter_mm"] for n in nodules]
    ax.scatter(d, [n["dice"] for n in nodules], s=14, color="C0")
    ax.axvline(large_mm, color="0.5", ls=":", lw=1)
    ax.axhline(PAPER["dice_large"], color="C3", ls="--", lw=1,
               label=f"paper, > {large_mm:g} mm: {PAPER['dice_large']}")
    ax.set_xlabel("nodule diameter (mm)")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.4)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------
# Held-out classification
# ----------------------------------------------------------------------------------


@STAGES.register("yu2021_classify")
def classify_stage(run) -> dict:
    """Classifies every held-out nodule ROI with a benign / malignant label (uncertain
    ones per ``data.malignancy_uncertain``) with the network of stage ``network``:
    accuracy, sensitivity, specificity, AUC with bootstrap intervals ->
    ``classification.json`` and ``roc.png`` in the stage folder."""
    from lungjax import stages, train
    from lungjax.evaluation.classification import classification_record, roc_curve
    from lungjax.evaluation.plots import plot_roc

    cfg, ctx = run.config, run.ctx
    model, task = train.build_model(cfg), train.build_task(cfg)
    variables, step = stages.restore_variables(run.dirs[run.spec["network"]])
    apply = jax.jit(lambda v, x: task.probabilities(task.logits(forward_apply(model, v, x))))
    sampler = roi_sampler(ctx.store, ctx.test_uids, SamplerConfig.from_config(cfg), 1,
                          uncertain=str(cfg.data.malignancy_uncertain), balance=False)
    rows, size = sampler.pool, tuple(int(v) for v in cfg.data.patch_size_zyx)
    scores = []
    for i in range(0, len(rows), int(run.spec["batch"])):
        chunk = rows[i:i + int(run.spec["batch"])]
        x = np.stack([ctx.store.read_patch(sampler.uids[int(r["scan"])],
                                           np.rint(r["center_zyx"]).astype(np.int64), size)
                      for r in chunk])[..., None]
        scores.append(np.asarray(apply(variables, x)))
    labels = rows["label"].astype(np.int64)
    score = np.concatenate(scores) if scores else np.zeros(0)
    ev = cfg.yu2021
    rec = classification_record(labels, score, seed=int(cfg.seed),
                                n_bootstrap=int(ev.n_bootstrap), threshold=0.5)
    figures = {k: rec[k] for k in ("accuracy", "roc_auc", "specificity", "sensitivity")}
    figures.update({f"{k}_{e}": rec["ci"][k][j] for k in ("accuracy", "roc_auc",
                                                          "specificity")
                    for j, e in enumerate(("lo", "hi"))})
    figures["n"] = int(len(labels))
    out = {"step": int(step), "network": cfg.model.name, "eval/classification": figures,
           "classification": rec, "paper": {k: PAPER[k] for k in
                                            ("accuracy", "roc_auc", "specificity")}}
    stages.write_json(os.path.join(run.dir, "classification.json"), out)
    if jax.process_index() == 0 and len(np.unique(labels)) == 2:
        roc = roc_curve(labels, score)
        plot_roc({cfg.model.name: (roc.fpr, roc.tpr, rec["roc_auc"])},
                 os.path.join(run.dir, "roc.png"),
                 title=f"{ctx.config.name} {run.name}: fold {int(ctx.config.data.fold)}")
    out["summary_line"] = (
        f"{len(labels)} held-out ROIs: accuracy {rec['accuracy']:.3f}, AUC "
        f"{rec['roc_auc']:.3f}, specificity {rec['specificity']:.3f} (paper "
        f"{PAPER['accuracy']}, {PAPER['roc_auc']}, {PAPER['specificity']})")
    # The network stage's diameter-alone yardstick scored the same held-out ROIs: a
    # classifier that does not beat it has learned no more than the nodule's size.
    size = (run.records.get(run.spec["network"]) or {}).get(SIZE_EVAL)
    if size:
        out[SIZE_EVAL] = size
        out["summary_line"] += (f"; diameter alone (>= {size['threshold_mm']:.1f} mm) "
                                f"accuracy {size['accuracy']:.3f}, AUC "
                                f"{size.get('roc_auc', float('nan')):.3f}")
    return out


# ----------------------------------------------------------------------------------
# Cross-validation tables
# ----------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------
# The whole method on a new scan (the export python -m lungjax.detect runs)
# ----------------------------------------------------------------------------------

SEGMENTER_EXPORT = "segmenter"  # the Res U-Net's export, inside the classifier's


def find_nodules(segment, classify, volume: np.ndarray, spacing_zyx, lung, settings: dict):
    """The method on one preprocessed volume.

    Args:
      segment: the Res U-Net, (1, *subcase, 1) float32 -> (1, *subcase) probability.
      classify: the ResNet50, (B, *roi, 1) float32 -> (B,) malignant probability.
      volume: (D, H, W) float32 in [0, 1]; spacing_zyx: its voxel size (mm).
      lung: (D, H, W) lung mask or None (used with ``settings["lung_only"]``).
      settings: the export's ``yu2021`` sidecar (sub-case size and count, ROI size,
        threshold, lung_only, min_voxels, max_nodules, batch).

    Returns:
      (mask (D, H, W) uint8, centres (K, 3) float64 voxels, score (K,) the
      ``nodule_score`` of each (peak probability by default),
      diameter_mm (K,), malignancy (K,) float64).
    """
    from lungjax.tasks.screening import nodule_components

    prob = segment_volume(segment, volume, settings["subcase_size_zyx"],
                          int(settings["subcases"]), lung if settings["lung_only"] else None)
    mask, centres, score, diam = nodule_components(
        prob, spacing_zyx, threshold=float(settings["threshold"]),
        min_voxels=int(settings["min_voxels"]), max_nodules=int(settings["max_nodules"]),
        score=str(settings.get("nodule_score", "peak")))  # exports before the field: peak
    return mask, centres, score, diam, classify_rois(classify, volume, centres, settings)


def classify_rois(classify, volume: np.ndarray, centres_zyx: np.ndarray,
                  settings: dict) -> np.ndarray:
    """(K,) float64 malignant probability of the ROIs of ``settings["roi_size_zyx"]``
    centred on the (K, 3) voxel centres (a ROI at the volume's edge reads 0 outside:
    air), ``settings["batch"]`` ROIs per call of ``classify``."""
    from lungjax.tasks.screening import crop_patch

    roi, b = tuple(int(v) for v in settings["roi_size_zyx"]), int(settings["batch"])
    at = np.rint(np.asarray(centres_zyx).reshape(-1, 3)).astype(np.int64)
    out = [np.asarray(classify(np.stack([crop_patch(volume, c, roi) for c in at[i:i + b]])
                               [..., None]), np.float64).reshape(-1)
           for i in range(0, len(at), b)]
    return np.concatenate(out) if out else np.zeros(0)


def measure_nodules(prob: np.ndarray, centres_zyx: np.ndarray, spacing_zyx,
                    threshold: float, search_mm: float = 10.0):
    """Given nodules in a probability volume: each centre's connected component of
    ``prob >= threshold`` (26-neighbourhood): the one at the centre voxel, else the one
    with a voxel nearest to it within ``search_mm``, else none.

    Args:
      prob: (D, H, W) float probability; centres_zyx: (N, 3) float voxel centres, all
        inside the volume; spacing_zyx: voxel size (mm).

    Returns:
      (labels (D, H, W) uint8, nodule k's voxels = k + 1 (a component claimed by an
      earlier centre stays with it), volume_mm3 (N,), peak probability (N,), diameter_mm
      (N,) of a disc of its largest axial area; 0 where no component was found).
    """
    from scipy import ndimage

    from lungjax.tasks.screening import axial_disc_diameter_mm

    if len(centres_zyx) > 255:
        raise ValueError(f"{len(centres_zyx)} nodules in one scan: at most 255 (uint8 labels)")
    fg = prob >= threshold
    comp, _ = ndimage.label(fg, np.ones((3, 3, 3), bool))
    sp = np.asarray(spacing_zyx, np.float64)
    out = np.zeros(prob.shape, np.uint8)
    n = len(centres_zyx)
    vol, peak, diam = np.zeros(n), np.zeros(n), np.zeros(n)
    for k, c in enumerate(np.asarray(centres_zyx, np.float64).reshape(-1, 3)):
        v = np.rint(c).astype(np.int64)
        lab = int(comp[tuple(v)])
        if lab == 0:
            r = np.ceil(search_mm / sp).astype(np.int64)
            lo, hi = np.maximum(v - r, 0), np.minimum(v + r + 1, prob.shape)
            box = comp[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            at = np.argwhere(box > 0)
            if len(at):
                d = np.linalg.norm((at + lo - c) * sp, axis=1)
                j = int(np.argmin(d))
                lab = int(box[tuple(at[j])]) if d[j] <= search_mm else 0
        if lab == 0:
            continue
        sel = (comp == lab) & (out == 0)
        out[sel] = k + 1
        vol[k] = float(sel.sum()) * float(np.prod(sp))
        peak[k] = float(prob[sel].max()) if sel.any() else 0.0
        diam[k] = axial_disc_diameter_mm(sel, sp)
    return out, vol, peak, diam


def _export_method(run) -> dict:
    """The classifier stage's ResNet50 on (B, *roi, 1) ROIs in the stage folder, the Res
    U-Net of ``segmenter_from`` on (1, *subcase, 1) sub-cases in ``segmenter/``, the
    whole-scan settings in the classifier's sidecar."""
    from lungjax import export as export_lib
    from lungjax import stages
    from lungjax import train as train_lib
    from lungjax.configcheck import as_dict
    from lungjax.steps import make_predict_fn

    cfg, src = run.config, run.spec["segmenter_from"]
    if not src:
        raise ValueError(f"stage {run.name!r}: the export needs segmenter_from (the Res "
                         "U-Net's stage)")
    seg_cfg = run.configs[src]
    # The export's batch is symbolic: XLA's own convolutions (the CPU-fast plans are made
    # per concrete shape).
    seg_model = train_lib.build_model(seg_cfg).clone(conv_impl="xla")
    seg_task = train_lib.build_task(seg_cfg)
    size = subcase_size(seg_cfg)
    export_lib.export_network(
        os.path.join(run.dir, SEGMENTER_EXPORT), os.path.join(run.dirs[src], "checkpoints"),
        make_predict_fn(seg_model, seg_task, spatial_dims=3), size,
        {"model": as_dict(seg_cfg.model), "stage": src,
         "output": "(1, D, H, W) nodule probability of a sub-case"},
        network=seg_cfg.train.network)
    y = seg_cfg.yu2021
    settings = {"segmenter": SEGMENTER_EXPORT, "subcase_size_zyx": list(size),
                "subcases": int(y.subcases), "roi_size_zyx": list(cfg.data.patch_size_zyx),
                "threshold": float(seg_cfg.task.threshold), "lung_only": bool(y.lung_only),
                "min_voxels": int(y.min_nodule_voxels), "max_nodules": int(y.max_nodules),
                "nodule_score": str(y.nodule_score), "batch": int(run.spec["batch"])}
    model = train_lib.build_model(cfg).clone(conv_impl="xla")
    task = train_lib.build_task(cfg)
    return stages.export_stage(run, make_predict_fn(model, task, spatial_dims=3),
                               tuple(int(v) for v in cfg.data.patch_size_zyx),
                               {"yu2021": settings,
                                "output": "(B,) malignant probability of the ROI"})


class ExportedMethod:
    """``python -m lungjax.detect`` on a yu2021 export: the nodule mask of a scan and each
    nodule (world mm, peak probability, diameter, malignant probability)."""

    @staticmethod
    def load(stage_dir: str):
        """``find(volume, geometry, lung) -> (world_xyz (K, 3), peak probability (K,),
        diameter_mm (K,), {"nodules": mask}, {}, extra)``; ``extra`` holds the per-mark
        column ``malignancy_probability``."""
        from lungjax.data.coords import inside_grid, voxel_to_world, world_to_voxel
        from lungjax.export import load_predictor

        classify, sidecar = load_predictor(stage_dir)
        if "yu2021" not in sidecar:
            raise ValueError(f"{stage_dir}: not a yu2021 export (no 'yu2021' in its "
                             "export.json)")
        settings = sidecar["yu2021"]
        segment, _ = load_predictor(os.path.join(stage_dir, settings["segmenter"]))

        def find(volume, geometry, lung, nodules_xyz=None):
            if nodules_xyz is not None:
                return given(volume, geometry, lung, np.asarray(nodules_xyz, np.float64))
            mask, centres, score, diam, mal = find_nodules(
                segment, classify, volume, geometry.spacing_zyx, lung, settings)
            world = voxel_to_world(centres, geometry).reshape(-1, 3)
            extra = {"columns": {"malignancy_probability": mal}, "tables": {},
                     "info": {"nodules": int(len(centres))}}
            return world, score, diam, {"nodules": mask}, {}, extra

        def given(volume, geometry, lung, xyz):
            """The listed nodules (world mm): a centre outside the preprocessed volume
            is a counted skip, named on the console; the others get their mask
            (label k + 1), volume and the malignancy of the ROI on the given centre."""
            vox = world_to_voxel(xyz.reshape(-1, 3), geometry).reshape(-1, 3)
            inside = inside_grid(vox, volume.shape)
            for p in xyz[~inside]:
                print(f"nodule at ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) mm: outside the "
                      "scan's lung-cropped volume; skipped", flush=True)
            xyz, vox = xyz[inside], np.clip(vox[inside], 0, np.asarray(volume.shape) - 1)
            prob = segment_volume(segment, volume, settings["subcase_size_zyx"],
                                  int(settings["subcases"]),
                                  lung if settings["lung_only"] else None)
            labels, vol, peak, diam = measure_nodules(prob, vox, geometry.spacing_zyx,
                                                      float(settings["threshold"]))
            mal = classify_rois(classify, volume, vox, settings)
            extra = {"columns": {"volume_mm3": vol, "malignancy_probability": mal},
                     "tables": {},
                     "info": {"nodules": int(len(xyz)), "nodules_outside": int((~inside).sum())}}
            return xyz, peak, diam, {"nodules": labels}, {}, extra

        return find


STAGE_EXPORTS.register("yu2021_classify", _export_method)
EXPORTED_METHODS.register("yu2021_classify", ExportedMethod)


def _mean(values) -> float:
    v = [float(x) for x in values if x is not None and np.isfinite(float(x))]
    return float(np.mean(v)) if v else float("nan")


@CV_REPORTS.register("yu2021_tables")
def cv_tables(config, workdir: str, records: Sequence[dict], report: dict) -> dict:
    """The paper's figures beside ours (mean over folds) for the method and each
    variant (baselines): ``<workdir>/cv/yu2021_tables.{md,json}``."""
    from lungjax.atomic import atomic_write_json, atomic_write_text

    def rows_of(variant: str) -> dict:
        seg, cls = [], []
        for r in records:
            st = r["stages"] if not variant else r["variants"][variant]["stages"]
            seg.append(st["segeval"]["eval/segmentation"])
            cls.append(st["clseval"]["eval/classification"])
        return {"dice": _mean(s.get("dice") for s in seg),
                "large_nodule_dice": _mean(s.get("large_nodule_dice") for s in seg),
                "accuracy": _mean(c.get("accuracy") for c in cls),
                "roc_auc": _mean(c.get("roc_auc") for c in cls),
                "specificity": _mean(c.get("specificity") for c in cls)}

    names = [""] + [v for v in config.cv.variants if all(v in r["variants"] for r in records)]
    table = {(n or config.name): rows_of(n) for n in names}
    # The diameter alone on the same held-out ROIs, fitted on the cls stage's training ROIs.
    size = [r["stages"]["cls"][SIZE_EVAL] for r in records
            if SIZE_EVAL in r["stages"].get("cls", {})]
    if size:
        table[SIZE_ROW] = {"dice": float("nan"), "large_nodule_dice": float("nan"),
                           **{k: _mean(c.get(k) for c in size)
                              for k in ("accuracy", "roc_auc", "specificity")}}
    cols = ("dice", "large_nodule_dice", "accuracy", "roc_auc", "specificity")
    paper = {"dice": float("nan"), "large_nodule_dice": PAPER["dice_large"],
             "accuracy": PAPER["accuracy"], "roc_auc": PAPER["roc_auc"],
             "specificity": PAPER["specificity"]}
    lines = [f"# {config.name}: {n_folds(len(records))}, mean over folds", "",
             "| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| paper | " + " | ".join("-" if not np.isfinite(paper[c]) else f"{paper[c]:.3f}"
                                      for c in cols) + " |"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row[c]:.3f}" if np.isfinite(row[c]) else "-" for c in cols) + " |")
    if size:
        lines += ["", f"{SIZE_ROW}: malignant when the annotated diameter reaches the "
                  "threshold most accurate on the cls stage's training ROIs (no network), "
                  "on the same held-out ROIs."]
    out = os.path.join(workdir, "cv")
    fileio.makedirs(out)
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(out, "yu2021_tables.md"), "\n".join(lines) + "\n")
        atomic_write_json(os.path.join(out, "yu2021_tables.json"),
                          {"paper": paper, "runs": table, "folds": len(records)})
    print("\n".join(lines), flush=True)
    return {**report, "yu2021": {"paper": paper, "runs": table}}


# ----------------------------------------------------------------------------------
# LIDC-IDRI label counts
# ----------------------------------------------------------------------------------


def lidc_label_counts(db, *, max_thickness: float | None = None, min_readers: int = 3,
                      per: str = "annotation") -> dict[str, int]:
    """Benign (malignancy 1-2) and malignant (4-5) counts of LIDC-IDRI, score 3 left out.

    Args:
      db: ``lungjax.data.lidc_db.LidcDatabase``.
      max_thickness: keep scans with slice thickness <= this (None = all 1,018).
      min_readers: keep nodules (clusters of reader marks) marked by this many readers.
      per: "annotation" counts every reader's mark of the kept nodules with its own
        score; "cluster" counts each nodule once by its median score (ties 2.5 / 3.5
        left out, as 3).

    Returns:
      {"nodules": kept clusters, "benign", "malignant", "uncertain"} (ints).
    """
    from lungjax.data import lidc

    scans = db.scans if max_thickness is None else db.select_scans(max_thickness)
    nods = list(lidc.iter_nodules(db, scans, min_readers=min_readers, with_masks=False))
    if per == "annotation":
        m = np.concatenate([n.reader_scores[:, 8] for n in nods]).astype(np.float64)
    elif per == "cluster":
        m = np.array([n.median("malignancy") for n in nods])
    else:
        raise ValueError(f"per={per!r}: 'annotation' or 'cluster'")
    return {"nodules": len(nods), "benign": int((m <= 2).sum()),
            "malignant": int((m >= 4).sum()), "uncertain": int(((m > 2) & (m < 4)).sum())}
