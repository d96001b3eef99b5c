"""Preprocess a LUNA16-layout folder (real or generated) into a lungjax patch store.

    python data_prep/prepare_luna16.py --root DIR --out STORE [--spacing 1,1,1] [--workers N]
        [--subsets 0,1] [--hu-window=-1200,600] [--margin-mm 10] [--no-lung-masks]

--spacing takes z,y,x mm (e.g. 3,1.5,1.5) or "native". STORE is a folder or a bucket URL
(gs://, s3://, file://). Re-running skips finished scans. Exit code 0 if at least one
scan is ready in the store, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from lungjax.data.prepare import prepare_dataset
from lungjax.data.store import StoreError


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected {n} comma-separated numbers, "
                                         f"got {text!r}")
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{what}: expected {n} values, got {text!r}")
    return values


def _spacing(text: str):
    if text.lower() == "native":
        return None
    values = _floats(text, 3, "--spacing")
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--spacing: values must be positive, got {text!r}")
    return values


def _subsets(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--subsets: expected e.g. 0,1,2, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="LUNA16-layout dataset folder")
    p.add_argument("--out", required=True, help="store folder or URL")
    p.add_argument("--spacing", type=_spacing, default=(1.0, 1.0, 1.0),
                   help="target voxel size z,y,x mm, or 'native' (default 1,1,1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--subsets", type=_subsets, default=None, help="folds to prepare, e.g. 0,1")
    p.add_argument("--hu-window", type=lambda t: _floats(t, 2, "--hu-window"),
                   default=(-1200.0, 600.0), help="HU low,high mapped to [0, 1]")
    p.add_argument("--margin-mm", type=float, default=10.0, help="margin around the lungs")
    p.add_argument("--chunk", type=int, default=32, help="zarr chunk edge in voxels")
    p.add_argument("--no-lung-masks", action="store_true",
                   help="ignore seg-lungs-LUNA16 masks; always threshold")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = prepare_dataset(
            args.root, args.out, spacing_zyx=args.spacing, workers=args.workers,
            hu_window=args.hu_window, margin_mm=args.margin_mm, subsets=args.subsets,
            chunk=args.chunk, use_lung_masks=not args.no_lung_masks, progress=not args.quiet)
    except (FileNotFoundError, StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0 if report.n_ready > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
