"""The bright-blob baseline: what intensity thresholding alone scores on a dataset.

A detector with no learning: voxels above a HU threshold inside the LUNA16 lung mask
(``seg-lungs-LUNA16``, values 3 and 4), 26-connected components, one mark at each
component's centroid, scored by its size or its mean HU. Vessels, whose cross-sections
look like nodules, pass the threshold too, so it sets the floor a trained detector must
clear on the same scans (and it shows a generated dataset is not too easy).

    python -m lungjax.evaluation.blob_baseline --data DIR [--folds 0] [--out DIR]

prints the held-out CPM of every (threshold, score) setting and the best of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np
from scipy import ndimage

from lungjax import fileio
from lungjax.data import io
from lungjax.data.coords import voxel_to_world
from lungjax.data.tables import Marks

THRESHOLDS_HU = (-600.0, -400.0, -200.0)
SCORES = ("size", "mean")
LUNG_VALUES = (3, 4)  # seg-lungs-LUNA16: right and left lung (5 = trachea)


def _read(dataset, uid: str):
    """(scan, (D, H, W) bool lung) of one scan of the dataset."""
    scan = io.read_scan(dataset.scan_path(uid))
    mask_path = dataset.lung_mask_path(uid)
    if mask_path is None:
        raise FileNotFoundError(f"{dataset.root}: no seg-lungs-LUNA16 mask for {uid}")
    return scan, np.isin(io.read_scan(mask_path).array, LUNG_VALUES)


def _blobs(scan, lung: np.ndarray, threshold_hu: float) -> dict[str, np.ndarray]:
    """Components of one scan at one threshold: ``xyz`` (K, 3) world mm of the centroids
    and their scores, ``size`` (K,) voxels and ``mean`` (K,) HU."""
    fg = (scan.array > threshold_hu) & lung
    lab, n = ndimage.label(fg, np.ones((3, 3, 3)))
    if n == 0:
        return {"xyz": np.zeros((0, 3)), "size": np.zeros(0), "mean": np.zeros(0)}
    idx = np.arange(1, n + 1)
    centres = np.asarray(ndimage.center_of_mass(fg, lab, idx))
    return {"xyz": voxel_to_world(centres, scan.geometry).reshape(-1, 3),
            "size": np.asarray(ndimage.sum(fg, lab, idx), np.float64),
            "mean": np.asarray(ndimage.mean(scan.array, lab, idx), np.float64)}


def _marks(per_scan: Sequence[tuple[str, dict]], score: str) -> Marks:
    """The blobs as marks; the score (HU or mL) min-max scaled to a [0, 1] probability
    over all scans (the FROC depends on its order only, which scaling keeps)."""
    if not per_scan:
        return Marks(np.zeros(0, str), np.zeros((0, 3)), np.zeros(0))
    raw = np.concatenate([b[score] for _, b in per_scan]).astype(np.float64)
    span = float(raw.max() - raw.min()) if raw.size else 0.0
    prob = (raw - raw.min()) / span if span > 0 else np.full(raw.shape, 0.5)
    return Marks(np.concatenate([np.full(len(b[score]), uid) for uid, b in per_scan]),
                 np.concatenate([b["xyz"] for _, b in per_scan]), prob)


def blob_marks(dataset, uids: Sequence[str], threshold_hu: float, score: str) -> Marks:
    """Marks of the bright-blob detector on scans of a LUNA16-layout dataset.

    Args:
      dataset: ``lungjax.data.luna16.Luna16Dataset`` with lung masks.
      uids: scans to detect on.
      threshold_hu: voxels above it (HU) are foreground.
      score: "size" (voxels in the component) or "mean" (its mean HU).

    Returns:
      Marks at the components' centroids (world mm), probability = the raw score (a
      ranking, not in [0, 1]).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return _marks([(uid, _blobs(*_read(dataset, uid), threshold_hu)) for uid in uids], score)


def evaluate_blob_baseline(dataset, uids: Sequence[str], *, n_bootstrap: int = 0,
                           seed: int = 0) -> dict:
    """CPM of every (threshold, score) setting on ``uids``; the best one with its interval.

    Each scan is read once; its components at every threshold serve both scores.

    Returns:
      {"settings": [{"threshold_hu", "score", "cpm", "n_detected"}...], "best": {...,
      "cpm_ci95"}, "n_scans", "n_nodules"}.
    """
    from lungjax.evaluation.froc import compute_froc

    uids = list(uids)
    ann = dataset.annotations.select(np.isin(dataset.annotations.uid, uids))
    blobs: dict[float, list] = {t: [] for t in THRESHOLDS_HU}
    for uid in uids:
        scan, lung = _read(dataset, uid)
        for t in THRESHOLDS_HU:
            blobs[t].append((uid, _blobs(scan, lung, t)))
    settings, best = [], None
    for threshold in THRESHOLDS_HU:
        for score in SCORES:
            r = compute_froc(ann, dataset.excluded, uids, _marks(blobs[threshold], score),
                             n_bootstrap=n_bootstrap, seed=seed)
            row = {"threshold_hu": threshold, "score": score, "cpm": float(r.cpm),
                   "n_detected": int(r.n_detected)}
            if r.bootstrap is not None:
                row["cpm_ci95"] = r.cpm_ci95
            settings.append(row)
            if best is None or row["cpm"] > best["cpm"]:
                best = row
    return {"settings": settings, "best": best, "n_scans": len(uids), "n_nodules": int(len(ann))}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="LUNA16-layout folder (subset0..9, CSVs, "
                   "seg-lungs-LUNA16)")
    p.add_argument("--folds", default="0", help="comma-separated subsets to score (default 0, "
                   "the main job's held-out fold)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write blob_baseline.json here")
    args = p.parse_args(argv)
    from lungjax.data.luna16 import Luna16Dataset
    from lungjax.atomic import atomic_write_json

    if not os.path.isdir(args.data):
        print(f"--data {args.data}: not a directory", file=sys.stderr)
        return 2
    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    ds = Luna16Dataset.open(args.data)
    uids = ds.uids_in_folds(folds)
    res = evaluate_blob_baseline(ds, uids, n_bootstrap=args.bootstrap, seed=args.seed)
    print(f"bright-blob baseline on {args.data}, folds {folds}: {res['n_scans']} scans, "
          f"{res['n_nodules']} nodules")
    for r in res["settings"]:
        print(f"  threshold {r['threshold_hu']:+.0f} HU, score {r['score']:<4}: CPM "
              f"{r['cpm']:.4f} ({r['n_detected']} nodules hit)")
    b = res["best"]
    lo, hi = b.get("cpm_ci95", (float("nan"), float("nan")))
    print(f"best: CPM {b['cpm']:.4f} (95% CI {lo:.3f}-{hi:.3f}) at {b['threshold_hu']:+.0f} HU, "
          f"score {b['score']}")
    if args.out:
        fileio.makedirs(args.out)
        atomic_write_json(os.path.join(args.out, "blob_baseline.json"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
