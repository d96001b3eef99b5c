"""Whole-scan detection: score volume -> candidates -> LUNA16 marks (world mm).

* :func:`detect_volume` scores one preprocessed volume and returns its candidates;
* :func:`run_detection` / :func:`detect_store` do that for scans of a prepared
  ``PatchStore`` (progress bar, seconds per scan);
* :func:`detect_scan` does it for a scan file never seen by the store (read -> preprocess
  exactly like the store -> score), the path of a deployed model;
* :func:`screening_stats` gives stage-1 sensitivity and false positives per scan (the
  screening table of Dou et al. 2017);
* :func:`write_submission` writes the LUNA16 submission CSV (optional diameter column).

Command line, on an exported model (see ``lungjax.export``)::

    python -m lungjax.detect --model=EXPORT_DIR --scan=SCAN.mhd --out=marks.csv
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

from lungjax.data.coords import Geometry, within_sphere
from lungjax.data.tables import Findings, Marks, write_marks_csv
from lungjax.tasks.screening import (Candidates, OutputMapping, candidates_from_scores,
                                     crop_patch, inside_mask, score_volume)

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
      lung_only: drop candidates whose voxel lies outside the scan's lung mask (the
        store's "lung" array, closed and hole-filled so juxtapleural nodules stay in).
        Not in the paper; off by default.
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
                  jit: bool = True) -> Candidates:
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

    Returns:
      :class:`lungjax.tasks.screening.Candidates` in the volume's grid and world mm.
    """
    scores, cell_map = score_volume(predict_fn, volume_zyx, mapping, settings.tile_zyx,
                                    settings.batch, variables=variables,
                                    input_zyx=settings.input_zyx, jit=jit)
    if scores.ndim == 4 and scores.shape[-1] == 1:
        scores = scores[..., 0]
    restrict = settings.lung_only
    if restrict and (lung_mask is None or np.shape(lung_mask) != np.shape(volume_zyx)):
        raise ValueError(f"lung_only needs a lung mask of the volume's shape "
                         f"{np.shape(volume_zyx)}, got {np.shape(lung_mask)}")
    threshold = settings.threshold
    weights = None
    if settings.log_odds:
        threshold = float(special.logit(np.clip(threshold, 1e-12, 1 - 1e-12)))
        if settings.refine_radius_mm > 0:  # probability above the threshold, not log-odds
            weights = np.clip(special.expit(scores.astype(np.float64)) - settings.threshold,
                              0, None)
    cands = candidates_from_scores(scores, cell_map, geometry, threshold=threshold,
                                   nms_radius_mm=settings.nms_radius_mm,
                                   max_candidates=None if restrict else settings.max_candidates,
                                   shape_zyx=np.shape(volume_zyx),
                                   refine_radius_mm=settings.refine_radius_mm,
                                   refine_weights=weights)
    if settings.log_odds:
        cands = dataclasses.replace(cands, score=special.expit(cands.score.astype(np.float64)))
    if restrict:
        cands = cands.select(np.flatnonzero(inside_mask(lung_mask, cands.voxel_zyx))
                             [:settings.max_candidates])
    return cands


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
                      uid: str | None = None):
    """Reads a scan file and preprocesses it as the store did.

    Returns:
      (volume (D, H, W) float32 in [0, 1], its Geometry, lung mask (D, H, W) bool, uid,
      info {uid, shape_zyx, seconds {read, preprocess, total}}); ``uid`` defaults to the
      file name without extension (the LUNA16 naming).
    """
    from lungjax.data.io import read_scan
    from lungjax.data.preprocess import preprocess_scan, uint8_to_unit

    path = os.fspath(scan_path)
    if uid is None:
        base = os.path.basename(os.path.normpath(path))
        for ext in (".nii.gz", ".mhd", ".mha", ".nii"):
            if base.lower().endswith(ext):
                base = base[:-len(ext)]
                break
        uid = base
    t0 = time.perf_counter()
    scan = read_scan(path)
    t1 = time.perf_counter()
    pre = preprocess_scan(scan.array, scan.geometry, name=path, **preprocess_kwargs(preprocess_cfg))
    del scan
    volume = uint8_to_unit(pre.image)
    t2 = time.perf_counter()
    info = {"uid": uid, "shape_zyx": list(volume.shape),
            "seconds": {"read": t1 - t0, "preprocess": t2 - t1, "total": t2 - t0}}
    return volume, pre.geometry, pre.lung, uid, info


def write_submission(path: str | os.PathLike, marks: Marks,
                     diameter_mm: np.ndarray | None = None) -> None:
    """Writes a LUNA16 submission CSV (atomically); ``diameter_mm`` (M,) adds a
    diameter_mm column, which the challenge's evaluation ignores."""
    extra = None
    if diameter_mm is not None:
        d = np.asarray(diameter_mm, np.float64).reshape(-1)
        if len(d) != len(marks):
            raise ValueError(f"{os.fspath(path)}: {len(d)} diameters for {len(marks)} marks")
        extra = {"diameter_mm": d}
    write_marks_csv(path, marks, extra)


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
        None) -> (world_xyz (K, 3) mm, score (K,) probability, diameter_mm (K,) or None)``.
      description: the stages it runs, for the console.
    """

    preprocessing: Mapping[str, Any]
    find: Callable
    description: str


def _screening(export_dir: str, changes: Mapping[str, Any]):
    """(find, sidecar, settings) of an exported screening network: candidates of its
    score volume."""
    predict, mapping, _, settings, sidecar = load_exported_detector(export_dir)
    settings = dataclasses.replace(settings, **changes)

    def find(volume, geometry, lung):
        # The loaded predictor returns numpy: it runs as is, not under jit.
        c = detect_volume(predict, volume, geometry, mapping, settings, lung_mask=lung,
                          jit=False)
        return c.world_xyz, c.score, None

    return find, sidecar, settings


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
    from lungjax.registry import EXPORTED_DETECTORS

    export_dir = os.fspath(export_dir)
    changes = dict(changes or {})
    path = os.path.join(export_dir, METHOD_JSON)
    if not os.path.isfile(path):  # a single exported screening network
        find, sidecar, _ = _screening(export_dir, changes)
        return ExportedMethod(sidecar.get("preprocessing", sidecar), find, "screening")
    with open(path, encoding="utf-8") as f:
        stages = json.load(f)["stages"]
    if not stages:
        raise ValueError(f"{path}: no exported stage")
    final = stages[-1]
    sub = os.path.join(export_dir, final["dir"])
    if final["kind"] == "detect":
        with open(os.path.join(sub, "export.json"), encoding="utf-8") as f:
            sidecar = json.load(f)
        detector = sidecar["detection"]["detector"]
        if detector == "score_volume":
            find, sidecar, _ = _screening(sub, changes)
        else:
            find = EXPORTED_DETECTORS.get(detector).load(sub)
        return ExportedMethod(sidecar["preprocessing"], find, f"{final['name']} ({detector})")
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

        def find(volume, geometry, lung):
            c = detect_volume(predict, volume, geometry, mapping, settings, lung_mask=lung,
                              jit=False)
            centres = np.rint(c.voxel_zyx).astype(np.int64)
            cols = []
            for i in range(0, len(centres), batch):
                x = np.stack([crop_patch(volume, v, size) for v in centres[i:i + batch]])
                cols.append(np.asarray(classify(x[..., None]), np.float64).reshape(len(x), -1))
            out = np.concatenate(cols) if cols else np.zeros((0, 2))
            return c.world_xyz, out[:, 0], out[:, 1] if out.shape[1] > 1 else None

        return ExportedMethod(sidecar["preprocessing"], find,
                              f"{screen[-1]['name']} -> {final['name']}")
    raise ValueError(f"{path}: the final stage {final['name']!r} ({final['kind']}) does not "
                     "give marks on a scan")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lungjax.detect --model=DIR --scan=A.mhd [--scan=B.mhd] --out=marks.csv``"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lungjax.detect",
                                     description="Find nodules in CT scans with an exported "
                                                 "method and write LUNA16 marks (world mm).")
    parser.add_argument("--model", required=True,
                        help="the folder --mode=export printed (all the method's stages), or "
                             "one exported screening network")
    parser.add_argument("--scan", required=True, action="append",
                        help=".mhd/.mha/.nii(.gz) file or DICOM folder; repeat for several")
    parser.add_argument("--out", required=True, help="submission CSV to write")
    parser.add_argument("--threshold", type=float, default=None, help="default: the export's")
    parser.add_argument("--nms_mm", type=float, default=None, help="default: the export's")
    parser.add_argument("--max_candidates", type=int, default=None)
    parser.add_argument("--tile", default=None,
                        help="z,y,x input voxels per tile (models exported with symbolic sizes)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lung_only", action="store_true",
                        help="drop candidates outside the lung mask")
    args = parser.parse_args(argv)

    try:
        return _run_cli(args)
    except (OSError, ValueError) as e:  # ScanReadError, LungMaskError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_cli(args) -> int:
    changes = {k: v for k, v in (("threshold", args.threshold), ("nms_radius_mm", args.nms_mm),
                                 ("max_candidates", args.max_candidates),
                                 ("batch", args.batch)) if v is not None}
    if args.lung_only:
        changes["lung_only"] = True
    if args.tile:
        changes["tile_zyx"] = tuple(int(v) for v in args.tile.split(","))
    method = load_method(args.model, changes)
    print(f"method: {method.description}", flush=True)
    parts, diameters = [], []
    for path in args.scan:
        marks, info = detect_scan_with(method, path)
        sec = info["seconds"]
        print(f"{info['uid']}: {len(marks)} marks, {sec['total']:.1f} s (read "
              f"{sec['read']:.1f}, preprocess {sec['preprocess']:.1f}, detect "
              f"{sec['detect']:.1f}); volume {tuple(info['shape_zyx'])}", flush=True)
        parts.append(marks)
        diameters.append(info["diameter_mm"])
    marks = Marks.concatenate(parts)
    diam = None if any(d is None for d in diameters) else np.concatenate(diameters)
    write_submission(args.out, marks, diam)
    print(f"wrote {len(marks)} marks to {args.out}")
    return 0


def detect_scan_with(method: ExportedMethod, scan_path: str | os.PathLike, *,
                     uid: str | None = None) -> tuple[Marks, dict]:
    """:func:`detect_scan` with a whole exported method (:func:`load_method`).

    Returns:
      (marks in world mm, info: uid, shape_zyx, seconds {read, preprocess, detect, total},
      diameter_mm (K,) or None).
    """
    volume, geometry, lung, uid, info = read_preprocessed(scan_path, method.preprocessing,
                                                          uid=uid)
    t0 = time.perf_counter()
    world, score, diam = method.find(volume, geometry, lung)
    info["seconds"]["detect"] = time.perf_counter() - t0
    info["seconds"]["total"] += info["seconds"]["detect"]
    info["diameter_mm"] = None if diam is None else np.asarray(diam, np.float64)
    return Marks(np.full(len(score), uid), np.asarray(world).reshape(-1, 3), score), info


if __name__ == "__main__":
    raise SystemExit(main())
