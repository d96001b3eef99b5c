"""A raw scan the size of an adult chest, in the LUNA16 format, for the inference benches.

The generated default data's chests are small (scale 0.9-1.05: ~3 M voxels once cropped to
the lungs at 1 mm). The inference targets are set on scans of real size, so the benches
draw one chest with the generator at ``scale`` and write it as MetaImage at a real LIDC
voxel size. Scale 1.5 gives a grid of ~262 x 361 x 361 mm (z, y, x; the in-plane field of
view of the median LUNA16 scan: 512 x 0.70 mm = 358 mm) whose lung box, preprocessed at
1 mm, is about 240 x 170 x 280 voxels.

    python bench/adult_scan.py [--scale=1.5] [--out=DIR]

Prints the path of the scan (generated once per scale and seed, then reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def adult_scan(scale: float = 1.5, out_dir: str | None = None, seed: int = 0) -> str:
    """Path of a generated raw scan (``<out_dir>/adult_<scale>_<seed>.mhd``, int16 HU) of a
    chest ``scale`` times the generator's small adult; written on first use."""
    from lungjax.data import io, synthetic
    from lungjax.data.synthetic_scan import PRESETS, generate_scan

    out_dir = out_dir or os.path.join(tempfile.gettempdir(), "lungjax_bench")
    path = os.path.join(out_dir, f"adult_{scale:g}_{seed}.mhd")
    if not os.path.exists(path):
        preset = dataclasses.replace(PRESETS["default"], chest_scale=(scale, scale),
                                     max_voxels=10 ** 9)
        scan = generate_scan(np.random.default_rng(seed), preset, synthetic._library())
        io.write_scan(path, scan.hu, scan.geometry)  # atomic: .raw, then .mhd
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.5)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(adult_scan(a.scale, a.out, a.seed))


if __name__ == "__main__":
    main()
