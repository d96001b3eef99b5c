"""The threshold lung mask (what the predict command uses when no mask is given) against
a dataset's ``seg-lungs-LUNA16`` masks, scan by scan.

    python bench/lung_mask_check.py --data data_cache/synthetic_default_seed0_v2/luna16

For every scan of a LUNA16-layout folder: whether the threshold mask finds a lung on the
grid the store resamples to (``--spacing``, 1 mm by default: that is where it runs), and
its Dice against the LUNA16 mask on the scan's own grid. Prints one line per scan and the
summary (scans without a lung, Dice min / median).

With ``--layouts``, each scan is also rebuilt in the layouts real CT brings and the
generator does not, and the mask is checked on each (Dice against the LUNA16 mask
clipped the same way; "lost" when no lung is found):

- ``table``: a CT table under the body, 300 HU walls round a -1000 HU core, closed at the
  sides, 15 mm below the body;
- ``apex``: the scan starts 30 mm below the lungs' top slice;
- ``fov_x``: an in-plane field of view 15 mm narrower than the lungs on each side;
- ``round_fov_body``: a round field of view that cuts the body and not the lungs, padded
  with -2000 HU outside;
- ``round_fov_lungs``: a round field of view 10 mm inside the lungs' lateral extent.

    python bench/lung_mask_check.py --data data_cache/synthetic_default_seed1_v2/luna16 \
        --layouts --limit 10
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
    p.add_argument("--layouts", action="store_true",
                   help="also check each scan rebuilt with a table, cut at the apex, ...")
    p.add_argument("--limit", type=int, default=0, help="only the first N scans")
    args = p.parse_args()
    spacing = tuple(float(v) for v in args.spacing.split(","))
    ds = Luna16Dataset.open(args.data)
    dice, failed = [], []
    layout_dice: dict[str, list[float]] = {}
    uids = ds.uids[:args.limit] if args.limit else ds.uids
    for uid in uids:
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
            d = _dice(native, ref)
            dice.append(d)
        print(f"{uid}: lung found; Dice vs seg-lungs {d:.3f} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        if args.layouts and os.path.isfile(seg_path):
            for name, (hu_case, ref_case) in layouts(scan.array, ref,
                                                     scan.geometry.spacing_zyx).items():
                try:
                    found = lung_mask_from_hu(hu_case, scan.geometry.spacing_zyx, name=uid)
                    d = _dice(found, ref_case)
                except LungMaskError:
                    d = 0.0
                layout_dice.setdefault(name, []).append(d)
                print(f"  {name}: " + (f"Dice {d:.3f}" if d else "lost"), flush=True)
    n = len(uids)
    print(f"{n - len(failed)}/{n} scans with a lung; Dice vs seg-lungs-LUNA16 "
          + (f"min {min(dice):.3f}, median {float(np.median(dice)):.3f} over {len(dice)} scans"
             if dice else "not available (no seg-lungs-LUNA16 masks)"))


    for name, values in layout_dice.items():
        print(f"{name}: lost on {sum(v == 0 for v in values)}/{len(values)}; Dice min "
              f"{min(values):.3f}, median {float(np.median(values)):.3f}")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def layouts(hu: np.ndarray, lung: np.ndarray,
            spacing_zyx) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The scan in the layouts of the module docstring.

    Args:
      hu: (z, y, x) HU volume on the scan's grid.
      lung: (z, y, x) bool LUNA16 lung mask on the same grid.
      spacing_zyx: (3,) voxel size in mm.

    Returns:
      name -> ((z, y, x) float32 HU, (z, y, x) bool lung mask clipped the same way).
    """
    sz, sy, sx = (float(v) for v in spacing_zyx)
    hu = hu.astype(np.float32)
    out = {}
    body_rows = np.flatnonzero((hu > -400).any(axis=(0, 2)))
    top = min(int(body_rows.max() + 15 / sy), hu.shape[1] - 4)
    wall = max(1, int(round(3 / sy)))
    table = hu.copy()
    table[:, top:top + 3 * wall, :] = 300.0
    table[:, top + wall:top + 2 * wall, 2:-2] = -1000.0  # hollow, closed at the ends
    out["table"] = (table, lung & (np.arange(hu.shape[1]) < top)[None, :, None])
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    start = int(zs.min() + 30 / sz)
    out["apex"] = (hu[start:], lung[start:])
    xs = np.flatnonzero(lung.any(axis=(0, 1)))
    cut = int(round(15 / sx))
    out["fov_x"] = (hu[:, :, xs.min() + cut:xs.max() - cut],
                    lung[:, :, xs.min() + cut:xs.max() - cut])
    yy, xx = np.mgrid[:hu.shape[1], :hu.shape[2]]
    cy, cx = (hu.shape[1] - 1) / 2, (hu.shape[2] - 1) / 2
    radius = np.hypot((yy - cy) * sy, (xx - cx) * sx)
    r_lung = float(radius[lung.any(axis=0)].max())
    body_x = np.flatnonzero((hu > -400).any(axis=(0, 1)))
    r_body = (body_x.max() - body_x.min()) * sx / 2
    for name, r in (("round_fov_body", max(r_lung + 5, min(r_body - 10, r_lung + 20))),
                    ("round_fov_lungs", float(np.abs(xs[[0, -1]] - cx).min()) * sx - 10)):
        padded = hu.copy()
        padded[:, radius > r] = -2000.0
        out[name] = (padded, lung & (radius <= r)[None])
    return out


if __name__ == "__main__":
    main()
