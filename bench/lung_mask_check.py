"""The threshold lung mask (what the predict command uses when no mask is given) against
a dataset's ``seg-lungs-LUNA16`` masks, scan by scan.

    python bench/lung_mask_check.py --data data_cache/synthetic_default_seed0_v2/luna16

For every scan of a LUNA16-layout folder: whether the threshold mask finds a lung on the
grid the store resamples to (``--spacing``, 1 mm by default: that is where it runs), and
its Dice against the LUNA16 mask on the scan's own grid. Prints one line per scan and the
summary (scans without a lung, Dice min / median).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from lungjax.data.io import read_scan
from lungjax.data.luna16 import Luna16Dataset
from lungjax.data.preprocess import (AIR_HU, LungMaskError, lung_mask_from_hu,
                                     lung_mask_from_luna_seg, resample_to, resampled_grid)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="LUNA16-layout folder")
    p.add_argument("--spacing", default="1,1,1", help="z,y,x mm of the resampled grid")
    args = p.parse_args()
    spacing = tuple(float(v) for v in args.spacing.split(","))
    ds = Luna16Dataset.open(args.data)
    dice, failed = [], []
    for uid in ds.uids:
        scan = read_scan(ds.scan_path(uid))
        t0 = time.perf_counter()
        target, shape = resampled_grid(scan.geometry, scan.array.shape, spacing)
        hu = resample_to(scan.array, scan.geometry, target, shape, fill=AIR_HU)  # as the store
        try:
            lung_mask_from_hu(hu, target.spacing_zyx, name=uid)
            native = lung_mask_from_hu(scan.array, scan.geometry.spacing_zyx, name=uid)
        except LungMaskError as e:
            failed.append(uid)
            print(f"{uid}: FAILED {e}", flush=True)
            continue
        seg_path = os.path.join(args.data, "seg-lungs-LUNA16", uid + ".mhd")
        d = float("nan")
        if os.path.isfile(seg_path):
            ref = lung_mask_from_luna_seg(read_scan(seg_path).array, name=seg_path)
            d = 2.0 * float((native & ref).sum()) / float(native.sum() + ref.sum())
            dice.append(d)
        print(f"{uid}: lung found; Dice vs seg-lungs {d:.3f} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    n = len(ds.uids)
    print(f"{n - len(failed)}/{n} scans with a lung; Dice vs seg-lungs-LUNA16 "
          + (f"min {min(dice):.3f}, median {float(np.median(dice)):.3f} over {len(dice)} scans"
             if dice else "not available (no seg-lungs-LUNA16 masks)"))


if __name__ == "__main__":
    main()
