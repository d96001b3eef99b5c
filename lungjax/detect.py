"""Whole-scan detection: score volume -> candidates -> LUNA16 marks (world mm).

* :func:`detect_volume` scores one preprocessed volume and returns its candidates;
* :func:`run_detection` / :func:`detect_store` do that for scans of a prepared
  ``PatchStore`` (progress bar, seconds per scan);
* :func:`detect_scan` does it for a scan file never seen by the store (read -> preprocess
  exactly like the store -> score), the path of a deployed model;
* :func:`screening_stats` gives stage-1 sensitivity and false positives per scan (the
  screening table of Dou et al. 2017);
* :func:`write_submission` writes the LUNA16 submission CSV (optional diameter column).

Command line, on the folder ``--mode=export`` prints (every stage of the method), for
scan files, DICOM series folders or folders of scans (:func:`main` lists the outputs)::

    python -m lungjax.detect --model=EXPORT_DIR --scan=PATH [--scan=PATH ...] --out=DIR
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import special

from lungjax import fileio
from lungjax.data.coords import Geometry, within_sphere
from lungjax.data.tables import Findings, Marks, write_marks_csv
from lungjax.tasks.screening import (Candidates, OutputMapping, candidates_from_scores,
                                     inside_mask, mask_at_cells, score_volume)

log = logging.getLogger(__name__)

# Preprocessing settings of a store manifest that detect_scan reproduces (the keyword
# arguments of lungjax.data.preprocess.preprocess_scan).
PREPROCESS_KEYS = ("spacing_zyx", "hu_window", "margin_mm", "closing_mm")


@dataclasses.dataclass(frozen=True)
class DetectionSettings:
    """How score volumes become candidates.

    Attributes:
      threshold: minimum score of a candidate (dou2017 stage 1: 0.85).
      nms_radius_mm: no two candidates of a scan closer than this (mm).
      tile_zyx: input voxels per tile core for ``score_volume`` (None: one pass; a 300^3
        scan through the dou2017 FCN needs tiles on a machine with little memory).
      batch: tiles per network call.
      max_candidates: cap per scan, highest scores kept (None: no cap).
      input_zyx: the one spatial input shape the predictor accepts (an export made for a
        fixed tile size), see ``score_volume``; None: any shape.
      lung_only: score cells and candidates outside the scan's lung mask (the store's
        "lung" array, closed and hole-filled so juxtapleural nodules stay in) are dropped;
        the cells before suppression, so that they neither suppress an in-lung peak nor
        take a place under ``max_candidates``. Not in the paper; off by default.
      log_odds: the predictor returns log-odds instead of probabilities; ``threshold``
        stays a probability (compared as its log-odds), peaks are ranked by log-odds and
        candidate scores are their float64 probabilities. A float32 probability is 1.0
        for every cell past ~17 log-odds, so a trained network's saturated cells would
        otherwise be ranked, and cut at ``max_candidates``, by position in the volume.
      refine_radius_mm: > 0 places each candidate at the centroid of the probability above
        the threshold within this radius of its peak
        (``lungjax.tasks.screening.refine_peaks``); 0 keeps the peak cell.
    """

    threshold: float = 0.85
    nms_radius_mm: float = 5.0
    tile_zyx: tuple[int, int, int] | None = None
    batch: int = 1
    max_candidates: int | None = None
    input_zyx: tuple[int, int, int] | None = None
    lung_only: bool = False
    log_odds: bool = False
    refine_radius_mm: float = 0.0

    def __post_init__(self):
        if not self.nms_radius_mm >= 0:
            raise ValueError(f"nms_radius_mm must be >= 0, got {self.nms_radius_mm}")
        if self.max_candidates is not None and self.max_candidates < 0:
            raise ValueError(f"max_candidates must be >= 0, got {self.max_candidates}")
        for name in ("tile_zyx", "input_zyx"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))

    @classmethod
    def from_config(cls, detection: Mapping[str, Any]) -> "DetectionSettings":
        """From a config's ``detection`` section (threshold, nms_distance_mm,
        max_candidates_per_scan (0 = no cap), tile_zyx (None/empty = one pass), batch)."""
        get = detection.get
        cap = get("max_candidates_per_scan", None)
        tile = get("tile_zyx", None)
        return cls(threshold=float(get("threshold", 0.85)),
                   nms_radius_mm=float(get("nms_distance_mm", 5.0)),
                   tile_zyx=tuple(tile) if tile else None, batch=int(get("batch", 1) or 1),
                   max_candidates=int(cap) if cap else None,
                   lung_only=bool(get("lung_only", False)),
                   log_odds=bool(get("log_odds", False)),
                   refine_radius_mm=float(get("refine_radius_mm", 0.0)))


def detect_volume(predict_fn: Callable, volume_zyx: np.ndarray, geometry: Geometry,
                  mapping: OutputMapping, settings: DetectionSettings, *,
                  lung_mask: np.ndarray | None = None, variables: Any = None,
                  jit: bool = True, score_map: bool = False):
    """Candidates of one preprocessed volume.

    Args:
      predict_fn: (B, D, H, W, 1) float32 -> (B, D', H', W') nodule probability (see
        ``lungjax.tasks.screening.foreground_probability`` to wrap a logits network).
      volume_zyx: (D, H, W) float32 image as the network was trained on (store: [0, 1]).
      geometry: the volume's grid (``ScanRecord.geometry``).
      mapping: the network's output mapping (input-grid relative, before padding).
      settings: threshold, NMS radius, tiling.
      lung_mask: (D, H, W) lung mask of the volume, used when ``settings.lung_only``.
      variables: when given, ``predict_fn(variables, x)`` is called (e.g. flax variables
        with ``lungjax.steps.make_predict_fn``'s function).
      jit: jit ``predict_fn`` (False for a function that is not traceable, e.g. one
        returning numpy).
      score_map: also return the score map as a volume.

    Returns:
      :class:`lungjax.tasks.screening.Candidates` in the volume's grid and world mm. With
      ``score_map``: (Candidates, ((D', H', W') float32 nodule probability, the map's
      Geometry (:func:`score_map_geometry`))).
    """
    scores, cell_map = score_volume(predict_fn, volume_zyx, mapping, settings.tile_zyx,
                                    settings.batch, variables=variables,
                                    input_zyx=settings.input_zyx, jit=jit)
    cands = candidates_of_scores(scores, cell_map, geometry, settings, np.shape(volume_zyx),
                                 lung_mask=lung_mask)
    if not score_map:
        return cands
    scores = np.reshape(scores, np.shape(scores)[:3])  # (D', H', W'[, 1]) -> (D', H', W')
    prob = special.expit(scores) if settings.log_odds else scores
    return cands, (np.asarray(prob, np.float32), score_map_geometry(cell_map, geometry))


def candidates_of_scores(scores: np.ndarray, cell_map: OutputMapping, geometry: Geometry,
                         settings: DetectionSettings, shape_zyx: Sequence[int], *,
                         lung_mask: np.ndarray | None = None) -> Candidates:
    """The candidates of one volume's score map (the part of :func:`detect_volume` after
    the network: threshold, NMS, centroid refinement, lung restriction), so that one
    score map can be read with several settings.

    Args:
      scores: (D', H', W') (or (D', H', W', 1)) float network output of
        :func:`lungjax.tasks.screening.score_volume`: probability, or log-odds when
        ``settings.log_odds``.
      cell_map: its output cells' mapping to input voxels (from ``score_volume``).
      geometry: the volume's grid; shape_zyx: the volume's (D, H, W).
      settings: threshold, NMS radius, refinement, lung restriction, cap.
      lung_mask: (D, H, W) lung mask, used when ``settings.lung_only``.
    """
    if scores.ndim == 4 and scores.shape[-1] == 1:
        scores = scores[..., 0]
    restrict = settings.lung_only
    if restrict and (lung_mask is None or tuple(np.shape(lung_mask)) != tuple(shape_zyx)):
        raise ValueError(f"lung_only needs a lung mask of the volume's shape "
                         f"{tuple(shape_zyx)}, got {np.shape(lung_mask)}")
    threshold = settings.threshold
    if restrict:
        # Cells outside the lung leave before suppression, as xie2018's anchors do: a
        # chest-wall peak would otherwise suppress an in-lung nodule's peak within the NMS
        # radius and then be dropped itself (stage-1 hits on the held-out fold of the
        # generated default data, seeds 0 / 1 / 2 / 3, the same FCNs: 32/35, 30/34, 31/33,
        # 29/38 with the restriction after suppression; 32, 33, 32, 34 before it, with
        # 150 candidates a scan).
        scores = np.where(mask_at_cells(lung_mask, cell_map, scores.shape), scores, -np.inf)
    weights = None
    if settings.log_odds:
        threshold = float(special.logit(np.clip(threshold, 1e-12, 1 - 1e-12)))
        if settings.refine_radius_mm > 0:  # probability above the threshold, not log-odds
            weights = np.clip(special.expit(scores.astype(np.float64)) - settings.threshold,
                              0, None)
    cands = candidates_from_scores(scores, cell_map, geometry, threshold=threshold,
                                   nms_radius_mm=settings.nms_radius_mm,
                                   max_candidates=None if restrict else settings.max_candidates,
                                   shape_zyx=tuple(shape_zyx),
                                   refine_radius_mm=settings.refine_radius_mm,
                                   refine_weights=weights)
    if settings.log_odds:
        cands = dataclasses.replace(cands, score=special.expit(cands.score.astype(np.float64)))
    if restrict:
        cands = cands.select(np.flatnonzero(inside_mask(lung_mask, cands.voxel_zyx))
                             [:settings.max_candidates])
    return cands


def score_map_geometry(cell_map: OutputMapping, geometry: Geometry) -> Geometry:
    """The grid of a score map: cell c (z, y, x) speaks for voxel ``offset + stride * c``
    of the volume on ``geometry`` (:class:`OutputMapping`), so the map is a volume with
    ``stride`` times the spacing whose voxel 0 sits at that offset."""
    from lungjax.data.coords import voxel_to_world

    stride_xyz = np.asarray(cell_map.stride_zyx, np.float64)[::-1]
    origin = voxel_to_world(np.asarray(cell_map.offset_zyx, np.float64), geometry)
    return Geometry(geometry.spacing * stride_xyz, origin.reshape(3), geometry.direction)


@dataclasses.dataclass
class DetectionRun:
    """What :func:`run_detection` found and how long it took.

    Attributes:
      marks: all scans' candidates as LUNA16 marks (world mm, probability).
      candidates: uid -> :class:`Candidates` (voxels in the store grid, for stage 2).
      seconds: uid -> {"read", "detect", "total"} wall-clock seconds.
    """

    marks: Marks
    candidates: dict[str, Candidates]
    seconds: dict[str, dict[str, float]]

    def mean_seconds_per_scan(self) -> float:
        return float(np.mean([s["total"] for s in self.seconds.values()])) if self.seconds else 0.0


def _progress(iterable, enabled: bool, total: int):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it all the same
        return iterable
    return tqdm(iterable, total=total, desc="detect", unit="scan")


def run_detection(predict_fn: Callable, store: Any, uids: Sequence[str], mapping: OutputMapping,
                  settings: DetectionSettings, *, variables: Any = None,
                  progress: bool = True) -> DetectionRun:
    """Detects on stored scans.

    Args:
      predict_fn: as in :func:`detect_volume`.
      store: a ``lungjax.data.store.PatchStore`` (or anything with ``scan(uid)`` returning
        a record with ``.geometry`` and ``read_volume(uid)``).
      uids: scans to process, in order.
      mapping: the network's output mapping.
      settings: :class:`DetectionSettings`.
      variables: optional first argument of ``predict_fn``.
      progress: show a progress bar with seconds per scan.

    Returns:
      :class:`DetectionRun`.
    """
    parts, candidates, seconds = [], {}, {}
    bar = _progress(uids, progress, len(uids))
    for uid in bar:
        t0 = time.perf_counter()
        rec = store.scan(uid)
        volume = store.read_volume(uid)
        lung = store.read_volume(uid, "lung") if settings.lung_only else None
        t1 = time.perf_counter()
        cands = detect_volume(predict_fn, volume, rec.geometry, mapping, settings,
                              lung_mask=lung, variables=variables)
        t2 = time.perf_counter()
        candidates[uid] = cands
        parts.append(Marks(np.full(len(cands), uid), cands.world_xyz, cands.score))
        seconds[uid] = {"read": t1 - t0, "detect": t2 - t1, "total": t2 - t0}
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(s_per_scan=f"{t2 - t0:.1f}", candidates=len(cands))
        log.info("detect %s: %d candidates, %.2f s (read %.2f s)", uid, len(cands), t2 - t0,
                 t1 - t0)
    return DetectionRun(Marks.concatenate(parts), candidates, seconds)


def detect_store(predict_fn: Callable, store: Any, uids: Sequence[str], mapping: OutputMapping,
                 threshold: float = 0.85, nms_radius_mm: float = 5.0, *,
                 tile_zyx: Sequence[int] | None = None, batch: int = 1,
                 max_candidates: int | None = None, variables: Any = None,
                 progress: bool = True) -> Marks:
    """LUNA16 marks (world mm, probability) of stored scans; see :func:`run_detection`."""
    settings = DetectionSettings(threshold, nms_radius_mm,
                                 None if tile_zyx is None else tuple(tile_zyx), batch,
                                 max_candidates)
    return run_detection(predict_fn, store, uids, mapping, settings, variables=variables,
                         progress=progress).marks


def preprocess_kwargs(preprocess_cfg: Mapping[str, Any]) -> dict:
    """The ``preprocess_scan`` keyword arguments from a store manifest or export sidecar.

    Raises:
      ValueError: a setting the store relies on is missing (spacing_zyx, hu_window).
    """
    missing = [k for k in ("spacing_zyx", "hu_window") if k not in preprocess_cfg]
    if missing:
        raise ValueError(f"preprocessing settings lack {missing}; expected the store manifest's "
                         f"{list(PREPROCESS_KEYS)}")
    return {k: preprocess_cfg[k] for k in PREPROCESS_KEYS if k in preprocess_cfg}


def detect_scan(predict_fn: Callable, scan_path: str | os.PathLike,
                preprocess_cfg: Mapping[str, Any], mapping: OutputMapping,
                settings: DetectionSettings, *, uid: str | None = None,
                variables: Any = None, jit: bool = True) -> tuple[Marks, dict]:
    """Detects nodules in a scan file: read -> preprocess as the store did -> score.

    Args:
      predict_fn: as in :func:`detect_volume`.
      scan_path: .mhd/.mha/.nii(.gz) file or DICOM series folder.
      preprocess_cfg: the store's settings (its manifest, or the export's sidecar):
        spacing_zyx, hu_window, and optionally margin_mm, closing_mm.
      mapping: the network's output mapping.
      settings: :class:`DetectionSettings`.
      uid: series uid for the marks; default: the file name without extension (the
        LUNA16 naming).
      variables: optional first argument of ``predict_fn``.
      jit: as in :func:`detect_volume`.

    Returns:
      (marks in world mm, info dict with seconds per step and the preprocessed shape).

    Raises:
      lungjax.data.io.ScanReadError: unreadable scan.
      lungjax.data.preprocess.LungMaskError: no lung found.
    """
    volume, geometry, lung, uid, info = read_preprocessed(scan_path, preprocess_cfg, uid=uid)
    t0 = time.perf_counter()
    cands = detect_volume(predict_fn, volume, geometry, mapping, settings,
                          lung_mask=lung, variables=variables, jit=jit)
    info["seconds"]["detect"] = time.perf_counter() - t0
    info["seconds"]["total"] += info["seconds"]["detect"]
    info["candidates"] = len(cands)
    return Marks(np.full(len(cands), uid), cands.world_xyz, cands.score), info


def read_preprocessed(scan_path: str | os.PathLike, preprocess_cfg: Mapping[str, Any], *,
                      uid: str | None = None, lung_mask_path: str | None = None):
    """Reads a scan file and preprocesses it as the store did.

    ``lung_mask_path``: a lung mask on the scan's grid (LUNA16 ``seg-lungs-LUNA16``
    labels, or any mask with lung > 0) used instead of the threshold mask.

    Returns:
      (volume (D, H, W) float32 in [0, 1], its Geometry, lung mask (D, H, W) bool, uid,
      info {uid, shape_zyx, scan_grid (the scan's own Geometry, shape_zyx), seconds
      {read, preprocess, total}, series (a DICOM folder: the series read)}); ``uid``
      defaults to the file name without extension (the LUNA16 naming). A DICOM folder
      holding several series is read as its largest (most slices), said on the console.
    """
    from lungjax.data.io import dicom_series_sizes, read_scan
    from lungjax.data.preprocess import (LUNA16_LUNG_LABELS, LungMaskError, preprocess_scan,
                                         uint8_to_unit)

    path = os.fspath(scan_path)
    uid = _uid_of(path) if uid is None else uid
    t0 = time.perf_counter()
    series = dicom_series_sizes(path) if os.path.isdir(path) else {}
    chosen = next(iter(series), None)
    if len(series) > 1:  # a study folder with several series: the scan is the largest
        others = ", ".join(f"{u} ({n})" for u, n in list(series.items())[1:])
        print(f"{path}: {len(series)} DICOM series; reading the largest, {chosen} "
              f"({series[chosen]} slices); not read: {others}", flush=True)
    scan = read_scan(path, series_uid=chosen)
    t1 = time.perf_counter()
    seg = None
    if lung_mask_path is not None:
        mask = read_scan(lung_mask_path)
        if not np.allclose(mask.geometry.spacing, scan.geometry.spacing, rtol=1e-4) \
                or mask.array.shape != scan.array.shape:
            raise ValueError(f"{lung_mask_path}: lung mask grid {mask.array.shape} at "
                             f"{tuple(np.round(mask.geometry.spacing, 4))} mm differs from "
                             f"the scan's {scan.array.shape} at "
                             f"{tuple(np.round(scan.geometry.spacing, 4))} mm")
        seg = mask.array
        if not np.any(seg > 0):
            raise LungMaskError(f"{lung_mask_path}: empty lung mask: no voxel above 0")
        if not np.isin(seg, LUNA16_LUNG_LABELS).any():  # a binary mask: lung where > 0
            seg = np.where(seg > 0, LUNA16_LUNG_LABELS[0], 0).astype(np.uint8)
    pre = preprocess_scan(scan.array, scan.geometry, name=path, lung_seg=seg,
                          **preprocess_kwargs(preprocess_cfg))
    scan_grid = (scan.geometry, tuple(int(n) for n in scan.array.shape))
    del scan
    volume = uint8_to_unit(pre.image)
    t2 = time.perf_counter()
    info = {"uid": uid, "shape_zyx": list(volume.shape), "scan_grid": scan_grid,
            "seconds": {"read": t1 - t0, "preprocess": t2 - t1, "total": t2 - t0}}
    if chosen is not None:
        info["series"] = chosen
    return volume, pre.geometry, pre.lung, uid, info


def write_submission(path: str | os.PathLike, marks: Marks,
                     diameter_mm: np.ndarray | None = None,
                     columns: Mapping[str, np.ndarray] | None = None) -> None:
    """Writes a LUNA16 submission CSV (atomically); ``diameter_mm`` (M,) adds a
    diameter_mm column and ``columns`` {name: (M,)} more, which the challenge's
    evaluation ignores."""
    extra = {}
    named = dict(columns or {})
    if diameter_mm is not None:
        named = {"diameter_mm": diameter_mm, **named}
    for name, v in named.items():
        v = np.asarray(v, np.float64).reshape(-1)
        if len(v) != len(marks):
            what = "diameters" if name == "diameter_mm" else f"{name} values"
            raise ValueError(f"{os.fspath(path)}: {len(v)} {what} for {len(marks)} marks")
        extra[name] = v
    write_marks_csv(path, marks, extra or None)


# ---------------------------------------------------------------------------
# Stage-1 screening figures.
# ---------------------------------------------------------------------------


def _hits(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(P, C) bool: world point p (P, 3) inside sphere c (C, 3), radius (C,) mm."""
    return within_sphere(np.reshape(points, (-1, 1, 3)), np.reshape(centres, (1, -1, 3)),
                         np.reshape(radii, (1, -1)))


def screening_stats(marks: Marks, annotations: Findings, uids: Sequence[str],
                    excluded: Findings | None = None, *,
                    radius_mm: float | None = None) -> dict:
    """Stage-1 sensitivity and false positives per scan of a candidate set.

    A candidate hits a nodule when its squared world distance to the centre is below
    r^2, r = the nodule's radius (diameter / 2, LUNA16's rule) or ``radius_mm`` when given.
    A nodule is detected when any candidate hits it. A candidate that hits no nodule is a
    false positive unless it hits an excluded finding (diameter -1 counts as 10 mm), which
    makes it neither, as in the LUNA16 evaluation. Probabilities are ignored: every
    candidate counts (the screening operating point).

    Args:
      marks: candidates (world mm) of the scans in ``uids`` (others are ignored).
      annotations: reference nodules (world mm), e.g. ``PatchStore.findings(uids)``.
      uids: the scans evaluated (the FPs/scan denominator).
      excluded: LUNA16 excluded findings, e.g. ``PatchStore.excluded(uids)``; None: none.
      radius_mm: fixed hit radius instead of each nodule's own.

    Returns:
      dict with sensitivity, fps_per_scan, candidates_per_scan, n_nodules, n_detected,
      n_false_positives, n_candidates, n_scans, and missed (Findings not hit).
    """
    uids = list(dict.fromkeys(uids))
    if not uids:
        raise ValueError("screening_stats needs at least one scan uid")
    excluded = excluded if excluded is not None else Findings.empty()
    detected = np.zeros(len(annotations), bool)
    n_fp = n_cand = 0
    for uid in uids:
        m = marks.uid == uid
        pts = marks.xyz[m]
        n_cand += len(pts)
        a = np.flatnonzero(annotations.uid == uid)
        radii = (np.full(len(a), float(radius_mm)) if radius_mm is not None
                 else annotations.diameter_mm[a] / 2)
        hit = _hits(pts, annotations.xyz[a], radii)
        detected[a] |= hit.any(axis=0)
        e = excluded.uid == uid
        ed = excluded.diameter_mm[e]
        on_excluded = _hits(pts, excluded.xyz[e], np.where(ed < 0, 10.0, ed) / 2).any(axis=1)
        n_fp += int(np.sum(~hit.any(axis=1) & ~on_excluded))
    in_set = np.isin(annotations.uid, uids)
    n_nodules = int(in_set.sum())
    n_detected = int((detected & in_set).sum())
    return {
        "sensitivity": n_detected / n_nodules if n_nodules else float("nan"),
        "fps_per_scan": n_fp / len(uids),
        "candidates_per_scan": n_cand / len(uids),
        "n_nodules": n_nodules, "n_detected": n_detected, "n_false_positives": n_fp,
        "n_candidates": n_cand, "n_scans": len(uids),
        "missed": annotations.select(in_set & ~detected),
    }


def store_screening_stats(marks: Marks, store: Any, uids: Sequence[str], *,
                          radius_mm: float | None = None) -> dict:
    """:func:`screening_stats` against a ``PatchStore``'s nodules and excluded findings."""
    return screening_stats(marks, store.findings(uids), uids, store.excluded(uids),
                           radius_mm=radius_mm)


# ---------------------------------------------------------------------------
# Command line: an exported model on scan files.
# ---------------------------------------------------------------------------


def load_exported_detector(export_dir: str | os.PathLike):
    """An export directory (``lungjax.export``) as the pieces :func:`detect_scan` needs.

    The sidecar (export.json) must hold ``output_mapping`` (``OutputMapping.to_json()``)
    and the store's preprocessing, as ``preprocessing`` {spacing_zyx, hu_window,
    margin_mm, closing_mm} or at its top level; an optional ``detection`` section gives
    default settings (threshold, nms_distance_mm, max_candidates_per_scan).

    Returns:
      (predict, mapping, preprocess_cfg, settings, sidecar); ``settings.input_zyx`` is the
      exported input size when it is fixed.

    Raises:
      FileNotFoundError / ValueError naming the export directory and the missing field.
    """
    from lungjax.export import load_predictor

    export_dir = os.fspath(export_dir)
    predict, sidecar = load_predictor(export_dir)
    where = os.path.join(export_dir, "export.json")
    if "output_mapping" not in sidecar:
        raise ValueError(f"{where}: no 'output_mapping' field; export the screening model with "
                         "metadata={'output_mapping': mapping.to_json(), ...}")
    mapping = OutputMapping.from_json(sidecar["output_mapping"])
    pre = sidecar.get("preprocessing", sidecar)
    try:
        preprocess_cfg = preprocess_kwargs(pre)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    shape = sidecar.get("input", {}).get("shape", [])
    spatial = shape[1:1 + mapping.ndim]
    fixed = (tuple(int(s) for s in spatial)
             if len(spatial) == mapping.ndim and all(isinstance(s, int) for s in spatial) else None)
    det = dict(sidecar.get("detection", {}))
    settings = DetectionSettings.from_config(det)
    settings = dataclasses.replace(settings, input_zyx=fixed)
    return predict, mapping, preprocess_cfg, settings, sidecar


METHOD_JSON = "method.json"  # lungjax.stages.METHOD_JSON: the stages of a method export


@dataclasses.dataclass
class ExportedMethod:
    """A trained method as a function of one preprocessed volume.

    Attributes:
      preprocessing: the store's settings the method was trained on (spacing_zyx,
        hu_window, margin_mm, closing_mm): every scan is read and preprocessed with them.
      find: ``find(volume (D, H, W) float32 in [0, 1], geometry, lung (D, H, W) bool or
        None) -> (world_xyz (K, 3) mm, score (K,) probability, diameter_mm (K,) or None)``,
        optionally followed by ``{name: (D, H, W) mask of the volume}`` (a segmenting
        method's output; written on the scan's own grid), ``{name: (map float32, its
        Geometry)}`` (score maps, e.g. the screening network's nodule probability on its
        output grid; written with ``--save-maps``) and an ``extra`` dict: "columns"
        {name: (K,)} (more CSV columns per mark, e.g. shrey2020's
        malignancy_probability), "tables" {name: {column: (N,)}} (written as
        ``scans/<uid>_<name>.csv``) and "info" (JSON-able, into predict.json).
      description: the stages it runs, for the console.
      map_names: the score maps ``find`` returns (what ``--save-maps`` writes).
    """

    preprocessing: Mapping[str, Any]
    find: Callable
    description: str
    map_names: tuple[str, ...] = ()


# The score map of a screening network: its nodule probability per output cell.
SCREEN_MAPS = ("screen_probability",)


def _screening(export_dir: str, changes: Mapping[str, Any]):
    """(find, sidecar, settings) of an exported screening network: candidates of its
    score volume."""
    predict, mapping, _, settings, sidecar = load_exported_detector(export_dir)
    settings = dataclasses.replace(settings, **changes)

    def find(volume, geometry, lung):
        # The loaded predictor returns numpy: it runs as is, not under jit.
        c, prob = detect_volume(predict, volume, geometry, mapping, settings, lung_mask=lung,
                                jit=False, score_map=True)
        return c.world_xyz, c.score, None, {}, {SCREEN_MAPS[0]: prob}

    return find, sidecar, settings


def read_method_stages(export_dir: str) -> list[dict]:
    """The stage list of a method export (``<export_dir>/method.json``: name, kind,
    network, dir per stage, in order), every stage's ``export.json`` present.

    Raises:
      FileNotFoundError / ValueError naming the folder and what it lacks.
    """
    import json

    path = os.path.join(export_dir, METHOD_JSON)
    if not fileio.isfile(path):
        raise FileNotFoundError(f"{export_dir}: no {METHOD_JSON}; pass the folder "
                                "--mode=export printed")
    with fileio.open_file(path, encoding="utf-8") as f:
        stages = json.load(f)["stages"]
    if not stages:
        raise ValueError(f"{path}: no exported stage")
    for st in stages:
        if not fileio.isfile(os.path.join(export_dir, st["dir"], "export.json")):
            raise FileNotFoundError(f"{export_dir}: the export lacks stage {st['name']!r} "
                                    f"({st['dir']}/export.json); run --mode=export again")
    return stages


def load_method(export_dir: str | os.PathLike, changes: Mapping[str, Any] | None = None
                ) -> ExportedMethod:
    """The folder ``--mode=export`` prints (its ``method.json`` lists the stages), or one
    exported screening network, as an :class:`ExportedMethod`.

    Methods it runs: a "detect" stage (a score-volume network, or a detector registered in
    ``lungjax.registry.EXPORTED_DETECTORS``), or "screen" then "classify_candidates"
    (candidates of the screening network, each scored on its patch by the classifier).
    ``changes`` override the screening settings (threshold, nms_radius_mm, ...).

    Raises:
      FileNotFoundError / ValueError naming the folder and what it lacks.
    """
    import json

    from lungjax.export import load_predictor
    from lungjax.methods.candidates import (merge_within_diameter, regressed_centres,
                                            score_patches_at)
    from lungjax.registry import EXPORTED_DETECTORS, EXPORTED_METHODS

    export_dir = os.fspath(export_dir)
    changes = dict(changes or {})
    path = os.path.join(export_dir, METHOD_JSON)
    if not fileio.isfile(path):  # a single exported screening network
        find, sidecar, _ = _screening(export_dir, changes)
        return ExportedMethod(sidecar.get("preprocessing", sidecar), find, "screening",
                              SCREEN_MAPS)
    stages = read_method_stages(export_dir)
    final = stages[-1]
    sub = os.path.join(export_dir, final["dir"])
    if final["kind"] in EXPORTED_METHODS:
        with fileio.open_file(os.path.join(sub, "export.json"), encoding="utf-8") as f:
            sidecar = json.load(f)
        return ExportedMethod(sidecar["preprocessing"],
                              EXPORTED_METHODS.get(final["kind"]).load(sub),
                              f"{final['name']} ({final['kind']})")
    if final["kind"] == "detect":
        with fileio.open_file(os.path.join(sub, "export.json"), encoding="utf-8") as f:
            sidecar = json.load(f)
        detector = sidecar["detection"]["detector"]
        maps: tuple[str, ...] = ()
        if detector == "score_volume":
            find, sidecar, _ = _screening(sub, changes)
            maps = SCREEN_MAPS
        else:
            kind = EXPORTED_DETECTORS.get(detector)
            find, maps = kind.load(sub), tuple(getattr(kind, "MAPS", ()))
        return ExportedMethod(sidecar["preprocessing"], find, f"{final['name']} ({detector})",
                              maps)
    if final["kind"] == "classify_candidates":
        screen = [s for s in stages if s["kind"] == "screen"]
        if not screen:
            raise ValueError(f"{path}: stage {final['name']!r} scores candidates but no "
                             "'screen' stage was exported")
        screen_dir = os.path.join(export_dir, screen[-1]["dir"])
        predict, mapping, _, settings, sidecar = load_exported_detector(screen_dir)
        settings = dataclasses.replace(settings, **changes)
        classify, side2 = load_predictor(sub)
        size = tuple(int(v) for v in side2["preprocessing"]["patch_size_zyx"])
        batch = 32

        mirrors = bool(side2.get("mirrors", False))
        mirror_top = int(side2.get("mirror_top", 0))  # older exports: every candidate
        merge = bool(side2.get("merge_within_diameter", False))
        regressed = bool(side2.get("regressed_position", False))

        def named(x):  # the export's (B, columns) -> the classifier's named outputs
            out = np.asarray(classify(x), np.float64).reshape(len(x), -1)
            named = {"score": out[:, 0]}
            if out.shape[1] > 1:
                named["diameter_mm"] = out[:, 1]
            if out.shape[1] > 4:
                named["offset_zyx"] = out[:, 2:5]
            elif regressed:
                raise ValueError(f"{sub}: the classifier places marks at its regressed "
                                 f"centres but outputs {out.shape[1]} columns, not 5")
            return named

        def find(volume, geometry, lung):
            c, prob = detect_volume(predict, volume, geometry, mapping, settings,
                                    lung_mask=lung, jit=False, score_map=True)
            maps = {SCREEN_MAPS[0]: prob}
            centres = np.rint(c.voxel_zyx).astype(np.int64)
            out = score_patches_at(named, volume, centres, size, batch, mirrors, mirror_top)
            if not out:
                return c.world_xyz, np.zeros(0), None, {}, maps
            diam = out.get("diameter_mm")
            xyz, score = c.world_xyz, out["score"]
            if regressed:  # as the classify stage did (its export.json)
                xyz = regressed_centres(centres, size, out["offset_zyx"], geometry)
            if merge and diam is not None:
                xyz, score, diam = merge_within_diameter(xyz, score, diam)
            return xyz, score, diam, {}, maps

        return ExportedMethod(sidecar["preprocessing"], find,
                              f"{screen[-1]['name']} -> {final['name']}", SCREEN_MAPS)
    raise ValueError(f"{path}: the final stage {final['name']!r} ({final['kind']}) does not "
                     "give marks on a scan")


def _uid_of(path: str) -> str:
    """The series UID of a scan path: its name without the format suffix (the LUNA16
    naming; a DICOM folder's name as it is)."""
    from lungjax.data.io import SUPPORTED_SUFFIXES, scan_suffix

    base = os.path.basename(os.path.normpath(path))
    suffix = scan_suffix(base)
    return base[:-len(suffix)] if suffix in SUPPORTED_SUFFIXES else base


def expand_scans(paths: Sequence[str]) -> list[str]:
    """Scan files and DICOM series folders from the command line's ``--scan`` values.

    A file is a scan; a folder holding DICOM files is one series; any other folder is
    searched (recursively, in sorted order, skipping LUNA16's mask folders) for scan files
    and DICOM series folders.

    Raises:
      FileNotFoundError: a path that does not exist; ValueError: a folder with no scan.
    """
    from lungjax.data.io import SUPPORTED_SUFFIXES, list_dicom_series
    from lungjax.data.luna16 import LUNG_MASK_DIR, NODULE_MASK_DIR

    out = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: no such file or folder")
        if not os.path.isdir(p) or list_dicom_series(p):
            out.append(p)
            continue
        found = []
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d not in (LUNG_MASK_DIR, NODULE_MASK_DIR))
            if root != p and list_dicom_series(root):
                found.append(root)
                continue
            found += [os.path.join(root, f) for f in sorted(files)
                      if f.lower().endswith(SUPPORTED_SUFFIXES)]
        if not found:
            raise ValueError(f"{p}: no scan in this folder ({', '.join(SUPPORTED_SUFFIXES)} files "
                             "or DICOM series)")
        out += found
    return out


def find_lung_mask(scan_path: str, given: str | None, n_scans: int) -> str | None:
    """The lung mask for ``scan_path``: ``given`` (a mask file, for one scan; or a folder
    of masks named ``<uid>.mhd|.mha|.nii|.nii.gz``), else LUNA16's layout
    (``seg-lungs-LUNA16/<uid>.mhd`` beside the scan's folder or its parent), else None
    (the threshold lung mask)."""
    from lungjax.data.io import SUPPORTED_SUFFIXES
    from lungjax.data.luna16 import LUNG_MASK_DIR

    uid = _uid_of(scan_path)
    if given:
        if os.path.isfile(given):
            if n_scans > 1:
                raise ValueError(f"--lung-mask {given}: one mask file for {n_scans} scans; "
                                 "give a folder of masks named <uid>.mhd")
            return given
        folders = [given]
    else:
        here = os.path.dirname(os.path.abspath(scan_path))
        folders = [os.path.join(here, LUNG_MASK_DIR),
                   os.path.join(os.path.dirname(here), LUNG_MASK_DIR)]
    for folder in folders:
        for ext in SUPPORTED_SUFFIXES:
            cand = os.path.join(folder, uid + ext)
            if os.path.isfile(cand):
                return cand
    if given:
        raise FileNotFoundError(f"--lung-mask {given}: no mask for {uid}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lungjax.detect --model=DIR --scan=PATH [--scan=PATH ...] --out=DIR``

    Exit codes: 0 every scan done; 1 some scans failed (each named on stderr, the others'
    results written); 2 nothing could run (bad model folder or arguments).
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lungjax.detect",
        description="Find nodules in CT scans with an exported method. Writes to --out: "
                    "submission.csv (LUNA16 marks, world mm, with diameter_mm where the "
                    "method gives one), scans/<uid>.csv per scan, <uid>.png (the top "
                    "findings on their slices), masks/<uid>_<name>.mhd on the scan's grid "
                    "for a method that segments (sathish2020: the lungs), with --save-maps "
                    "maps/<uid>_<name>.mhd (score maps on the scan's grid) and "
                    "predict.json (what ran, per-scan seconds, failures).")
    parser.add_argument("--model", required=True,
                        help="the folder --mode=export printed (all the method's stages), or "
                             "one exported screening network")
    parser.add_argument("--scan", required=True, action="append",
                        help=".mhd/.mha/.nii/.nii.gz file, DICOM series folder (several "
                             "series in it: the largest is read, and named) or a folder "
                             "of scans; repeat for several")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--lung-mask", "--lung_mask", dest="lung_mask", default=None,
                        help="lung mask file (one scan) or folder of <uid> masks; default: "
                             "seg-lungs-LUNA16/<uid>.mhd beside the scans, else a threshold "
                             "mask")
    parser.add_argument("--threshold", type=float, default=None, help="default: the export's")
    parser.add_argument("--nms_mm", type=float, default=None, help="default: the export's")
    parser.add_argument("--max_candidates", type=int, default=None)
    parser.add_argument("--tile", default=None,
                        help="z,y,x input voxels per tile (models exported with symbolic sizes)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lung_only", action="store_true",
                        help="drop candidates outside the lung mask")
    parser.add_argument("--save-maps", "--save_maps", dest="save_maps", action="store_true",
                        help="also write each scan's score map as maps/<uid>_<name>.mhd "
                             "on the scan's grid (dou2017: the screening network's nodule "
                             "probability; xie2018: the finest head's best anchor "
                             "noduleness per cell)")
    parser.add_argument("--nodules", default=None,
                        help="CSV of nodule centres (seriesuid, coordX, coordY, coordZ in "
                             "world mm) for a method that measures given nodules (yu2021: "
                             "each one's mask, volume and malignancy) instead of finding "
                             "its own")
    parser.add_argument("--no-png", dest="png", action="store_false",
                        help="skip the per-scan PNG of the top findings")
    args = parser.parse_args(argv)
    from lungjax import compile_cache

    compile_cache.enable()  # a second run on scans of the same size compiles nothing
    try:
        method, scans = _setup(args)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return _run_scans(method, scans, args)


def _setup(args) -> tuple[ExportedMethod, list[str]]:
    changes = {k: v for k, v in (("threshold", args.threshold), ("nms_radius_mm", args.nms_mm),
                                 ("max_candidates", args.max_candidates),
                                 ("batch", args.batch)) if v is not None}
    if args.lung_only:
        changes["lung_only"] = True
    if args.tile:
        changes["tile_zyx"] = tuple(int(v) for v in args.tile.split(","))
    if fileio.isfile(args.out):
        raise ValueError(f"--out {args.out}: a file; --out is the output folder")
    scans = expand_scans(args.scan)
    method = load_method(args.model, changes)
    if args.save_maps and not method.map_names:
        raise ValueError(f"--save-maps: {method.description} gives no score map (maps come "
                         "from dou2017, xie2018 or one exported screening network)")
    if args.nodules:
        import inspect

        from lungjax.data.tables import read_points_csv

        if "nodules_xyz" not in inspect.signature(method.find).parameters:
            raise ValueError(f"--nodules: {method.description} finds its own nodules and "
                             "takes no list (yu2021 does)")
        uid, xyz = read_points_csv(args.nodules)
        args.nodule_list = {u: xyz[uid == u] for u in np.unique(uid)}
    return method, scans


def _run_scans(method: ExportedMethod, scans: Sequence[str], args) -> int:
    """Each scan on its own: a failure is one line on stderr and the next scan runs; the
    submission and the run record are rewritten (atomically) after every scan, so a
    killed run keeps every scan finished before it."""
    from tqdm import tqdm

    from lungjax.atomic import atomic_write_json

    out = args.out
    fileio.makedirs(os.path.join(out, "scans"))
    print(f"method: {method.description}; {len(scans)} scan(s) -> {out}", flush=True)
    record: dict[str, Any] = {"model": fileio.abspath(args.model),
                              "method": method.description, "scans": {}, "failed": {}}
    parts, diameters, columns = [], [], []
    bar = tqdm(scans, unit="scan", desc="predict", disable=len(scans) < 2)
    for path in bar:
        try:
            mask = find_lung_mask(path, args.lung_mask, len(scans))
            marks, info, *pre = detect_scan_with(method, path, lung_mask_path=mask,
                                                 keep_volume=args.png,
                                                 nodules=getattr(args, "nodule_list", None))
            uid = info["uid"]
            diam = info["diameter_mm"]
            write_submission(os.path.join(out, "scans", f"{uid}.csv"), marks, diam,
                             info["columns"])
            table_files = write_tables(os.path.join(out, "scans"), uid, info["tables"])
            mask_files = write_masks(os.path.join(out, "masks"), uid, info)
            map_files = (write_masks(os.path.join(out, "maps"), uid, info, "maps")
                         if args.save_maps else {})
            png = None
            if args.png:
                from lungjax.evaluation.plots import plot_findings

                png = os.path.join(out, f"{uid}.png")
                masks = info["masks"]
                notes = [", ".join(f"{k.split('_')[0]} {v[i]:.3f}"
                                   for k, v in info["columns"].items())
                         for i in range(len(marks))] if info["columns"] else None
                plot_findings(*pre[0], marks, diam, png, title=uid,
                              mask_zyx=next(iter(masks.values()))[0] if len(masks) == 1
                              and "lung" not in masks else None, notes=notes)
        except (OSError, ValueError, RuntimeError) as e:  # this scan only
            reason = " ".join(str(e).split())
            tqdm.write(f"error: {path}: {reason}", file=sys.stderr)
            record["failed"][path] = reason
        else:
            sec = info["seconds"]
            tqdm.write(f"{uid}: {len(marks)} marks, {sec['total']:.1f} s (read "
                       f"{sec['read']:.1f}, preprocess {sec['preprocess']:.1f}, detect "
                       f"{sec['detect']:.1f}); volume {tuple(info['shape_zyx'])}; lung mask "
                       f"{mask or 'threshold'}")
            parts.append(marks)
            diameters.append(diam)
            columns.append(info["columns"])
            record["scans"][uid] = {"path": path, "marks": len(marks),
                                    "lung_mask": mask or "threshold", "png": png,
                                    "masks": mask_files, "maps": map_files,
                                    **({"series": info["series"]} if "series" in info else {}),
                                    "tables": table_files, **info["info"],
                                    "shape_zyx": info["shape_zyx"],
                                    "seconds": {k: round(v, 3) for k, v in sec.items()}}
        all_marks = Marks.concatenate(parts)
        diam_all = (None if not parts or any(d is None for d in diameters)
                    else np.concatenate(diameters))
        names = set(columns[0]) if columns else set()
        col_all = ({k: np.concatenate([c[k] for c in columns]) for k in columns[0]}
                   if columns and all(set(c) == names for c in columns) else None)
        write_submission(os.path.join(out, "submission.csv"), all_marks, diam_all, col_all)
        atomic_write_json(os.path.join(out, "predict.json"), record)
    bar.close()
    n_bad = len(record["failed"])
    print(f"wrote {sum(len(m) for m in parts)} marks of {len(parts)} scan(s) to "
          f"{os.path.join(out, 'submission.csv')}" + (f"; {n_bad} scan(s) failed" if n_bad
                                                      else ""), flush=True)
    return 1 if n_bad else 0


def write_tables(folder: str, uid: str, tables: Mapping[str, Mapping[str, Any]]
                 ) -> dict[str, str]:
    """Each table {column: (N,) numbers} of a scan as ``<folder>/<uid>_<name>.csv``
    (atomically). Returns {name: path}."""
    from lungjax.atomic import atomic_write_text
    from lungjax.data.tables import csv_text

    paths = {}
    for name, cols in tables.items():
        arrays = [np.asarray(v).reshape(-1) for v in cols.values()]
        rows = ([f"{a[i]:.6g}" for a in arrays] for i in range(len(arrays[0]) if arrays else 0))
        paths[name] = os.path.join(folder, f"{uid}_{name}.csv")
        atomic_write_text(paths[name], csv_text(tuple(cols), rows))
    return paths


def write_masks(folder: str, uid: str, info: Mapping[str, Any], key: str = "masks"
                ) -> dict[str, str]:
    """Each of a scan's masks (``info["masks"]``, on the preprocessed grid) as
    ``<folder>/<uid>_<name>.mhd`` on the scan's own grid (nearest neighbour; 0 outside
    the preprocessed crop), written atomically; ``key="maps"``: its score maps instead,
    float32, linearly interpolated. Returns {name: path}."""
    from lungjax.data.io import write_scan
    from lungjax.data.preprocess import resample_to

    grid, shape = info["scan_grid"]
    paths = {}
    for name, (array, geometry) in info.get(key, {}).items():
        fileio.makedirs(folder)
        if key == "masks":
            on_scan = resample_to(np.asarray(array, np.uint8), geometry, grid, shape,
                                  nearest=True)
        else:
            on_scan = resample_to(np.asarray(array, np.float32), geometry, grid, shape)
        paths[name] = os.path.join(folder, f"{uid}_{name}.mhd")
        write_scan(paths[name], on_scan, grid, compress=True)
    return paths


def detect_scan_with(method: ExportedMethod, scan_path: str | os.PathLike, *,
                     uid: str | None = None, lung_mask_path: str | None = None,
                     keep_volume: bool = False,
                     nodules: Mapping[str, np.ndarray] | None = None):
    """:func:`detect_scan` with a whole exported method (:func:`load_method`).

    ``nodules``: uid -> (N, 3) world (x, y, z) mm centres for a method that measures
    given nodules (its ``find`` takes ``nodules_xyz``); a scan not in it gets none.

    Returns:
      (marks in world mm, info: uid, shape_zyx, seconds {read, preprocess, detect, total},
      diameter_mm (K,) or None, masks {name: (mask of the preprocessed volume, its
      Geometry)}, maps {name: (float32 score map, its Geometry)}, columns {name: (K,)},
      tables {name: {column: (N,)}}, info (the method's JSON-able extras), scan_grid (the
      scan's own Geometry, shape_zyx)); with ``keep_volume`` a
      third item, the preprocessed (volume (D, H, W) float32, Geometry).
    """
    volume, geometry, lung, uid, info = read_preprocessed(
        scan_path, method.preprocessing, uid=uid, lung_mask_path=lung_mask_path)
    t0 = time.perf_counter()
    given = {} if nodules is None else \
        {"nodules_xyz": np.asarray(nodules.get(uid, np.zeros((0, 3))), np.float64)}
    world, score, diam, *extra = method.find(volume, geometry, lung, **given)
    info["seconds"]["detect"] = time.perf_counter() - t0
    info["masks"] = {name: (np.asarray(m), geometry) for name, m in
                     (extra[0] if extra else {}).items()}
    info["maps"] = dict(extra[1]) if len(extra) > 1 else {}
    more = dict(extra[2]) if len(extra) > 2 else {}
    info["columns"] = {k: np.asarray(v, np.float64) for k, v in more.get("columns", {}).items()}
    info["tables"] = dict(more.get("tables", {}))
    info["info"] = dict(more.get("info", {}))
    info["seconds"]["total"] += info["seconds"]["detect"]
    info["diameter_mm"] = None if diam is None else np.asarray(diam, np.float64)
    marks = Marks(np.full(len(score), uid), np.asarray(world).reshape(-1, 3), score)
    if keep_volume:
        return marks, info, (volume, geometry)
    return marks, info


if __name__ == "__main__":
    raise SystemExit(main())
