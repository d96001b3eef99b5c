"""Generate the synthetic LUNA16-format dataset (the project's default data).

    python data_prep/make_synthetic.py --preset tiny|default --seed N --out DIR
        [--workers N] [--render PNG] [--quiet]

Writes subset0..9/<uid>.mhd+.raw, annotations.csv, annotations_excluded.csv,
candidates_V2.csv, seriesuids.csv, seg-lungs-LUNA16/, nodule-masks/, malignancy.csv and
a README.md saying the data are synthetic. Same preset and seed give the same bytes;
re-running on a finished dataset does nothing. --render writes a PNG of slices of the
scan holding the largest nodule (e.g. docs/synthetic_scan.png).
"""

from __future__ import annotations

import argparse
import sys
import time

from lungjax.data.synthetic import PRESETS, generate_dataset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="dataset size (default: default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--render", metavar="PNG", default=None,
                   help="also render slices of one scan to this PNG")
    p.add_argument("--quiet", action="store_true", help="no per-scan lines")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = generate_dataset(args.out, preset=args.preset, seed=args.seed,
                               workers=args.workers, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"make_synthetic: error: {e}", file=sys.stderr)
        return 1
    print(f"dataset ready in {out} ({time.perf_counter() - t0:.1f} s)")
    if args.render:
        from lungjax.data.synthetic_render import render_scan_png

        print(f"rendered {render_scan_png(out, args.render)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
