"""xie2018 on the engine: anchor-based patch sampling with provisional tests, whole-scan
detection for ``--mode=evaluate``, and the paper's Table 1 in ``--mode=cv``.

Registered entries (chosen by the config, see ``configs/xie2018.py``):

* ``SAMPLERS["xie2018_anchors"]`` -> :class:`AnchorSamplingData`: the training data. Round 0
  samples patches around the ground-truth nodules only (anchors_0 = S_gt). At every round
  boundary the loop calls ``begin_round``: a provisional test of the current network over
  every full training scan; its false positives replace the previous ones as sampling
  anchors (anchors_{i+1} = S_gt U S_fp(i), ``Sampler.add_false_positives(replace=True)``).
  The anchors, the round and the provisional results are host-side state: they are saved
  with every checkpoint, so a resumed run continues the same round on the same anchors.
  ``sampler.update_anchors=False`` is the paper's fixed-anchor ablation.
* ``DETECTORS["xie2018_detection"]`` -> :func:`detect_scans`: fully convolutional
  detection over whole held-out scans (tiled), threshold, NMS across both heads (sphere
  IoU, soft-NMS or distance), LUNA16 marks in world mm.
* ``CV_REPORTS["xie2018_table1"]`` -> :func:`table1`: after the folds of the method,
  trains the fixed-anchor ablation on the same folds, detects with an ensemble of the two
  models of each fold (their dense predictions averaged before NMS), and writes FROC at the
  seven operating points, FROC[luna] (CPM) and FROC[new] of the three systems.

Every host runs the same provisional test on the same scans (deterministic), so all hosts
hold the same sampler state without communication.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lungjax import fileio
from lungjax.data.pipeline import StoreTrainData
from lungjax.data.sampler import HARD_NEG, NODULE, spread_subset
from lungjax.registry import CV_REPORTS, DETECTORS, EXPORTED_DETECTORS, SAMPLERS
from lungjax.steps import forward_apply

# ----------------------------------------------------------------------------------
# Whole-scan detection
# ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def scan_apply_fn(model):
    """``apply(variables, x) -> per-head outputs`` in inference mode (mean RReLU slope,
    running batch statistics). One function object per model, so the jitted decoder of
    ``anchors_decode.detect_volume`` compiles once per tile shape."""
    return lambda variables, x: forward_apply(model, variables, x)


@functools.lru_cache(maxsize=8)
def ensemble_apply_fn(model):
    """Like :func:`scan_apply_fn` for a LIST of variable trees of the same model: per
    anchor, the noduleness probabilities are averaged (returned as the logit of the mean)
    and the regression deltas averaged."""

    def apply(variables_list, x):
        outs = [forward_apply(model, v, x) for v in variables_list]
        heads = []
        for per_head in zip(*outs):
            st = jnp.stack(per_head)  # (members, B, d, h, w, A, 5)
            p = jnp.clip(jnp.mean(jax.nn.sigmoid(st[..., 0]), axis=0), 1e-7, 1 - 1e-7)
            logit = jnp.log(p) - jnp.log1p(-p)
            heads.append(jnp.concatenate([logit[..., None], jnp.mean(st[..., 1:], axis=0)],
                                         axis=-1))
        return tuple(heads)

    return apply


def detection_kwargs(config, model) -> dict:
    """``anchors_decode.detect_store`` arguments from ``config.detection`` (see
    :func:`detection_settings`) for ``model`` (its coarsest stride pads the volume)."""
    return detection_settings(config.detection.to_dict(), config.data.spacing_zyx,
                              int(model.backbone_strides()[-1]))


def detection_settings(detection, spacing_zyx, multiple: int) -> dict:
    """``anchors_decode.detect_volume`` arguments from a ``detection`` section (a config's,
    or an export's sidecar).

    Fields: threshold, nms ("iou" | "soft" | "distance"), nms_iou, soft_nms_sigma,
    nms_distance_mm, max_candidates_per_scan (0 = no cap), tile_zyx (empty = one pass),
    halo (voxels of context around each tile; rounded up to a multiple of the coarsest
    stride), lung_only (detections inside the lung mask only). ``multiple``: the
    network's coarsest stride.
    """
    d = detection
    cap = int(d["max_candidates_per_scan"] or 0)
    tile = tuple(int(t) for t in (d["tile_zyx"] or ()))
    mm = float(np.mean(spacing_zyx))
    return dict(threshold=float(d["threshold"]), method=str(d["nms"]),
                iou_threshold=float(d["nms_iou"]), sigma=float(d["soft_nms_sigma"]),
                radius=float(d["nms_distance_mm"]) / mm,
                max_candidates=cap or None, tile_zyx=tile or None,
                halo=int(d["halo"]) if tile else 0, multiple=int(multiple),
                lung_only=bool(d["lung_only"]))


def detect_scans(config, model, task, variables, store, uids: Sequence[str], *,
                 ensemble: bool = False, progress: bool = False):
    """Detections of whole stored scans (the ``--mode=evaluate`` detector).

    Args:
      config: run config (``detection`` section, see :func:`detection_kwargs`).
      model: the ``XieFPN`` (as used on whole scans).
      task: the ``AnchorDetectionTask`` (its anchors).
      variables: Flax variables (numpy or jax); with ``ensemble`` a list of them.
      store: ``PatchStore``; uids: scans, in order.

      progress: unused (one line per scan is printed by the decoder's caller).

    Returns:
      ``lungjax.detect.DetectionRun`` (marks in world mm, per-scan seconds; no
      per-scan candidate objects).
    """
    del progress
    from lungjax.detect import DetectionRun
    from lungjax.tasks.anchors_decode import detect_store

    variables = jax.device_get(variables)  # one device, not an 8-way replicated program
    fn = ensemble_apply_fn(model) if ensemble else scan_apply_fn(model)
    marks, seconds = detect_store(fn, store, list(uids), task.cfg, variables=variables,
                                  **detection_kwargs(config, model))
    return DetectionRun(marks, {}, seconds)


DETECTORS.register("xie2018_detection", detect_scans)


@EXPORTED_DETECTORS.register("xie2018_detection")
class ExportedAnchorDetector:
    """The detector as a "detect" stage export: the network's raw heads exported for any
    input whose sides are multiples of its coarsest stride, the anchors and detection
    settings in the sidecar; ``load`` gives what ``python -m lungjax.detect`` runs."""

    # The score map ``find`` returns: the finest head's best anchor noduleness per cell.
    MAPS = ("noduleness",)

    @staticmethod
    def export(run) -> dict:
        from lungjax import train as train_lib
        from lungjax.stages import export_stage

        cfg = run.config
        # Shape-polymorphic export: XLA's own convolutions (the CPU-fast plans are chosen
        # per concrete shape: the predict command runs the network rebuilt, ``rebuild``).
        model = train_lib.build_model(cfg).clone(conv_impl="xla")
        multiple = int(model.backbone_strides()[-1])

        def predict(variables, image):
            return model.apply(variables, image, train=False)

        meta = {"detection": cfg.detection.to_dict(), "coarsest_stride": multiple,
                "output": "per head (B, d, h, w, anchors, 5): noduleness logit, box deltas"}
        return export_stage(run, predict, (None, None, None), meta, multiple_of=multiple,
                            rebuild="heads")

    @staticmethod
    def load(export_dir: str):
        """``find(volume, geometry, lung) -> (world_xyz (K, 3), score (K,), diameter_mm
        (K,), {}, {"noduleness": (finest head's map, its Geometry)})`` of the export in
        ``export_dir``."""
        from lungjax.data.coords import voxel_to_world
        from lungjax.detect import score_map_geometry
        from lungjax.export import load_predictor
        from lungjax.registry import TASKS
        from lungjax.tasks.anchors_decode import detect_volume

        predict, sidecar = load_predictor(export_dir)
        task = TASKS.build(sidecar["task"])
        spacing = sidecar["preprocessing"]["spacing_zyx"]
        kw = detection_settings(sidecar["detection"], spacing, sidecar["coarsest_stride"])
        lung_only = kw.pop("lung_only")

        def find(volume, geometry, lung):
            det, (dense, head) = detect_volume(predict, volume, task.cfg, jit=False,
                                               lung_mask=lung if lung_only else None,
                                               score_map=True, **kw)
            world = voxel_to_world(det.centre_zyx, geometry).reshape(-1, 3)
            maps = {"noduleness": (dense, score_map_geometry(head, geometry))}
            return world, det.score, det.diameter * float(np.mean(spacing)), {}, maps

        return find


# ----------------------------------------------------------------------------------
# Anchor-based patch sampling
# ----------------------------------------------------------------------------------


def _nodules_hit(points_zyx: np.ndarray, centres_zyx: np.ndarray, radius_mm: np.ndarray,
                 spacing_zyx: np.ndarray) -> np.ndarray:
    """(N,) bool: nodule n (voxel centre, radius in mm) has one of the (P, 3) voxel points
    inside its sphere (the LUNA16 rule: distance < radius)."""
    from lungjax.data.coords import within_sphere

    if not len(points_zyx) or not len(centres_zyx):
        return np.zeros(len(centres_zyx), bool)
    inside = within_sphere(points_zyx[None], centres_zyx[:, None], radius_mm[:, None],
                           spacing=spacing_zyx)
    return np.any(inside, axis=1)


@SAMPLERS.register("xie2018_anchors")
class AnchorSamplingData(StoreTrainData):
    """``StoreTrainData`` whose sampling anchors are updated by provisional tests.

    Config fields read (besides ``StoreTrainData``'s): ``sampler.update_anchors`` (False:
    fixed anchors = ground truth only, the ablation), ``sampler.provisional_threshold``
    (noduleness above which a provisional detection counts), ``sampler.max_fp_per_scan``
    (detections per scan kept, highest first), ``sampler.provisional_scans`` (how many
    training scans the provisional test covers, evenly spread over the sorted list; 0 =
    all, as the paper), ``sampler.min_positive_fraction`` (floor of
    the positives' share of a batch once false positives exist; 0 = the anchors' own
    ratio |S_gt| / |S_gt U S_fp|), and the ``detection`` section for tiling and NMS.

    Round r's batches hold positives (patches around S_gt) and negatives (patches around
    S_fp(r - 1)) in the proportion above; round 0, with no false positives yet, only
    positives (the other anchors of each patch are its negatives).
    """

    def __init__(self, config, store, train_uids, eval_uids=None, **kw):
        super().__init__(config, store, train_uids, eval_uids, **kw)
        s = config.sampler
        self.update_anchors = bool(s.update_anchors)
        self.provisional_threshold = float(s.provisional_threshold)
        self.max_fp_per_scan = int(s.max_fp_per_scan)
        self.provisional_scans = int(s.provisional_scans)
        if self.provisional_scans < 0:
            raise ValueError(f"config.sampler.provisional_scans: must be >= 0 (0 = every "
                             f"training scan), got {self.provisional_scans}")
        self.min_positive_fraction = float(s.min_positive_fraction)
        self.base_positive_fraction = float(self.sampler.cfg.positive_fraction)
        self.provisional: dict[int, dict[str, Any]] = {}

    # -- rounds ------------------------------------------------------------------
    def begin_round(self, round_index: int, engine, state) -> None:
        """Called by the loop before ``iterator(round_index)`` at a round boundary."""
        cur = self.sampler.current_index
        if not self.update_anchors or round_index == 0 or (
                cur is not None and cur.round == round_index):
            return  # fixed anchors, or this round's anchors are already in place
        self.provisional_test(round_index, engine.model, engine.task, state.variables())

    def provisional_scan_indices(self) -> np.ndarray:
        """(K,) int: indices into the training uids the provisional test runs on, every
        scan unless ``sampler.provisional_scans`` caps it (evenly spread, deterministic, so
        every host and a resumed run test the same scans)."""
        return spread_subset(len(self.sampler.uids), self.provisional_scans)

    def provisional_test(self, round_index: int, model, task, variables) -> dict[str, Any]:
        """Detects on the training scans (:meth:`provisional_scan_indices`) and makes the
        false positives the new hard anchors (replacing the previous ones). Returns and
        keeps the round's record."""
        from lungjax.tasks.anchors_decode import detect_volume

        cfg = self.config
        if cfg.detection.conv_impl and hasattr(model, "conv_impl"):
            model = model.clone(conv_impl=cfg.detection.conv_impl)
        kw = detection_kwargs(cfg, model)
        kw.update(threshold=self.provisional_threshold, max_candidates=self.max_fp_per_scan)
        lung_only = kw.pop("lung_only")
        fn = scan_apply_fn(model)
        variables = jax.device_get(variables)
        t0 = time.perf_counter()
        scan_ids, centres, scores = [], [], []
        hit = n_nod = 0
        tested = self.provisional_scan_indices()
        for s in tested:
            uid = self.sampler.uids[s]
            lung = self.store.read_volume(uid, "lung") if lung_only else None
            det = detect_volume(fn, self.store.read_volume(uid), task.cfg, variables=variables,
                                lung_mask=lung, **kw)
            scan_ids.append(np.full(len(det), s, np.int32))
            centres.append(det.centre_zyx)
            scores.append(det.score)
            info = self.sampler.scans[s]
            hit += int(_nodules_hit(det.centre_zyx, info.nodules_zyx, info.nodule_radius_mm,
                             info.spacing_zyx).sum())
            n_nod += len(info.nodules_zyx)
        scan_ids = np.concatenate(scan_ids)
        centres = np.concatenate(centres).reshape(-1, 3)
        scores = np.concatenate(scores)
        added = self.sampler.add_false_positives([self.sampler.uids[i] for i in scan_ids],
                                                 centres, scores, replace=True)
        record = {"scan": scan_ids, "centre_zyx": centres.astype(np.float32),
                  "score": scores.astype(np.float32), "fp_anchors": int(added),
                  "nodules_hit": int(hit), "nodules": int(n_nod),
                  "seconds": float(time.perf_counter() - t0)}
        self.provisional[int(round_index)] = record
        print(f"[round {round_index}] provisional test on {len(tested)} training "
              f"scans: {len(scores)} detections, {hit}/{n_nod} nodules hit, {added} false "
              f"positives -> sampling anchors ({record['seconds']:.1f} s)", flush=True)
        return record

    def _set_positive_fraction(self) -> None:
        kinds = self.sampler.pool["kind"]
        n_pos, n_fp = int(np.sum(kinds == NODULE)), int(np.sum(kinds == HARD_NEG))
        if n_fp == 0:
            frac = self.base_positive_fraction
        else:
            frac = max(n_pos / (n_pos + n_fp), self.min_positive_fraction,
                       1.0 / self.sampler.batch_size)
        self.sampler.cfg = dataclasses.replace(self.sampler.cfg, positive_fraction=min(frac, 1.0))

    def iterator(self, round_index: int):
        cur = self.sampler.current_index
        if cur is None or cur.round != round_index or cur.seed != self.seed:
            self._set_positive_fraction()  # a new index: its share from the current anchors
        return super().iterator(round_index)

    # -- checkpointed state ---------------------------------------------------------
    def state_dict(self) -> dict:
        out = dict(super().state_dict())
        out["provisional"] = {f"round_{r}": dict(v) for r, v in self.provisional.items()}
        return out

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.provisional = {}
        for key, v in (state.get("provisional") or {}).items():
            rec = dict(v)
            rec["scan"] = np.asarray(rec["scan"], np.int32).reshape(-1)
            rec["centre_zyx"] = np.asarray(rec["centre_zyx"], np.float32).reshape(-1, 3)
            rec["score"] = np.asarray(rec["score"], np.float32).reshape(-1)
            self.provisional[int(key.split("_", 1)[1])] = rec
        self._set_positive_fraction()

    def anchor_summary(self) -> dict[str, int]:
        """Sampling anchors by kind (ground truth, false positives)."""
        kinds = self.sampler.pool["kind"]
        return {"gt": int(np.sum(kinds == NODULE)), "fp": int(np.sum(kinds == HARD_NEG))}


# ----------------------------------------------------------------------------------
# Table 1: single model, fixed-anchor ablation, ensemble
# ----------------------------------------------------------------------------------


def ensemble_fold(config, members: Sequence[str], out_dir: str, uids: Sequence[str], store):
    """Ensemble detection of one fold's held-out scans with the latest checkpoints of
    ``members`` ("train" stage folders of the same model config); writes
    ``submission.csv`` in ``out_dir`` (reused when present) and returns the marks."""
    from lungjax import train as train_lib
    from lungjax.data.tables import read_marks_csv, write_marks_csv
    from lungjax.stages import restore_variables, scan_model

    sub = os.path.join(out_dir, "submission.csv")
    if fileio.isfile(sub):
        return read_marks_csv(sub)
    model, task = scan_model(config), train_lib.build_task(config)
    variables = [restore_variables(m)[0] for m in members]
    run = detect_scans(config, model, task, variables, store, uids, ensemble=True)
    fileio.makedirs(out_dir)
    if jax.process_index() == 0:
        write_marks_csv(sub, run.marks)
    return run.marks


@CV_REPORTS.register("xie2018_table1")
def table1(config, workdir: str, records: Sequence[dict], report: dict) -> dict:
    """The paper's Table 1 over the cross-validation folds (called by ``--mode=cv`` after
    the folds, with the method's fold records and report).

    Each fold holds the method (``fold_<k>/detector``) and the fixed-anchor ablation (the
    variant ``fixed_anchors``: ``fold_<k>/fixed_anchors/detector``); this writes
    ``<workdir>/ensemble/fold_<k>/submission.csv`` (the two detectors' dense predictions
    averaged before NMS) and ``<workdir>/table1/`` (cv_report with per-fold CPM /
    FROC[new] of each system and the pooled FROC table).
    """
    from lungjax.data.store import PatchStore
    from lungjax.evaluation.froc import compute_froc
    from lungjax.evaluation.reports import cv_report, pooled_froc
    from lungjax.stages import fold_config, fold_marks, stage_specs
    from lungjax.train_data import prepare_data

    variant = "fixed_anchors"
    net = next(n for n, s in stage_specs(config) if s["kind"] == "train")
    store = PatchStore.open(prepare_data(config))
    systems = {"single model": [], "fixed anchors": [], "ensemble": []}
    per_fold = []
    for rec in records:
        k = int(rec["fold"])
        cfg = fold_config(config, k)
        uids, single = fold_marks(rec)
        _, ablation = fold_marks(rec, variant)
        members = [rec["dirs"][net], rec["variants"][variant]["dirs"][net]]
        ens = ensemble_fold(cfg, members, os.path.join(workdir, "ensemble", f"fold_{k}"),
                            uids, store)
        row: dict[str, Any] = {"fold": k}
        ann, exc = store.findings(uids), store.excluded(uids)
        for name, marks in (("single model", single), ("fixed anchors", ablation),
                            ("ensemble", ens)):
            systems[name].append((uids, marks))
            r = compute_froc(ann, exc, uids, marks)
            tag = name.replace(" ", "_")
            row[f"cpm_{tag}"], row[f"froc_new_{tag}"] = r.cpm, r.froc_new
        per_fold.append(row)
    all_uids = [u for uids, _ in systems["single model"] for u in uids]
    ann, exc = store.findings(all_uids), store.excluded(all_uids)
    pooled = {name: pooled_froc(ann, exc, parts) for name, parts in systems.items()}
    out = cv_report(per_fold, os.path.join(workdir, "table1"),
                    title=f"{config.name}: Table 1 ({len(records)}-fold cross-validation; "
                          "single model, fixed-anchor ablation, ensemble)",
                    pooled=pooled["single model"], systems=pooled,
                    missing_folds=report.get("missing_folds", ()))
    for name, r in pooled.items():
        sens = " ".join(f"{s:.3f}" for s in np.asarray(r.sensitivities))
        print(f"{name:>14}: {sens}  CPM {r.cpm:.4f}  FROC[new] {r.froc_new:.4f}", flush=True)
    out["method_report"] = report
    return out
