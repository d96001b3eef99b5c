"""Preprocessing seconds per scan and peak memory for a 512 x 512 x 300 int16 CT at
0.7 x 0.7 x 1.25 mm (a synthetic chest: air, body, two lungs with vessels, noise).

    python bench/preprocess_bench.py [--repeats 3] [--threads 1] [--spacing 1,1,1]

Each repeat runs in a fresh process (so its peak RSS is its own): read the .mhd, then
resample -> lung mask -> crop -> window, timed step by step. Prints the median.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import tempfile
import time

import numpy as np


def make_scan(path: str, shape=(300, 512, 512), spacing_zyx=(1.25, 0.7, 0.7), seed=0) -> None:
    """Writes the synthetic chest to ``path`` (.mhd)."""
    from lungjax.data.coords import Geometry
    from lungjax.data.io import write_scan

    rng = np.random.default_rng(seed)
    sz, sy, sx = spacing_zyx
    z = ((np.arange(shape[0]) - shape[0] / 2) * sz)[:, None, None].astype(np.float32)
    y = ((np.arange(shape[1]) - shape[1] / 2) * sy)[None, :, None].astype(np.float32)
    x = ((np.arange(shape[2]) - shape[2] / 2) * sx)[None, None, :].astype(np.float32)
    hu = np.full(shape, -1000, np.int16)
    body = (y / 120.0) ** 2 + (x / 165.0) ** 2 <= 1.0
    hu[:, body[0]] = 40
    lungs = np.zeros(shape, bool)
    for cx in (-75.0, 75.0):
        lungs |= (z / 170.0) ** 2 + ((y + 5) / 90.0) ** 2 + ((x - cx) / 60.0) ** 2 <= 1.0
    hu[lungs] = -860
    # Vessels: random bright segments inside the lungs (the mask must fill them).
    for _ in range(150):
        c = np.array([rng.uniform(-150, 150), rng.uniform(-80, 70), rng.choice([-75, 75])
                      + rng.uniform(-40, 40)], np.float32)
        r = rng.uniform(1.0, 4.0)
        lo = np.maximum(((c - 6) / spacing_zyx + np.array(shape) / 2).astype(int), 0)
        hi = np.minimum(((c + 6) / spacing_zyx + np.array(shape) / 2).astype(int) + 1, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        ball = (z[sl[0]] - c[0]) ** 2 + (y[:, sl[1]] - c[1]) ** 2 + (x[:, :, sl[2]] - c[2]) ** 2 \
            <= r * r
        hu[sl][ball & lungs[sl]] = 30
    hu += rng.normal(0, 20, shape).astype(np.int16)
    geom = Geometry(np.array([sx, sy, sz]), np.array([-179.0, -179.0, -350.0]), np.eye(3))
    write_scan(path, hu, geom)


def run_once(path: str, threads: int, spacing_zyx) -> dict:
    """Times one preprocessing of ``path`` in this process."""
    import SimpleITK as sitk

    from lungjax.data import preprocess as P
    from lungjax.data.io import read_scan

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    times = {}
    t0 = time.perf_counter()
    scan = read_scan(path)
    times["read"] = time.perf_counter() - t0
    t = time.perf_counter()
    target, shape = P.resampled_grid(scan.geometry, scan.array.shape, spacing_zyx)
    image = P.resample_to(scan.array, scan.geometry, target, shape, fill=P.AIR_HU)
    times["resample"] = time.perf_counter() - t
    t = time.perf_counter()
    lung = P.lung_mask_from_hu(image, target.spacing_zyx, name=path)
    times["lung_mask"] = time.perf_counter() - t
    t = time.perf_counter()
    start, stop = P.crop_box(lung, target.spacing_zyx, 10.0)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    out = P.window_to_uint8(image[box])
    lung_out = np.ascontiguousarray(lung[box], np.uint8)
    times["crop_window"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    times["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    times["out_shape"] = out.shape
    times["lung_ml"] = float(lung_out.sum()) * float(np.prod(target.spacing_zyx)) / 1000.0
    return times


def _child(args):
    return run_once(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="SimpleITK threads (1 = one core)")
    p.add_argument("--spacing", default="1,1,1", help="target z,y,x mm")
    args = p.parse_args()
    spacing = tuple(float(v) for v in args.spacing.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.mhd")
        t = time.perf_counter()
        make_scan(path)
        print(f"made 512x512x300 int16 scan in {time.perf_counter() - t:.1f} s")
        ctx = multiprocessing.get_context("spawn")
        runs = []
        for _ in range(args.repeats):
            with ctx.Pool(1) as pool:
                runs.append(pool.apply(_child, ((path, args.threads, spacing),)))
    keys = ["read", "resample", "lung_mask", "crop_window", "total", "peak_rss_mb"]
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(f"target spacing {spacing} mm, SimpleITK threads {args.threads}, "
          f"{args.repeats} run(s), median:")
    for k in keys[:-1]:
        print(f"  {k:12s} {med[k]:6.2f} s")
    print(f"  peak RSS     {med['peak_rss_mb']:6.0f} MB (whole worker process)")
    print(f"  stored shape {runs[0]['out_shape']}, lung volume {runs[0]['lung_ml']:.0f} mL")


if __name__ == "__main__":
    main()
