"""Patches per second of the Grain input pipeline alone (store read + augmentation +
batching), for the patch sizes of the methods, with 0 and N prefetch workers.

    python bench/pipeline_bench.py                       # builds a temporary store
    python bench/pipeline_bench.py --store data_cache/dou2017/store --workers 0,2

Without --store, a temporary store of --scans smooth random volumes (uint8 zarr,
32^3 chunks, like a prepared LUNA16 scan at 1 mm) is written first. Augmentation is
on for every sample (flips, quarter turns, zoom 0.9-1.1, translation), the costly
setting. The pipeline must outrun the train step: compare with bench/train_bench.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lungjax.data import pipeline as pl  # noqa: E402
from lungjax.data import sampler as smp  # noqa: E402
from lungjax.data.coords import Geometry, voxel_to_world  # noqa: E402
from lungjax.data.store import (STORE_FORMAT, STORE_VERSION, PatchStore, ScanRecord,  # noqa: E402
                                write_manifest, write_scan_arrays)

CASES = (  # name, patch (z, y, x), global batch
    ("dou2017 stage 1", (10, 30, 30), 64),
    ("dou2017 stage 2", (24, 60, 60), 16),
    ("xie2018", (96, 96, 96), 2),
)


def build_store(path: str, n_scans: int, shape: tuple[int, int, int], seed: int = 0) -> PatchStore:
    rng = np.random.default_rng(seed)
    records = {}
    for s in range(n_scans):
        uid = f"1.2.826.0.bench.{s}"
        noise = rng.standard_normal(shape).astype(np.float32)
        image = ndimage.gaussian_filter(noise, 2.0)
        image = np.clip(128 + image * (60 / image.std()), 0, 255).astype(np.uint8)
        lung = np.zeros(shape, np.uint8)
        m = [max(1, d // 8) for d in shape]
        lung[m[0]:-m[0], m[1]:-m[1], m[2]:-m[2]] = 1
        lo, hi = np.array(m) + 10, np.array(shape) - np.array(m) - 10
        nod = rng.uniform(lo, hi, (8, 3))
        cand = rng.uniform(lo, hi, (200, 3))
        geom = Geometry.identity()
        records[uid] = ScanRecord(
            uid=uid, fold=s % 10, shape_zyx=shape, geometry=geom, arrays=("image", "lung"),
            nodules_zyx=nod, nodules_world=voxel_to_world(nod, geom),
            nodule_diameter_mm=rng.uniform(4, 30, 8), dropped_world=np.zeros((0, 3)),
            dropped_diameter_mm=np.zeros(0), excluded_zyx=np.zeros((0, 3)),
            excluded_world=np.zeros((0, 3)), excluded_diameter_mm=np.zeros(0),
            candidates_zyx=cand, candidates_world=voxel_to_world(cand, geom),
            candidates_label=np.zeros(200, np.int64), transforms={}).to_json()
        write_scan_arrays(path, uid, {"image": image, "lung": lung})
    write_manifest(path, {"format": STORE_FORMAT, "version": STORE_VERSION,
                          "hu_window": [-1200, 600], "spacing_zyx": [1, 1, 1], "scans": records})
    return PatchStore.open(path)


def make_config(patch, batch, workers, threads) -> ml_collections.ConfigDict:
    """The run config's defaults (``lungjax.config_schema``) with this case's patch, batch,
    loader threads and full augmentation."""
    from lungjax import config_schema

    c = config_schema.get_config()
    c.train.batch_size = batch
    c.data.update(dict(patch_size_zyx=patch, positive_fraction=0.5, workers=workers,
                       prefetch_buffer=2, read_threads=threads, prefetch_batches=4))
    full = dict(flip_axes=(0, 1, 2), rot90=True, scale_range=(0.9, 1.1))
    c.augment.positive.update(dict(full, translate_nodule_fraction=1.0))
    c.augment.negative.update(dict(full, translate_mm=5.0))
    c.sampler.update(dict(random_negatives_per_scan=64, samples_per_round=batch * 64))
    return c


def measure(store, patch, batch, workers, threads, n_batches) -> tuple[float, float]:
    cfg = make_config(patch, batch, workers, threads)
    index = smp.Sampler.from_store(store, cfg).freeze_index(seed=0)
    it = iter(pl.build_train_dataset(cfg, store, index, seed=0, repeat=True))
    try:
        t0 = time.perf_counter()
        for _ in range(1 + workers):  # first batches include worker start-up
            next(it)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        dt = time.perf_counter() - t0
    finally:
        if hasattr(it, "close"):
            it.close()
    return n_batches * batch / dt, t_first


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", help="prepared patch store (default: build a temporary one)")
    p.add_argument("--scans", type=int, default=4)
    p.add_argument("--shape", default="160,256,256", help="z,y,x of generated scans")
    p.add_argument("--workers", default="0,2", help="comma list of prefetch worker counts")
    p.add_argument("--threads", type=int, default=2, help="read threads per process")
    p.add_argument("--patches", type=int, default=768, help="patches timed per case")
    p.add_argument("--cases", default="", help="comma list of case numbers (default all)")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            store = PatchStore.open(args.store)
        else:
            shape = tuple(int(v) for v in args.shape.split(","))
            t0 = time.perf_counter()
            store = build_store(os.path.join(tmp, "store"), args.scans, shape)
            print(f"built a {args.scans}-scan {shape} store in {time.perf_counter() - t0:.1f} s")
        print(f"store: {store}; cpu count {os.cpu_count()}; read threads {args.threads}")
        print(f"{'case':<18} {'patch zyx':<14} {'batch':>5} {'workers':>7} "
              f"{'patches/s':>10} {'batches/s':>10} {'first batch s':>14}")
        for name, patch, batch in cases:
            n_batches = max(4, args.patches // batch)
            for w in workers:
                rate, first = measure(store, patch, batch, w, args.threads, n_batches)
                print(f"{name:<18} {str(patch):<14} {batch:>5} {w:>7} {rate:>10.1f} "
                      f"{rate / batch:>10.2f} {first:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
