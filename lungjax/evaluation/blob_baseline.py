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
import json
import os
import sys
from typing import Sequence

import numpy as np
from scipy import ndimage

from lungjax.data import io
from lungjax.data.coords import voxel_to_world
from lungjax.data.tables import Marks

THRESHOLDS_HU = (-600.0, -400.0, -200.0)
SCORES = ("size", "mean")
LUNG_VALUES = (3, 4)  # seg-lungs-LUNA16: right and left lung (5 = trachea)


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
    uid_col, xyz, prob = [], [], []
    for uid in uids:
        scan = io.read_scan(dataset.scan_path(uid))
        mask_path = dataset.lung_mask_path(uid)
        if mask_path is None:
            raise FileNotFoundError(f"{dataset.root}: no seg-lungs-LUNA16 mask for {uid}")
        lung = np.isin(io.read_scan(mask_path).array, LUNG_VALUES)
        fg = (scan.array > threshold_hu) & lung
        lab, n = ndimage.label(fg, np.ones((3, 3, 3)))
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        centres = np.asarray(ndimage.center_of_mass(fg, lab, idx))
        value = (ndimage.sum(fg, lab, idx) if score == "size"
                 else ndimage.mean(scan.array, lab, idx))
        uid_col += [uid] * n
        xyz.append(voxel_to_world(centres, scan.geometry))
        prob.append(np.asarray(value, np.float64))
    if not xyz:
        return Marks(np.zeros(0, str), np.zeros((0, 3)), np.zeros(0))
    return Marks(uid_col, np.concatenate(xyz), np.concatenate(prob))


def evaluate_blob_baseline(dataset, uids: Sequence[str], *, n_bootstrap: int = 0,
                           seed: int = 0) -> dict:
    """CPM of every (threshold, score) setting on ``uids``; the best one with its interval.

    Returns:
      {"settings": [{"threshold_hu", "score", "cpm", "n_detected"}...], "best": {...,
      "cpm_ci95"}, "n_scans", "n_nodules"}.
    """
    from lungjax.evaluation.froc import compute_froc

    uids = list(uids)
    keep = np.isin(dataset.annotations.uid, uids)
    ann = type(dataset.annotations)(dataset.annotations.uid[keep], dataset.annotations.xyz[keep],
                                    dataset.annotations.diameter_mm[keep])
    settings, best = [], None
    for threshold in THRESHOLDS_HU:
        for score in SCORES:
            marks = blob_marks(dataset, uids, threshold, score)
            r = compute_froc(ann, dataset.excluded, uids, marks, n_bootstrap=n_bootstrap,
                             seed=seed)
            row = {"threshold_hu": threshold, "score": score, "cpm": float(r.cpm),
                   "n_detected": int(r.n_detected)}
            if r.bootstrap is not None:
                row["cpm_ci95"] = [float(r.bootstrap.cpm_lower), float(r.bootstrap.cpm_upper)]
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
    from lungjax.data.tables import atomic_write_json

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
        os.makedirs(args.out, exist_ok=True)
        atomic_write_json(os.path.join(args.out, "blob_baseline.json"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
