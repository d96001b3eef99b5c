"""Sathish et al. (EMBC 2020): the Turing-test adversarial training step of the lung
segmenter (``config.train.step = "turing_test"``).

Each step, in one jitted sharded function (``lungjax.steps.make_alternating_step``):

1. discriminator: the segmenter's current foreground probability map P (B, H, W) and the
   ground-truth mask G (B, H, W) are stacked as a (B, H, W, 2) pair whose channel order
   is drawn per slice; the discriminator's two sigmoid outputs say which channel is G
   (labels (B, 2): (1, 0) when G is channel 0). Its loss J_adv is that binary cross
   entropy; one optimizer update.
2. segmenter: J_net = J_seg - alpha * J_adv, with J_seg the task's loss (weighted mean
   over the batch) and J_adv the updated discriminator's loss on a freshly shuffled pair
   built from the segmenter's live prediction (the segmenter is rewarded for masks the
   discriminator cannot tell from the truth); one optimizer update.

Config: ``config.sathish2020.alpha`` (the paper's 0.001); the segmenter is
``config.train.network`` (the task's network), the discriminator
``config.networks.discriminator`` with ``input_channels = 2``. The ground truth is the
batch's ``mask`` (``data.batch_mask_array = "lung"``: the store's lung mask).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lungjax import fileio
from lungjax.configcheck import as_dict
from lungjax.evaluation.reports import n_folds
from lungjax.methods.slices import classify_patches, segment_slices
from lungjax.registry import CV_REPORTS, EXPORTED_METHODS, STAGE_EXPORTS, STAGES, STEPS
from lungjax.state import step_key
from lungjax.steps import apply_gradients, forward_apply, model_rngs, rng_streams

SEGMENTER, DISCRIMINATOR = "segmenter", "discriminator"


def turing_pairs(truth: jax.Array, pred: jax.Array, key: jax.Array):
    """The discriminator's input and labels.

    Args:
      truth: (B, H, W) float32 ground-truth mask in {0, 1}.
      pred: (B, H, W) float32 predicted foreground probability.
      key: PRNG key drawing each slice's channel order.

    Returns:
      ``(pairs, labels)``: (B, H, W, 2) float32 with G in channel 0 where ``labels[:, 0]``
      is 1 (else in channel 1), and (B, 2) float32 one-hot labels "channel k is G".
    """
    gt_first = jax.random.bernoulli(key, 0.5, truth.shape[:1])
    sel = gt_first[:, None, None]
    pairs = jnp.stack([jnp.where(sel, truth, pred), jnp.where(sel, pred, truth)], axis=-1)
    g = gt_first.astype(jnp.float32)
    return pairs, jnp.stack([g, 1.0 - g], axis=-1)


def _weighted_mean(values: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(w * values) / jnp.maximum(jnp.sum(w), 1e-8)


@STEPS.register("turing_test")
def turing_test_step(config, networks, task):
    """Step factory: ``[("discriminator", update), ("segmenter", update)]`` (see the
    module docstring). Reads ``config.sathish2020.alpha`` and ``config.rng_impl``; the
    stage's networks must be exactly the segmenter (``config.train.network``) and
    ``discriminator``."""
    names = list(networks)
    if len(names) != 2 or names[1] != DISCRIMINATOR:
        raise ValueError(f"config.train.step='turing_test' needs the segmenter "
                         f"(config.train.network) and config.networks.{DISCRIMINATOR}; the "
                         f"stage has {', '.join(names)}")
    seg_name = names[0]
    seg, disc = networks[seg_name], networks[DISCRIMINATOR]
    alpha = float(config.sathish2020.alpha)
    impl = config.rng_impl
    seg_streams, disc_streams = rng_streams(seg.model), rng_streams(disc.model)

    def segment(state, batch, params):
        """Segmenter forward in training mode: (logits, new model state)."""
        image = batch["image"]
        if image.ndim == 3:
            image = image[..., None]
        out, ms = seg.model.apply({"params": params, **state.model_state}, image, train=True,
                                  rngs=model_rngs(step_key(state, impl), seg_streams),
                                  mutable=list(state.model_state))
        return out, dict(ms)

    def truth_of(outputs, batch):
        return (task.target(outputs, batch).astype(jnp.float32) >= 0.5).astype(jnp.float32)

    def adversarial(d_state, d_params, pred, truth, key):
        """(B,) float32 per-slice BCE of the discriminator, its new model state, and
        (B,) 1.0 where it picked the ground-truth channel."""
        pairs, labels = turing_pairs(truth, pred, key)
        logits, ms = disc.model.apply({"params": d_params, **d_state.model_state}, pairs,
                                      train=True, rngs=model_rngs(key, disc_streams),
                                      mutable=list(d_state.model_state))
        bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)
        right = (jnp.argmax(logits, -1) == jnp.argmax(labels, -1)).astype(jnp.float32)
        return bce, dict(ms), right

    def disc_update(states, batch):
        s, d = states[seg_name], states[DISCRIMINATOR]
        out, _ = segment(s, batch, s.params)
        pred = jax.lax.stop_gradient(task.probabilities(out))
        truth = truth_of(out, batch)
        w = batch["weight"].astype(jnp.float32)
        key = step_key(d, impl)

        def loss_fn(p):
            bce, ms, right = adversarial(d, p, pred, truth, key)
            return _weighted_mean(bce, w), (ms, right)

        (loss, (ms, right)), g = jax.value_and_grad(loss_fn, has_aux=True)(d.params)
        new = apply_gradients(d, disc.tx, g, model_state=ms, value=loss)
        return new, {"loss": loss, "accuracy": _weighted_mean(right, w)}, {}

    def seg_update(states, batch):
        s, d = states[seg_name], states[DISCRIMINATOR]
        batch = {**batch, "step": s.step}
        w = batch["weight"].astype(jnp.float32)
        # A key the discriminator's update did not use: a fresh channel order.
        key = jax.random.fold_in(step_key(d, impl), 1)

        def loss_fn(params):
            out, ms = segment(s, batch, params)
            losses = task.per_sample_loss(out, batch)
            j_seg = _weighted_mean(losses, w)
            bce, _, _ = adversarial(d, d.params, task.probabilities(out), truth_of(out, batch),
                                    key)
            j_adv = _weighted_mean(bce, w)
            return j_seg - alpha * j_adv, (j_seg, j_adv, losses, out, ms)

        (loss, (j_seg, j_adv, losses, out, ms)), g = jax.value_and_grad(
            loss_fn, has_aux=True)(s.params)
        new = apply_gradients(s, seg.tx, g, model_state=ms, value=j_seg)
        metrics = {"loss": loss, "seg_loss": j_seg, "adv_loss": j_adv,
                   "grad_norm": optax.tree.norm(g)}
        for k, v in task.per_sample_metrics(out, batch).items():
            metrics[k] = _weighted_mean(v, w)
        host = {"loss": losses}
        if "index" in batch:
            host["index"] = batch["index"]
        return new, metrics, host

    return [(DISCRIMINATOR, disc_update), (seg_name, seg_update)]


# ----------------------------------------------------------------------------------
# Whole scans: lungs slice by slice, then nodule patches inside them
# ----------------------------------------------------------------------------------


def patch_grid(region: np.ndarray, stride: int) -> np.ndarray:
    """Patch centres on every axial slice: the points of a ``stride`` grid (offset
    ``stride // 2``) that lie in ``region``.

    Args:
      region: (D, H, W) bool, where patches may be centred.
      stride: grid step in voxels (in-plane).

    Returns:
      (K, 3) int64 (z, y, x) centres, slice by slice.
    """
    region = np.asarray(region, bool)
    grid = np.zeros(region.shape, bool)
    grid[:, stride // 2::stride, stride // 2::stride] = True
    return np.argwhere(grid & region).astype(np.int64)


def cells_by_nodule(centres: np.ndarray, stride: int, nodules_zyx: np.ndarray,
                    radius_vox: np.ndarray) -> np.ndarray:
    """(K, N) bool: the patch of centre ``centres[k]`` holds nodule n on its slice: the
    nodule spans the slice (|z - cz| <= r) and its centre lies in the patch's own grid
    cell (|y - cy|, |x - cx| < stride / 2), so each nodule counts once per slice.

    Args:
      centres: (K, 3) patch centres (z, y, x) voxels.
      nodules_zyx: (N, 3) nodule centres, voxels of the same grid; radius_vox: (N,).
    """
    c = np.asarray(centres, np.float64).reshape(-1, 3)
    n = np.asarray(nodules_zyx, np.float64).reshape(-1, 3)
    r = np.asarray(radius_vox, np.float64).reshape(-1)
    dz = np.abs(c[:, None, 0] - n[None, :, 0]) <= r[None]
    dyx = np.all(np.abs(c[:, None, 1:] - n[None, :, 1:]) < stride / 2, axis=-1)
    return dz & dyx


def nodule_cells(centres: np.ndarray, stride: int, nodules_zyx: np.ndarray,
                 radius_vox: np.ndarray) -> np.ndarray:
    """(K,) bool: the patch holds some nodule (:func:`cells_by_nodule`)."""
    return cells_by_nodule(centres, stride, nodules_zyx, radius_vox).any(axis=1)


@dataclasses.dataclass(frozen=True)
class FindSettings:
    """How the method looks at a whole scan (``config.sathish2020`` / the export's
    sidecar): lung threshold on the segmenter's probability, the margin the lung mask is
    grown by so that patches on the lung wall count (mm), the patch grid step (voxels)
    and the classifier's decision threshold."""

    lung_threshold: float = 0.5
    wall_mm: float = 5.0
    stride: int = 32
    threshold: float = 0.5

    @staticmethod
    def from_dict(d) -> "FindSettings":
        """From ``config.sathish2020`` (as a dict) or an export's ``find`` sidecar."""
        return FindSettings(float(d["lung_threshold"]), float(d["wall_mm"]),
                            int(d["patch_stride"]), float(d["patch_threshold"]))


def find_in_volume(segment, classify, volume: np.ndarray, spacing_zyx, size: int,
                   multiple: int, settings: FindSettings):
    """The method on one preprocessed volume.

    Args:
      segment: the segmenter (see :func:`segment_slices`); classify: the patch
        classifier (see :func:`classify_patches`).
      volume: (D, H, W) float32 in [0, 1]; spacing_zyx: its voxel size (mm).
      size: classifier patch side (voxels); multiple: the segmenter's side multiple.

    Returns:
      (lung (D, H, W) bool predicted mask, centres (K, 3) int64 patch centres inside the
      grown mask, probability (K,) float64).
    """
    from scipy import ndimage

    lung = segment_slices(segment, volume, multiple=multiple) >= settings.lung_threshold
    grow = max(0, int(round(settings.wall_mm / float(np.mean(spacing_zyx[1:])))))
    region = (ndimage.binary_dilation(lung, np.ones((1, 3, 3), bool), iterations=grow)
              if grow and lung.any() else lung)
    centres = patch_grid(region, settings.stride)
    return lung, centres, classify_patches(classify, volume, centres, size)


def positive_marks(uid: str, centres: np.ndarray, prob: np.ndarray, geometry,
                   threshold: float):
    """The patches whose probability reaches ``threshold`` as LUNA16 marks (world mm
    centres of the (K, 3) voxel ``centres`` on the grid ``geometry`` places)."""
    from lungjax.data.coords import voxel_to_world
    from lungjax.data.tables import Marks

    hit = np.asarray(prob) >= threshold
    return Marks(np.full(int(hit.sum()), uid),
                 voxel_to_world(centres[hit], geometry).reshape(-1, 3), prob[hit])


@dataclasses.dataclass(frozen=True)
class LoadedFind:
    """The method's two networks and how they are applied: ``segment`` (B, H, W, 1) ->
    (B, H, W) lung probability, ``classify`` (B, size, size, 1) -> (B,) nodule
    probability (:func:`find_in_volume`); ``preprocessing``: the store's settings (an
    export's sidecar; empty in the stage, which reads the store)."""

    segment: Callable
    classify: Callable
    settings: FindSettings
    size: int
    multiple: int
    preprocessing: dict = dataclasses.field(default_factory=dict)

    def __call__(self, volume: np.ndarray, spacing_zyx):
        """:func:`find_in_volume` of one preprocessed volume."""
        return find_in_volume(self.segment, self.classify, volume, spacing_zyx, self.size,
                              self.multiple, self.settings)


@STAGES.register("sathish2020_find")
def find_stage(run) -> dict:
    """The method on the held-out scans: the lungs by the segmenter of stage
    ``segmenter_from`` (slice by slice, against the store's lung mask: Dice, HD95), then
    the patch classifier of stage ``network`` on a grid of axial patches inside them
    (against the annotated nodules: accuracy, sensitivity, specificity per patch, and
    nodules found). Writes ``find.json``, each scan's predicted lung mask
    (``masks/<uid>.mha``, the store's grid) and its nodule-bearing patches
    (``patches.csv``, world mm)."""
    from lungjax import stages
    from lungjax import train as train_lib
    from lungjax.data import io
    from lungjax.data.coords import world_to_voxel
    from lungjax.data.tables import Marks, write_marks_csv
    from lungjax.evaluation.classification import classification_record
    from lungjax.evaluation.segmentation import segmentation_record

    cfg, ctx, spec = run.config, run.ctx, run.spec
    src = spec["segmenter_from"]
    seg_cfg = run.configs[src]
    seg_model, seg_task = train_lib.build_model(seg_cfg), train_lib.build_task(seg_cfg)
    seg_vars, _ = stages.restore_variables(run.dirs[src], seg_cfg.train.network)
    cls_model, cls_task = train_lib.build_model(cfg), train_lib.build_task(cfg)
    cls_vars, step = stages.restore_variables(run.dirs[spec["network"]])
    settings = FindSettings.from_dict(as_dict(cfg.sathish2020))
    method = LoadedFind(
        jax.jit(lambda x: seg_task.probabilities(forward_apply(seg_model, seg_vars, x))),
        jax.jit(lambda x: cls_task.probabilities(forward_apply(cls_model, cls_vars, x))),
        settings, int(cfg.data.patch_size_zyx[-1]), int(seg_model.size_multiple()))
    per_scan, labels, scores, found, marks, no_lung = {}, [], [], [], [], []
    scored = {}
    fileio.makedirs(os.path.join(run.dir, "masks"))
    from tqdm import tqdm

    for uid in tqdm(ctx.test_uids, desc=run.name, unit="scan", disable=not run.progress):
        rec = ctx.store.scan(uid)
        volume = ctx.store.read_volume(uid)
        lung, centres, prob = method(volume, rec.spacing_zyx)
        if not lung.any():  # counted and named; its Dice is 0, its HD infinite
            no_lung.append(uid)
            print(f"{run.name}: {uid}: the segmenter finds no lung; no patch scored",
                  flush=True)
        scored[uid] = len(centres)
        truth_lung = ctx.store.read_volume(uid, "lung") > 0
        per_scan[uid] = (lung, truth_lung, rec.spacing_zyx)
        io.write_scan(os.path.join(run.dir, "masks", f"{uid}.mha"), lung.astype(np.uint8),
                      rec.geometry, compress=True)
        nod = ctx.store.findings([uid])
        nzyx = world_to_voxel(nod.xyz, rec.geometry).reshape(-1, 3)
        rvox = nod.diameter_mm / 2 / float(np.mean(rec.spacing_zyx))
        cells = cells_by_nodule(centres, settings.stride, nzyx, rvox)  # (K, N)
        labels.append(cells.any(axis=1))
        scores.append(prob)
        hit = prob >= settings.threshold
        found += [bool(f) for f in (cells & hit[:, None]).any(axis=0)]
        marks.append(positive_marks(uid, centres, prob, rec.geometry, settings.threshold))
    seg = segmentation_record(per_scan, threshold=0.5)
    y, p = np.concatenate(labels or [np.zeros(0, bool)]), np.concatenate(scores or [np.zeros(0)])
    # Grid patches of one scan overlap and correlate: no bootstrap over them (the "cls"
    # stage's held-out patches carry the intervals).
    cls = classification_record(y.astype(np.int64), p, seed=0, threshold=settings.threshold,
                                n_bootstrap=0)
    write_marks_csv(os.path.join(run.dir, "patches.csv"), Marks.concatenate(marks))
    figures = {"dice": seg["pooled"]["dice"], "hd95_mm": seg["mean"]["hd95_mm"],
               "patch_accuracy": cls["accuracy"], "patch_sensitivity": cls["sensitivity"],
               "patch_specificity": cls["specificity"],
               "nodules_found": int(sum(found)), "n_nodules": len(found),
               "scans_without_lung": len(no_lung)}
    out = {"step": int(step), "settings": dataclasses.asdict(settings),
           "eval/find": figures, "segmentation": seg, "classification": cls,
           "scans_without_lung": no_lung, "patches_scored": scored,
           "patches_csv": os.path.join(run.dir, "patches.csv")}
    stages.write_json(os.path.join(run.dir, "find.json"), out)
    out["summary_line"] = (
        f"lungs Dice {figures['dice']:.3f}, HD95 {figures['hd95_mm']:.1f} mm over "
        f"{len(per_scan)} scans; patches accuracy {figures['patch_accuracy']:.3f}, "
        f"sensitivity {figures['patch_sensitivity']:.3f}, specificity "
        f"{figures['patch_specificity']:.3f}; nodules with a positive patch "
        f"{figures['nodules_found']}/{figures['n_nodules']}; lung masks "
        f"{os.path.join(run.dir, 'masks')}, patches {out['patches_csv']}")
    return out


def _export_find(run) -> dict:
    """The find stage: the classifier on (B, size, size, 1) patches in the stage folder,
    the segmenter on (B, H, W, 1) slices (sides multiples of its pools) in
    ``segmenter/``, the whole-scan settings in the classifier's sidecar."""
    from lungjax import stages
    from lungjax import train as train_lib
    from lungjax.methods.slices import export_slice_segmenter
    from lungjax.steps import make_predict_fn

    cfg = run.config
    multiple = int(train_lib.build_model(run.configs[run.spec["segmenter_from"]])
                   .size_multiple())
    folder = export_slice_segmenter(run, multiple, "(B, H, W) lung probability")
    model, task = train_lib.build_model(cfg), train_lib.build_task(cfg)
    size = int(cfg.data.patch_size_zyx[-1])
    meta = {"find": {**as_dict(cfg.sathish2020), "patch_size": size,
                     "segmenter": folder, "segmenter_multiple": multiple},
            "output": "(B,) nodule probability of the patch"}
    return stages.export_stage(run, make_predict_fn(model, task, spatial_dims=2),
                               (size, size), meta)


class ExportedFind:
    """``python -m lungjax.detect`` on a sathish2020 export: the lungs and the
    nodule-bearing patches of a scan."""

    @staticmethod
    def parts(stage_dir: str) -> LoadedFind:
        """The export in ``stage_dir`` (the find stage's folder)."""
        from lungjax.export import load_predictor

        classify, sidecar = load_predictor(stage_dir)
        if "find" not in sidecar:
            raise ValueError(f"{stage_dir}: not a sathish2020 find export (no 'find' in its "
                             "export.json)")
        segment, _ = load_predictor(os.path.join(stage_dir, sidecar["find"]["segmenter"]))
        return LoadedFind(segment, classify, FindSettings.from_dict(sidecar["find"]),
                          int(sidecar["find"]["patch_size"]),
                          int(sidecar["find"]["segmenter_multiple"]),
                          sidecar["preprocessing"])

    @staticmethod
    def load(stage_dir: str):
        """``find(volume, geometry, lung) -> (world_xyz (K, 3), probability (K,), None,
        {"lung": (D, H, W) uint8})``: the centres of the patches whose probability
        reaches the export's threshold, and the predicted lung mask."""
        method = ExportedFind.parts(stage_dir)

        def find(volume, geometry, lung):
            del lung  # the method segments the lungs itself
            mask, centres, prob = method(volume, geometry.spacing_zyx)
            m = positive_marks("", centres, prob, geometry, method.settings.threshold)
            return m.xyz, m.probability, None, {"lung": mask.astype(np.uint8)}

        return find


STAGE_EXPORTS.register("sathish2020_find", _export_find)
EXPORTED_METHODS.register("sathish2020_find", ExportedFind)


# ----------------------------------------------------------------------------------
# The paper's tables beside ours (--mode=cv)
# ----------------------------------------------------------------------------------

# Sathish et al., fold 1: lung DSC / pixel ROC AUC / Hausdorff distance per segmenter (the
# paper gives no unit for HD); 10-fold DSC of the proposed method; the classifier.
PAPER_SEGMENTATION = {"unet": (0.979, 0.9948, 3.9424), "r2unet": (0.983, 0.9950, 3.8754),
                      "sumnet": (0.980, 0.9945, 3.9596), "proposed": (0.983, 0.9948, 3.8989)}
PAPER_TEN_FOLD_DSC = (0.984, 0.0007)
PAPER_CLASSIFIER = {"accuracy": 0.9800, "sensitivity": 0.9902, "specificity": 0.9688}


def _stats(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


@CV_REPORTS.register("sathish2020_tables")
def cv_tables(config, workdir: str, records, report: dict) -> dict:
    """Segmentation (lungs: DSC, pixel AUC, HD95 in mm on held-out slices; the method and
    each segmenter variant) and classification (held-out patches) figures: the first
    fold and the mean +- sd over folds, beside the paper's fold 1 and 10-fold figures ->
    ``<workdir>/cv/sathish2020_tables.{md,json,png}``."""
    from lungjax.atomic import atomic_write_json, atomic_write_text

    records = sorted(records, key=lambda r: r["fold"])
    names = ["proposed"] + [v for v in config.cv.variants
                            if all(v in r["variants"] for r in records)]

    def seg_of(r, name):
        st = r["stages"] if name == "proposed" else r["variants"][name]["stages"]
        return st["seg"]["eval/seg"]

    seg = {}
    for name in names:
        evs = [seg_of(r, name) for r in records]
        seg[name] = {k: {"first": float(evs[0][k]), "mean_sd": _stats(e[k] for e in evs)}
                     for k in ("dice", "pixel_auc", "hd95_mm")}
    cls_ev = [r["stages"]["cls"]["eval/cls"] for r in records]
    cls = {k: {"first": float(cls_ev[0][k]), "mean_sd": _stats(e[k] for e in cls_ev)}
           for k in PAPER_CLASSIFIER}
    first = int(records[0]["fold"])
    lines = [f"# {config.name}: {n_folds(len(records))} (first: fold {first})", "",
             "Lung segmentation on held-out slices. Paper: fold 1 of LUNA16 (HD unit not "
             "given); ours: HD95 in mm.", "",
             "| segmenter | paper DSC | paper AUC | paper HD | DSC (first fold) | "
             "DSC mean +- sd | pixel AUC mean +- sd | HD95 mm mean +- sd |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names:
        p = PAPER_SEGMENTATION.get(name, (float("nan"),) * 3)
        s = seg[name]
        lines.append(f"| {name} | {p[0]:.3f} | {p[1]:.4f} | {p[2]:.4f} | "
                     f"{s['dice']['first']:.3f} | "
                     + " | ".join(f"{s[k]['mean_sd'][0]:.3f} +- {s[k]['mean_sd'][1]:.3f}"
                                  for k in ("dice", "pixel_auc", "hd95_mm")) + " |")
    lines += ["", f"Paper, proposed, 10-fold DSC: {PAPER_TEN_FOLD_DSC[0]} +- "
                  f"{PAPER_TEN_FOLD_DSC[1]}.", "",
              "Patch classifier (LeNet) on held-out patches:", "",
              "| figure | paper | ours (first fold) | ours mean +- sd |", "|---|---|---|---|"]
    for k, v in PAPER_CLASSIFIER.items():
        lines.append(f"| {k} | {v:.4f} | {cls[k]['first']:.4f} | "
                     f"{cls[k]['mean_sd'][0]:.4f} +- {cls[k]['mean_sd'][1]:.4f} |")
    out = os.path.join(workdir, "cv")
    fileio.makedirs(out)
    tables = {"folds": [int(r["fold"]) for r in records], "segmentation": seg,
              "classifier": cls,
              "paper": {"segmentation_fold1": PAPER_SEGMENTATION,
                        "ten_fold_dsc": PAPER_TEN_FOLD_DSC, "classifier": PAPER_CLASSIFIER}}
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(out, "sathish2020_tables.md"), "\n".join(lines) + "\n")
        atomic_write_json(os.path.join(out, "sathish2020_tables.json"), tables)
        plot_tables(seg, os.path.join(out, "sathish2020_tables.png"),
                    title=f"{config.name}: lung DSC, {n_folds(len(records))} vs the paper's fold 1")
    print("\n".join(lines), flush=True)
    return {**report, "sathish2020": tables}


def plot_tables(seg: dict, path: str, *, title: str) -> None:
    """DSC per segmenter: ours (mean +- sd over folds) beside the paper's fold 1."""
    from matplotlib.figure import Figure

    from lungjax.evaluation.plots import save_figure

    names = list(seg)
    x = np.arange(len(names))
    fig = Figure(figsize=(1.6 * len(names) + 2, 3.6))
    ax = fig.subplots()
    ours = [seg[n]["dice"]["mean_sd"] for n in names]
    ax.bar(x - 0.18, [m for m, _ in ours], 0.36, yerr=[s for _, s in ours], capsize=3,
           label="ours (mean +- sd over folds)", color="C0")
    paper = [PAPER_SEGMENTATION.get(n, (np.nan,))[0] for n in names]
    ax.bar(x + 0.18, paper, 0.36, label="paper (fold 1)", color="C3")
    ax.set_xticks(x, names)
    ax.set_ylabel("lung DSC")
    ax.set_ylim(0, 1)
    ax.grid(True, axis="y", alpha=0.4)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
